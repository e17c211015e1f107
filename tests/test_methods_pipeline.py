"""Every unlearning method through the CLI on tiny-tofu, reusing one set of finished stages: five optimizer steps
move each method's objective the intended way; resuming NPO and IDK mid-stage is bit-identical; TA equals its
closed form (full weights and LoRA); the teacher model's logits and greedy text are the teacher's; reference
log-likelihoods looked up from the cache equal the original's on the training batch."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rklu_fast.cli import main
from rklu_fast.config import load_config
from rklu_fast.data.collate import collate, to_device
from rklu_fast.eval.nll import sequence_nll
from rklu_fast.train.pipeline import Run
from tiny_pipeline import needs_tofu, overrides

pytestmark = needs_tofu
TINY = "configs/tiny-tofu.yaml"
# 8 forget examples, batch 4 → 2 steps per epoch; 2.5 epochs = five optimizer steps
FIVE_STEPS = {"unlearn.epochs": 2.5, "unlearn.lr": 1e-2, "unlearn.batch_size": 4, "unlearn.micro_batch_size": 2}


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Original, oracle and augmented models trained once (the finished stages every method reuses)."""
    d = tmp_path_factory.mktemp("shared")
    ov = overrides(d, **{"finetune.epochs": 8, "finetune.lr": 1e-2, "augment.epochs": 4, "augment.lr": 1e-2})
    assert main(["finetune", "--config", TINY, *ov]) == 0 and main(["augment", "--config", TINY, *ov]) == 0
    return {"finetune.original": d / "original" / "model", "finetune.oracle": d / "oracle" / "model",
            "augment.model": d / "augmented" / "model", "model.tokenizer": str(overrides(d)[4].split("=", 1)[1])}


def _ov(run_dir, stages, method, retain="none", **extra):
    return overrides(run_dir, **{**{k: str(v) for k, v in stages.items()}, "unlearn.method": method,
                                 "unlearn.retain_term": retain, **FIVE_STEPS, **extra})


def _nll(model, examples, pad):
    """Mean over examples of the mean answer-token NLL (the evaluator's batched NLL, not the training code)."""
    sums, counts = sequence_nll(model, examples, pad)
    return float(np.mean(sums / counts))


def _objectives(run_dir, stages, method, retain, **extra):
    run = Run(load_config(TINY, _ov(run_dir, stages, method, retain, **extra)))
    run.preflight(("unlearn",))
    pad = run.tokenizer.pad_token_id
    forget = run.encode(run.forget_records)
    retain_ex = run.encode(run.retain_records)
    refusal = [dict(run.method().views(e, 0)["forget" if method == "idk" else "chosen"]) for e in forget] \
        if method in ("idk", "dpo") else None
    out = {}
    for role in ("original", "unlearned"):
        model = run.load_model(run.model_path(role)).eval()
        out[role] = {"forget": _nll(model, forget, pad), "retain": _nll(model, retain_ex, pad)}
        if refusal is not None:
            out[role]["refusal"] = _nll(model, refusal, pad)
    return out


METHODS = ["rklu", "fklu", "ga", "npo", "simnpo", "idk", "dpo", "ta", "teacher"]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs_from_the_cli_and_moves_its_objective(tmp_path, stages, method, capsys):
    retain = "none" if method in ("ta", "teacher") else "RT"
    extra = {"unlearn.forget_weight": 1.0} if method == "simnpo" else {}  # the authors' 0.125 is for 7B models
    assert main(["run", "--config", TINY, *_ov(tmp_path / method, stages, method, retain, **extra)]) == 0
    out = capsys.readouterr().out
    assert "before unlearning" in out and "after unlearning" in out
    # the finished stages were reused, not retrained
    assert not any((tmp_path / method / role).exists() for role in ("original", "oracle", "augmented"))
    summary = json.loads((tmp_path / method / "summary.json").read_text())
    assert set(summary) == {"before", "after"}
    obj = _objectives(tmp_path / method, stages, method, retain, **extra)
    before, after = obj["original"], obj["unlearned"]
    if method == "idk":
        assert after["refusal"] < before["refusal"] - 0.05, obj     # learns to refuse
    else:
        assert after["forget"] > before["forget"] + 0.02, obj       # forgets the gold answers
    if method == "dpo":  # the refusal-over-gold margin widens
        assert after["refusal"] - after["forget"] < before["refusal"] - before["forget"] - 0.05, obj


def test_retain_term_holds_the_retain_set(tmp_path, stages):
    moved = {}
    for retain in ("none", "RT"):
        assert main(["run", "--config", TINY, *_ov(tmp_path / retain, stages, "ga", retain)]) == 0
        obj = _objectives(tmp_path / retain, stages, "ga", retain)
        moved[retain] = abs(obj["unlearned"]["retain"] - obj["original"]["retain"])
    assert moved["RT"] < moved["none"], moved


@pytest.mark.parametrize("method", ["npo", "idk"])
def test_resume_mid_stage_is_bit_identical(tmp_path, stages, method):
    ov = _ov(tmp_path / "full", stages, method, "RT")
    assert main(["unlearn", "--config", TINY, *ov]) == 0
    killed = _ov(tmp_path / "killed", stages, method, "RT")
    assert main(["unlearn", "--config", TINY, "--stop-after-steps", "3", *killed]) == 3  # epoch-1 checkpoint kept
    assert main(["unlearn", "--config", TINY, "--resume", *killed]) == 0
    a = load_file(tmp_path / "full" / "unlearned" / "model" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "unlearned" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "killed" / "unlearned" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]


def test_reference_log_likelihoods_equal_the_original_on_training_batches(tmp_path, stages):
    from rklu_fast.train.frozen import ReferenceLogProbs
    from rklu_fast.train.methods.base import sequence_logprob
    run = Run(load_config(TINY, _ov(tmp_path / "ref", stages, "dpo", "RT")))
    run.preflight(("unlearn",))
    method, forget = run.method(), run.encode(run.forget_records)
    original = run.load_model(run.model_path("original")).eval()
    views = {}
    for epoch in range(3):
        for e in forget:
            for name, v in method.views(e, epoch).items():
                views[v["key"]] = v
    cached = ReferenceLogProbs.build(original, views, pad_token_id=run.tokenizer.pad_token_id, device="cpu",
                                     batch_size=3)
    for epoch in range(3):  # a training batch mixes lengths differently from the cache's sorted batches
        for name in ("chosen", "rejected"):
            batch = to_device(collate([method.views(e, epoch)[name] for e in forget[::-1]],
                                      run.tokenizer.pad_token_id), "cpu")
            with torch.no_grad():
                online = sequence_logprob(original(input_ids=batch["input_ids"],
                                                   attention_mask=batch["attention_mask"]).logits, batch["labels"])[0]
            torch.testing.assert_close(cached.lookup(batch), online, rtol=1e-5, atol=1e-4)


def test_ta_is_the_closed_form_with_lora(tmp_path, stages):
    ov = _ov(tmp_path / "lora", {k: v for k, v in stages.items() if k != "augment.model"}, "ta",
             **{"lora.enabled": "true", "lora.r": 4, "lora.alpha": 8, "augment.epochs": 1, "augment.lr": 3e-2})
    assert main(["run", "--config", TINY, *ov]) == 0
    original = load_file(stages["finetune.original"] / "model.safetensors")
    adapter = load_file(tmp_path / "lora" / "augmented" / "model" / "adapter_model.safetensors")
    ta = load_file(tmp_path / "lora" / "unlearned" / "model" / "model.safetensors")
    scale, beta = 8 / 4, 2.5
    expected = {k: v.double() for k, v in original.items()}
    for key, a in adapter.items():  # ΔW = B·A·(alpha/r), written out from the saved adapter
        if ".lora_A." in key:
            target = key.split("base_model.model.", 1)[1].replace(".lora_A.weight", ".weight")
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            expected[target] = expected[target] - beta * (b.double() @ a.double()) * scale
    assert ta.keys() == original.keys()
    for k in ta:
        torch.testing.assert_close(ta[k].double(), expected[k], rtol=1e-5, atol=1e-6)


def test_teacher_model_logits_and_greedy_generation(stages):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rklu_fast
    from rklu_fast.teacher_model import TeacherModel
    original = AutoModelForCausalLM.from_pretrained(stages["finetune.original"]).eval()
    augmented = AutoModelForCausalLM.from_pretrained(stages["augment.model"]).eval()
    teacher = TeacherModel(original, augmented, alpha=8.0).eval()
    tok = AutoTokenizer.from_pretrained(stages["model.tokenizer"])
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    enc = tok(["[INST] Who is Basil? [/INST]", "[INST] Where was the author born, and when? [/INST]"],
              return_tensors="pt", padding=True)
    with torch.no_grad():
        lo = original(**enc).logits
        la = augmented(**enc).logits
        got = teacher(enc["input_ids"], enc["attention_mask"]).logits
    torch.testing.assert_close(got, rklu_fast.teacher_logits(lo, la, 8.0), rtol=0, atol=0)
    # greedy text: the teacher's KV-cached decoder against a step-by-step argmax of full forwards, no cache
    n = 12
    out = teacher.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=n, eos_token_id=None)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    for _ in range(n):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            z = rklu_fast.teacher_logits(original(input_ids=ids, attention_mask=mask, position_ids=pos).logits,
                                         augmented(input_ids=ids, attention_mask=mask, position_ids=pos).logits,
                                         8.0)
        ids = torch.cat([ids, z[:, -1].argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(out, ids)


def test_bad_method_inputs_are_refused_before_anything_is_written(tmp_path, stages, capsys):
    ov = _ov(tmp_path / "x", stages, "idk", "RT", **{"unlearn.refusals": str(tmp_path / "missing.txt")})
    assert main(["run", "--config", TINY, *ov]) == 2
    assert "unlearn.refusals: no such file" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["run", "--config", TINY, *_ov(tmp_path / "y", stages, "gd")]) == 2
    err = capsys.readouterr().err
    assert "unlearn.method: unknown method 'gd'" in err and "rklu, fklu, ga, npo" in err.replace("'", "")
    # ta needs the augmented model: with no augment stage in the command and none given, refused in preflight
    no_aug = _ov(tmp_path / "z", {k: v for k, v in stages.items() if k != "augment.model"}, "ta")
    assert main(["unlearn", "--config", TINY, *no_aug]) == 2
    assert "augmented: no model at" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
