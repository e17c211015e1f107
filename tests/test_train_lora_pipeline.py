"""LoRA in the `rklu` pipeline on a tiny random-init Llama and a slice of real TOFU: augment trains an adapter on
the original, unlearn trains the student as a second adapter against the shared-base teacher (cached and online);
checkpoints hold only the adapter; a killed run resumed with --resume ends bit-identical to an uninterrupted one;
mismatched resumes, a missing peft and target modules that match nothing are refused before any compute."""
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")

from rklu_fast.cli import main  # noqa: E402
from rklu_fast.config import load_config  # noqa: E402
from rklu_fast.train.metrics import mean_answer_probability  # noqa: E402
from rklu_fast.train.pipeline import Run  # noqa: E402
from tiny_pipeline import overrides  # noqa: E402

TINY = "configs/tiny-tofu.yaml"
ADAPTER = "adapter_model.safetensors"


def lora_overrides(run_dir, original, **extra):
    """The tiny slice (8 forget / 8 retain examples, batch 4 → 2 steps per epoch) with a given original and LoRA
    r=8 on all linear layers; augment 6 epochs (12 steps), unlearn 3 epochs (6 steps)."""
    return overrides(run_dir, "llama", **{
        "finetune.original": str(original), "finetune.make_oracle": "false",
        "lora.enabled": "true", "lora.r": 8, "lora.alpha": 16, "lora.dropout": 0.05,
        "augment.epochs": 6, "augment.lr": 3e-2, "unlearn.epochs": 3, "unlearn.lr": 3e-2,
        "log.tensorboard": "false", **extra})


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A full-parameter original trained well enough (20 epochs) that answer probabilities mean something."""
    d = tmp_path_factory.mktemp("original")
    ov = overrides(d, "llama", **{"finetune.epochs": 20, "finetune.lr": 1e-2, "finetune.make_oracle": "false",
                                  "log.tensorboard": "false"})
    assert main(["finetune", "--config", TINY, *ov]) == 0
    return d / "original" / "model"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, original):
    d = tmp_path_factory.mktemp("full") / "run"
    assert main(["run", "--config", TINY, *lora_overrides(d, original, **{"lora.merge": "true"})]) == 0
    return d


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, original):
    """Same config as ``full_run`` (merge aside): killed in augment after 5 of 12 steps and resumed there, then
    killed in unlearn after 3 of 6 steps (its last checkpoint: epoch-1, step 2)."""
    d = tmp_path_factory.mktemp("killed") / "run"
    ov = lora_overrides(d, original, **{"lora.merge": "true"})
    assert main(["run", "--config", TINY, "--stop-after-steps", "5", *ov]) == 3
    assert sorted(p.name for p in (d / "augmented" / "checkpoints").iterdir()) == ["epoch-1", "epoch-2"]  # keep_last 2
    assert main(["augment", "--config", TINY, "--resume", *ov]) == 0
    assert main(["unlearn", "--config", TINY, "--stop-after-steps", "3", *ov]) == 3
    return d, ov


def probs(run, role):
    model = run.load_model(run.model_path(role))
    return {name: mean_answer_probability(model, run.encode(records), run.tokenizer.pad_token_id)
            for name, records in (("forget", run.forget_records), ("retain", run.retain_records))}


def test_lora_pipeline_end_to_end(full_run, original):
    for role in ("augmented", "unlearned"):
        files = {p.name for p in (full_run / role / "model").iterdir()}
        assert {"adapter_config.json", ADAPTER, "tokenizer.json"} <= files and "model.safetensors" not in files
        assert (full_run / role / "merged" / "model.safetensors").is_file()
        saved = json.loads((full_run / role / "model" / "adapter_config.json").read_text())
        assert saved["r"] == 8 and saved["base_model_name_or_path"] == str(original.resolve())
    run = Run(load_config(TINY, lora_overrides(full_run, original, **{"lora.merge": "true"})))
    run.preflight(("unlearn",))
    p = {role: probs(run, role) for role in ("original", "augmented", "unlearned")}
    assert p["augmented"]["forget"] > 1.2 * p["original"]["forget"], p  # the augment adapter fits the forget set
    forget_drop = p["original"]["forget"] - p["unlearned"]["forget"]
    retain_drop = p["original"]["retain"] - p["unlearned"]["retain"]
    assert forget_drop > 0.02 and forget_drop > 2 * retain_drop, p
    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["after"]["forget"] == pytest.approx(p["unlearned"]["forget"], rel=1e-4)

    # `rklu eval` loads models with AutoModelForCausalLM: the adapter folder (base attached from its
    # adapter_config.json) and the merged folder give the same logits; the original's differ.
    from rklu_fast.eval.cli import _load_model

    batch = run.encode(run.forget_records[:2])[0]
    ids = torch.tensor([batch["input_ids"]])
    logits = {}
    for name, path in (("adapter", full_run / "unlearned" / "model"), ("merged", full_run / "unlearned" / "merged"),
                       ("original", original)):
        model, tokenizer = _load_model(str(path), None, "cpu", "float32")
        with torch.no_grad():
            logits[name] = model(input_ids=ids).logits
        assert len(tokenizer) == len(run.tokenizer)
    torch.testing.assert_close(logits["merged"], logits["adapter"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits["adapter"], logits["original"], atol=1e-3)


def test_online_teacher_and_kl_retain_term(tmp_path, full_run, original):
    """The online shared-base teacher (and the KL term's original = adapters off) gives the cached teacher's
    first-step forget loss, from the same augmented adapter and the same student init."""
    ov = lora_overrides(tmp_path / "run", original, **{"teacher.mode": "online", "unlearn.retain_term": "KL"})
    assert main(["augment", "--config", TINY, *ov]) == 0
    a = load_file(full_run / "augmented" / "model" / ADAPTER)
    b = load_file(tmp_path / "run" / "augmented" / "model" / ADAPTER)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert main(["unlearn", "--config", TINY, *ov]) == 0
    online = [json.loads(line) for line in (tmp_path / "run" / "unlearned" / "log.jsonl").read_text().splitlines()]
    cached = [json.loads(line) for line in (full_run / "unlearned" / "log.jsonl").read_text().splitlines()]
    assert online[0]["forget_loss"] == pytest.approx(cached[0]["forget_loss"], rel=1e-5)
    assert all(r["retain_loss"] >= -1e-6 for r in online)  # a KL divergence
    assert online[0]["retain_loss"] == pytest.approx(0.0, abs=1e-6)  # student = original at step 1 (B = 0)


def test_checkpoint_holds_only_the_student_adapter(killed_run, original):
    d, _ = killed_run
    ckpt = d / "unlearned" / "checkpoints" / "epoch-1"
    files = {p.name for p in ckpt.iterdir()}
    assert ADAPTER in files and "model.safetensors" not in files
    tensors = load_file(ckpt / ADAPTER)
    # all-linear on a 1-layer Llama (hidden 32, MLP 64): q, k, v, o (32→32), gate, up (32→64), down (64→32), each
    # an A [8, in] and a B [out, 8]: 8 × (4·64 + 3·96) = 4352 numbers, in 14 tensors
    assert len(tensors) == 14 and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == 4352
    augmented = load_file(d / "augmented" / "model" / ADAPTER)
    assert tensors.keys() == augmented.keys()
    assert not any(torch.equal(tensors[k], augmented[k]) for k in tensors if ".lora_B." in k)  # the student's
    state = torch.load(ckpt / "training_state.pt", weights_only=False)
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert sorted(m.numel() for m in moments) == sorted(t.numel() for t in tensors.values())  # adapter-only Adam
    # fp32: 4 bytes a number plus the safetensors header; the full model (~31 k numbers) is 7× bigger
    assert (ckpt / ADAPTER).stat().st_size < 4 * 4352 + 4096 < 0.2 * (original / "model.safetensors").stat().st_size


@pytest.mark.parametrize("override,message", [
    ("lora.r=4", "lora.r: the checkpoint has 8, the config asks for 4"),
    ("lora.alpha=8", "lora.alpha: the checkpoint has 16"),
    ("lora.target_modules=[q_proj,v_proj]", "lora.target_modules: the checkpoint has"),
    ("lora.enabled=false", "lora.enabled: the 'unlearned' checkpoint"),
])
def test_mismatched_resume_is_refused(killed_run, capsys, override, message):
    d, ov = killed_run
    before = sorted(p.name for p in d.rglob("*"))
    assert main(["unlearn", "--config", TINY, "--resume", *ov, override]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in d.rglob("*")) == before  # nothing written


def test_full_weight_checkpoint_is_refused_in_lora_mode(tmp_path, capsys, original):
    ov = lora_overrides(tmp_path / "run", original, **{"lora.enabled": "false"})
    assert main(["augment", "--config", TINY, "--stop-after-steps", "3", *ov]) == 3
    assert main(["augment", "--config", TINY, "--resume", *ov, "lora.enabled=true"]) == 2
    assert "lora.enabled: the 'augmented' checkpoint" in capsys.readouterr().err


def test_resumed_lora_run_is_bit_identical(killed_run, full_run):
    """Runs after the tests above, which only read ``killed_run``: this one finishes it."""
    d, ov = killed_run
    assert main(["run", "--config", TINY, "--resume", *ov]) == 0
    for role in ("augmented", "unlearned"):
        a, b = load_file(full_run / role / "model" / ADAPTER), load_file(d / role / "model" / ADAPTER)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (role, k)
        log = (d / role / "log.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in log] == list(range(1, len(log) + 1))  # redone steps once


@pytest.mark.parametrize("override,message", [
    ("lora.target_modules=[qproj]", "lora.target_modules: ['qproj'] matches no module of LlamaForCausalLM"),
    ("lora.r=0", "lora.r: must be a positive int"),
    ("lora.target_modules=[]", "lora.target_modules: must be a string or a non-empty list"),
    ("unlearn.optimizer=adamw_bf16", "unlearn.optimizer: adamw_bf16 is for bf16 weights; LoRA adapters are fp32"),
    ("augment.model=some/model", "augment.model: LoRA mode trains the augmented adapter"),
    ("finetune.original=/nonexistent/original", "finetune.original: no such model directory"),
])
def test_bad_lora_config_is_refused_before_compute(tmp_path, capsys, override, message):
    ov = overrides(tmp_path / "run", "llama", **{"lora.enabled": "true"})
    assert main(["run", "--config", TINY, *ov, override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_peft_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    ov = overrides(tmp_path / "run", "llama", **{"lora.enabled": "true"})
    assert main(["run", "--config", TINY, *ov]) == 2
    assert "lora.enabled: LoRA mode needs peft: `pip install peft`" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
