"""Library deprecation warnings that are not the user's business stay out of runs and evaluations: peft wrapping a
model (LoRA runs) and the shared-prefix NLL's cached forward (per-epoch and `rklu eval` TOFU metrics) warn nothing;
the filters are narrow, so the same warnings raised elsewhere still show."""
import warnings

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def _tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)).eval()


def _future_warnings(body) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        body()
    return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


def test_lora_wrapping_warns_nothing(tmp_path):
    pytest.importorskip("peft")
    from rklu_fast.train import lora

    def body():
        model = lora.add_adapter(_tiny(), "augmented", lora.lora_config(r=2))
        lora.save_adapter(tmp_path / "aug", model)
        lora.load_frozen_adapter(_tiny(), tmp_path / "aug")
        lora.attach_adapter(_tiny(), "student", lora.lora_config(r=2), resume_from=tmp_path / "aug")
    assert _future_warnings(body) == []
    # narrow: transformers' own deprecation, raised outside the wrapping, still reaches the user
    model = _tiny()
    if hasattr(model, "is_activation_checkpointing"):
        assert any("is_gradient_checkpointing" in m for m in _future_warnings(lambda: model.is_gradient_checkpointing))


def test_shared_prefix_nll_warns_nothing():
    from rklu_fast.eval.nll import sequence_nll

    rng = np.random.default_rng(0)
    question = rng.integers(1, 64, 5).tolist()
    examples = []
    for n in (2, 4, 3):
        answer = rng.integers(1, 64, n).tolist()
        examples.append({"input_ids": question + answer, "labels": [-100] * 5 + answer,
                         "attention_mask": [1] * (5 + n)})
    assert _future_warnings(lambda: sequence_nll(_tiny(), examples, 0, batch_size=4, share_prefix=True)) == []
