"""Each stage end to end on tiny random-init Llama and Phi models and a slice of real TOFU: augmenting lowers the
forget NLL, unlearning lowers the forget-answer probability more than the retain one, a killed run resumed with
--resume ends with the same weights as an uninterrupted run."""
import json

import pytest
import torch
from safetensors.torch import load_file

from rklu_fast.cli import main
from rklu_fast.config import load_config
from rklu_fast.train.metrics import mean_answer_probability
from rklu_fast.train.pipeline import Run
from tiny_pipeline import overrides


def probs(run, role):
    model = run.load_model(run.model_path(role))
    return {name: mean_answer_probability(model, run.encode(records), run.tokenizer.pad_token_id)
            for name, records in (("forget", run.forget_records), ("retain", run.retain_records))}


def test_llama_pipeline_rklu_with_rt(tmp_path):
    ov = overrides(tmp_path / "run", "llama", **{"finetune.epochs": 4, "augment.epochs": 6, "unlearn.epochs": 3})
    assert main(["run", "--config", "configs/tiny-tofu.yaml", *ov]) == 0
    for role in ("original", "oracle", "augmented", "unlearned"):
        assert (tmp_path / "run" / role / "model" / "config.json").is_file()
    assert {"config.yaml", "versions.json", "summary.json"} <= {p.name for p in (tmp_path / "run").iterdir()}

    run = Run(load_config("configs/tiny-tofu.yaml", ov))
    run.preflight(("unlearn",))
    p = {role: probs(run, role) for role in ("original", "augmented", "unlearned")}
    assert p["augmented"]["forget"] > 1.2 * p["original"]["forget"]  # augmenting lowers the forget NLL
    forget_drop = p["original"]["forget"] - p["unlearned"]["forget"]
    retain_drop = p["original"]["retain"] - p["unlearned"]["retain"]
    assert forget_drop > 0 and forget_drop > retain_drop, p

    log = [json.loads(line) for line in (tmp_path / "run" / "unlearned" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, len(log) + 1))
    for key in ("forget_loss", "retain_loss", "forget_prob", "teacher_entropy", "tokens_per_s", "lr"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in log), key
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["after"]["forget"] == pytest.approx(p["unlearned"]["forget"], rel=1e-4)


def test_phi_pipeline_fklu_with_kl_retain(tmp_path, capsys):
    ov = overrides(tmp_path / "run", "phi", **{"unlearn.method": "fklu", "unlearn.retain_term": "KL",
                                              "finetune.make_oracle": False, "log.tensorboard": True})
    assert main(["run", "--config", "configs/tiny-tofu.yaml", *ov]) == 0
    assert not (tmp_path / "run" / "oracle").exists()
    assert list((tmp_path / "run" / "unlearned" / "tensorboard").iterdir())
    out = capsys.readouterr().out
    assert "before unlearning" in out and "after unlearning" in out
    # Rerunning a finished run skips every stage.
    assert main(["run", "--config", "configs/tiny-tofu.yaml", *ov]) == 0
    assert "augmented: done" in capsys.readouterr().out


def test_killed_run_resumes_to_identical_weights(tmp_path):
    # 16 examples, batch 4 → 4 steps/epoch, 3 epochs = 12 steps; the kill after step 6 loses steps 5-6.
    def ov(name):
        return overrides(tmp_path / name, "llama", **{"finetune.epochs": 3, "finetune.make_oracle": False})

    assert main(["finetune", "--config", "configs/tiny-tofu.yaml", *ov("full")]) == 0
    assert main(["finetune", "--config", "configs/tiny-tofu.yaml", "--stop-after-steps", "6", *ov("killed")]) == 3
    ckpts = sorted(p.name for p in (tmp_path / "killed" / "original" / "checkpoints").iterdir())
    assert ckpts == ["epoch-1"] and not (tmp_path / "killed" / "original" / "model").exists()
    assert main(["finetune", "--config", "configs/tiny-tofu.yaml", "--resume", *ov("killed")]) == 0

    a = load_file(tmp_path / "full" / "original" / "model" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "original" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = (tmp_path / "killed" / "original" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, 13))  # redone steps logged once


def test_text_chunk_setting_without_retain_set(tmp_path):
    """The Harry Potter setting: a plain-text forget set in token chunks, the given base model as the original,
    no retain set (WikiText stands in for the book)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rklu_fast.data import default_data_dir
    from tiny_pipeline import tokenizer_dir

    text = (default_data_dir("wikitext") / "wiki.test.raw").read_text(encoding="utf-8")[:3000]
    (tmp_path / "book.txt").write_text(text)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=128)).save_pretrained(tmp_path / "base")
    ov = overrides(tmp_path / "run", **{"data.kind": "text", "data.text_file": str(tmp_path / "book.txt"),
                                        "data.chunk_length": 64, "data.retain": "null", "model.template": "plain",
                                        "finetune.original": str(tmp_path / "base"), "unlearn.retain_term": "none",
                                        "unlearn.alpha": 4, "augment.epochs": 1})
    assert main(["run", "--config", "configs/tiny-tofu.yaml", *ov]) == 0
    assert not (tmp_path / "run" / "original").exists()  # given, not trained
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["before"]) == {"forget"}
    log = [json.loads(line) for line in (tmp_path / "run" / "unlearned" / "log.jsonl").read_text().splitlines()]
    assert "retain_loss" not in log[0] and log[0]["teacher_entropy"] > 0


def test_run_dir_config_check_ignores_keys_added_since_at_their_defaults(tmp_path):
    """A run started by an older version lacks the keys added since: at their defaults they are no change; a real
    change is still refused, naming the key."""
    import yaml

    from rklu_fast.config import ConfigError

    ov = overrides(tmp_path / "run", "llama")
    cfg = load_config("configs/tiny-tofu.yaml", ov)
    older = {k: v for k, v in cfg.items() if k != "lora"}           # a whole section added since
    older["eval"] = {k: v for k, v in cfg["eval"].items() if k != "every_epoch"}  # and one key
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(older))
    Run(cfg).preflight(("finetune",))
    older["unlearn"] = {**cfg["unlearn"], "alpha": cfg["unlearn"]["alpha"] + 1}
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(older))
    Run(cfg).preflight(("finetune",))  # nothing unlearned yet: the unlearn settings may still change
    (tmp_path / "run" / "unlearned" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"changed: unlearn\.alpha\)"):
        Run(cfg).preflight(("finetune",))
