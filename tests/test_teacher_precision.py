"""teacher.dtype=float32: the frozen models' LM heads compute in fp32 under bf16 autocast (the rounding α would
multiply is gone), and the cached teacher is stored in fp32."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rklu_fast.train.teacher import fp32_head
from tiny_pipeline import needs_tofu, overrides


def _model(seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(40.0)  # logits of magnitude ~10-30, where a bf16 ulp is 0.0625-0.125
    return m.to(torch.bfloat16)


def test_fp32_head_removes_the_bf16_rounding_of_the_logits():
    model = _model(int(torch.seed() % 2**31))
    ids = torch.randint(0, 97, (3, 11))
    captured = {}
    model.model.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o.last_hidden_state))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(input_ids=ids).logits
    exact = captured["h"].double() @ model.lm_head.weight.double().T  # the same hidden state, float64 head
    fp32_head(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fp32 = model(input_ids=ids).logits
    assert plain.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    assert (fp32.double() - exact).abs().max() < 1e-4 * exact.abs().max()
    assert (plain.double() - exact).abs().max() > 1e-2  # the rounding the fp32 head removes


@needs_tofu
@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_cached_teacher_dtype_follows_teacher_dtype(tmp_path, dtype):
    from rklu_fast.config import load_config
    from rklu_fast.train.pipeline import Run
    ov = overrides(tmp_path / "run", **{"precision": "bf16", "teacher.mode": "cached", "teacher.dtype": dtype,
                                        "teacher.cache_dir": str(tmp_path / "cache"), "unlearn.epochs": 1})
    from rklu_fast.cli import main
    assert main(["run", "--config", "configs/tiny-tofu.yaml", *ov]) == 0
    meta = (tmp_path / "cache" / "meta.json").read_text()
    assert ('"dtype": "float32"' in meta) == (dtype == "float32")
    assert ('"dtype": "bfloat16"' in meta) == (dtype == "auto")
    Run(load_config("configs/tiny-tofu.yaml", ov))  # the config round-trips


def test_float32_teacher_is_refused_with_lora():
    from rklu_fast.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="teacher.dtype: float32 heads are not available with LoRA"):
        load_config("configs/tiny-tofu.yaml", ["teacher.dtype=float32", "lora.enabled=true"])
