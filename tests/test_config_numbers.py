"""Config numbers: every float key takes any decimal spelling (``1e-5``, ``5E-3``, ``.5``) in the YAML file and on
the command line; integer keys take only integer literals; ``checkpoint.keep_last`` is an integer ≥ 1."""
import pytest

from rklu_fast.config import DEFAULTS, ConfigError, load_config

TINY = "configs/tiny-tofu.yaml"


def _keys(defaults, kind, prefix=()):
    for key, value in defaults.items():
        if isinstance(value, dict) and prefix + (key,) != ("model", "random_init"):
            yield from _keys(value, kind, prefix + (key,))
        elif isinstance(value, kind) and not isinstance(value, bool):
            yield ".".join(prefix + (key,))


FLOAT_KEYS = sorted(_keys(DEFAULTS, float))
INT_KEYS = sorted(_keys(DEFAULTS, int))
# spellings YAML 1.1 reads as strings (the first three) or floats, each valid for every float key (all in (0, 1))
SPELLINGS = ["1e-5", "5E-3", "+2e-1", ".5", "2.5e-1", "1.0e-5", "0.25"]


def _get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def test_the_key_lists_cover_the_config():
    assert {"unlearn.lr", "unlearn.alpha", "finetune.weight_decay", "lora.dropout"} <= set(FLOAT_KEYS)
    assert {"seed", "unlearn.batch_size", "checkpoint.keep_last", "eval.ds_size"} <= set(INT_KEYS)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_float_key_reads_every_spelling_on_the_command_line(spelling):
    config = load_config(TINY, [f"{key}={spelling}" for key in FLOAT_KEYS])
    for key in FLOAT_KEYS:
        assert _get(config, key) == float(spelling), key


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_float_key_reads_every_spelling_in_the_file(tmp_path, spelling):
    sections = sorted({k.split(".")[0] for k in FLOAT_KEYS})
    # the tiny config without its one-line stage sections, then every float key of each section in block form
    kept = [line for line in open(TINY).read().splitlines() if line.split(":")[0] not in sections]
    blocks = [f"{s}:\n" + "".join(f"  {k.split('.', 1)[1]}: {spelling}\n" for k in FLOAT_KEYS
                                  if k.startswith(s + ".")) for s in sections]
    path = tmp_path / "c.yaml"
    path.write_text("\n".join(kept) + "\n" + "".join(blocks))
    config = load_config(path)
    for key in FLOAT_KEYS:
        assert _get(config, key) == float(spelling), key


def test_float_spellings_do_not_turn_other_values_into_numbers():
    config = load_config(TINY, ["data.forget=forget05", "run_dir=runs/1e-5"])
    assert config["data"]["forget"] == "forget05" and config["run_dir"] == "runs/1e-5"
    with pytest.raises(ConfigError, match=r"unlearn\.lr: must be a number, got '1e-5x'"):
        load_config(TINY, ["unlearn.lr=1e-5x"])


@pytest.mark.parametrize("key", INT_KEYS)
@pytest.mark.parametrize("spelling", ["2.0", "1e3", ".5"])
def test_integer_keys_refuse_floats_naming_the_key(key, spelling):
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}: must be an integer"):
        load_config(TINY, [f"{key}={spelling}"])


def test_keep_last_defaults_to_two_and_must_be_a_positive_integer():
    assert load_config(TINY)["checkpoint"]["keep_last"] == 2
    assert load_config(TINY, ["checkpoint.keep_last=1"])["checkpoint"]["keep_last"] == 1
    for bad, message in (("0", "must be ≥ 1"), ("-1", "must be ≥ 1"), ("1.5", "must be an integer"),
                         ("true", "must be an integer")):
        with pytest.raises(ConfigError, match=f"checkpoint.keep_last: {message}"):
            load_config(TINY, [f"checkpoint.keep_last={bad}"])


def test_an_override_inside_a_free_section_changes_only_its_key(tmp_path):
    """`experiment:` and `model.random_init:` take any keys; `experiment.jobs=1` on the command line must keep the
    file's other keys of the section (plans, lrs), as an override of any other section does."""
    path = tmp_path / "c.yaml"
    path.write_text("experiment:\n  jobs: 2\n  lrs: [1.0e-4, 3.0e-4]\n  plans: {seeds: [rklu+RT]}\n"
                    "model:\n  train_tokenizer: 512\n  random_init: {architecture: llama, hidden_size: 64}\n")
    config = load_config(path, ["experiment.jobs=1", "experiment.plans.teacher=[ga]",
                                "model.random_init.hidden_size=32"])
    assert config["experiment"] == {"jobs": 1, "lrs": [1e-4, 3e-4], "plans": {"seeds": ["rklu+RT"],
                                                                              "teacher": ["ga"]}}
    assert config["model"]["random_init"] == {"architecture": "llama", "hidden_size": 32}
    # the section itself given whole replaces it: no key of another architecture stays behind
    config = load_config(path, ["model.random_init={architecture: phi, num_attention_heads: 2}"])
    assert config["model"]["random_init"] == {"architecture": "phi", "num_attention_heads": 2}
