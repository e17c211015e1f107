"""The `rklu` command line: help, clear errors before any compute (nothing written), and the tiny default run."""
import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from rklu_fast.cli import main
from rklu_fast.config import ConfigError, load_config
from tiny_pipeline import overrides, tokenizer_dir

TINY = "configs/tiny-tofu.yaml"


def error_of(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("finetune", "augment", "unlearn", "run"):
        assert cmd in out


def test_overrides_reach_nested_keys():
    c = load_config(TINY, ["unlearn.epochs=2", "unlearn.alpha=4", "data.forget=forget05", "precision=no"])
    assert (c["unlearn"]["epochs"], c["unlearn"]["alpha"], c["data"]["forget"], c["precision"]) == \
        (2, 4, "forget05", "no")
    assert c["unlearn"]["lr"] == 1e-3 and c["augment"]["epochs"] == 10  # untouched keys keep the file's values


@pytest.mark.parametrize("override,message", [
    ("unlearn.epoch=2", "unlearn.epoch: unknown key"),
    ("unlearn.method=gd", "unlearn.method: unknown method 'gd'; choose one of"),
    ("unlearn.epochs=two", "unlearn.epochs: must be"),
    ("unlearn.batch_size=30", "unlearn.batch_size: 30 is not a multiple"),
    ("unlearnepochs", "expected key=value"),
    ("threads=two", "threads: must be a positive int"),
    ("data.retain=null", "unlearn.retain_term"),
])
def test_bad_config_is_rejected_before_compute(tmp_path, capsys, override, message):
    err = error_of(capsys, ["run", "--config", TINY, f"run_dir={tmp_path / 'run'}", override])
    assert message in err
    assert not (tmp_path / "run").exists()  # nothing written


def test_missing_files(tmp_path, capsys):
    assert "no such file" in error_of(capsys, ["run", "--config", str(tmp_path / "nope.yaml")])
    err = error_of(capsys, ["run", "--config", TINY, *overrides(tmp_path / "run"), "data.forget=forget07"])
    assert "forget07" in err and not (tmp_path / "run").exists()
    err = error_of(capsys, ["augment", "--config", TINY, *overrides(tmp_path / "run"),
                            f"finetune.original={tmp_path / 'missing' / 'model'}"])
    assert "finetune.original: no such model directory" in err
    # a stage whose input no earlier stage of this command makes: refused before anything is written
    err = error_of(capsys, ["unlearn", "--config", TINY, *overrides(tmp_path / "run2")])
    assert "original: no model at" in err and "run `rklu finetune` first" in err
    assert not (tmp_path / "run2").exists()
    # a folder that holds no model, given where a model is expected: the config key is named, not a traceback
    (tmp_path / "empty").mkdir()
    err = error_of(capsys, ["augment", "--config", TINY, *overrides(tmp_path / "run3"),
                            f"finetune.original={tmp_path / 'empty'}"])
    assert "finetune.original: cannot load" in err


def test_vocab_mismatch_between_original_and_augmented(tmp_path, capsys):
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir()))
    for name, v in (("orig", vocab), ("aug", vocab + 8)):
        LlamaForCausalLM(LlamaConfig(vocab_size=v, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2)).save_pretrained(tmp_path / name)
    err = error_of(capsys, ["unlearn", "--config", TINY, *overrides(tmp_path / "run"),
                            f"finetune.original={tmp_path / 'orig'}", f"augment.model={tmp_path / 'aug'}"])
    assert "vocab mismatch" in err and not (tmp_path / "run").exists()


def test_interrupted_or_changed_run_dir_needs_resume_or_same_config(tmp_path, capsys):
    ov = overrides(tmp_path / "run", **{"finetune.make_oracle": False})
    assert main(["finetune", "--config", TINY, "--stop-after-steps", "4", *ov]) == 3  # killed after epoch 1
    assert "--resume" in error_of(capsys, ["finetune", "--config", TINY, *ov])
    assert "changed: finetune.lr" in error_of(capsys, ["finetune", "--config", TINY, "--resume", *ov,
                                                       "finetune.lr=0.1"])
    assert (tmp_path / "run" / "original" / "checkpoints" / "epoch-1").is_dir()  # nothing lost
    with pytest.raises(ConfigError):
        load_config(TINY, ["model.random_init=3"])


def test_tiny_default_run_with_fewer_epochs(tmp_path, capsys):
    """The README's main command, shortened: real TOFU files, BPE trained offline, random-init Llama."""
    argv = ["run", "--config", TINY, f"run_dir={tmp_path / 'tiny'}", "finetune.epochs=1", "augment.epochs=2",
            "unlearn.epochs=2", "data.max_retain=16", "log.tensorboard=false"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "before unlearning" in out and "after unlearning" in out
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert set(summary) == {"before", "after"} and set(summary["before"]) == {"forget", "retain"}
    assert (tmp_path / "tiny" / "tokenizer" / "tokenizer.json").is_file()
    assert torch.tensor(list(summary["after"].values())).isfinite().all()
