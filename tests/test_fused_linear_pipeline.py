"""unlearn.fused_linear: the RKLU stage from hidden states and the LM head gives the same steps as from logits
(fp32 tolerance), online and cached teacher; an unsupported setting falls back with one line saying why."""
import json

import pytest
import torch
from safetensors.torch import load_file

from rklu_fast.cli import main
from tiny_pipeline import needs_tofu, overrides

pytestmark = needs_tofu
TINY = "configs/tiny-tofu.yaml"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    d = tmp_path_factory.mktemp("fl")
    ov = overrides(d, **{"finetune.epochs": 4, "finetune.lr": 1e-2, "augment.epochs": 2, "augment.lr": 1e-2})
    assert main(["finetune", "--config", TINY, *ov]) == 0 and main(["augment", "--config", TINY, *ov]) == 0
    return {"finetune.original": d / "original" / "model", "augment.model": d / "augmented" / "model",
            "finetune.make_oracle": "false"}


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "unlearned" / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch", ["llama", "phi"])
@pytest.mark.parametrize("mode", ["online", "cached"])
def test_fused_linear_steps_equal_unfused(tmp_path, shared, arch, mode, capsys, monkeypatch):
    import rklu_fast
    calls = []
    fused_loss = rklu_fast.fused_linear_reverse_kl_loss
    monkeypatch.setattr(rklu_fast, "fused_linear_reverse_kl_loss",
                        lambda *a, **k: calls.append(1) or fused_loss(*a, **k))
    if arch == "phi":  # a Phi student (its head has a bias), from scratch: the shared Llama models do not fit it
        shared = {"finetune.make_oracle": "false"}
    runs = {}
    for fused in ("true", "false"):
        ov = overrides(tmp_path / fused, arch, **{**{k: str(v) for k, v in shared.items()},
                                                  "unlearn.fused_linear": fused, "teacher.mode": mode,
                                                  "unlearn.epochs": 2, "unlearn.lr": 1e-2})
        n = len(calls)
        assert main(["run", "--config", TINY, *ov]) == 0
        assert (len(calls) > n) == (fused == "true")  # the fused path ran exactly when asked
        runs[fused] = _log(tmp_path / fused)
    assert "fused linear loss off" not in capsys.readouterr().out
    assert [r["step"] for r in runs["true"]] == [r["step"] for r in runs["false"]]
    for a, b in zip(runs["true"], runs["false"]):
        for key in ("forget_loss", "retain_loss", "grad_norm", "forget_prob", "teacher_entropy"):
            assert a[key] == pytest.approx(b[key], rel=2e-5, abs=1e-6), (a["step"], key)
    wa = load_file(tmp_path / "true" / "unlearned" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "false" / "unlearned" / "model" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=2e-4, atol=2e-5)


def test_unsupported_setting_falls_back_with_one_line(tmp_path, shared, capsys):
    from rklu_fast.train.student import fused_linear_choice
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    assert fused_linear_choice("auto", model, "cpu", False) == (False, "")  # auto: CUDA only
    assert fused_linear_choice(True, model, "cpu", False) == (True, "")
    use, why = fused_linear_choice(True, model, "cpu", True)
    assert not use and "several processes" in why
    from rklu_fast.train.methods import make_method
    assert fused_linear_choice(True, model, "cpu", False, make_method("rklu")) == (True, "")
    use, why = fused_linear_choice(True, model, "cpu", False, make_method("ga"))
    assert not use and "method 'ga' reads the student's logits" in why
    model.lm_head.register_forward_hook(lambda m, i, o: o * 2)
    use, why = fused_linear_choice(True, model, "cpu", False)
    assert not use and "forward hooks" in why
