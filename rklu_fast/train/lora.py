"""LoRA mode: one copy of the base weights serves the original, the augmented model and the student.

With peft, the original ``m_o`` is the base model with adapters disabled, the augmented model ``m_aug`` is the
base plus an adapter named ``"augmented"`` (trained on the forget set in the augment stage), and the student is
the base plus an adapter named ``"student"`` (zero-initialised B, so it starts as ``m_o``, as the paper's student
does).  Full-parameter RKLU needs three models' weights (or a teacher cache); this needs one, plus two small
adapters.

``SharedBaseTeacher`` has the teacher-source interface of ``rklu_fast.train.teacher.OnlineTeacher``
(``logits(batch) -> (original, augmented)``, ``original_logits(batch)``), so the loop and the methods do not
change; it switches adapters around its forwards and always leaves the student's adapter active.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

ORIGINAL, AUGMENTED, STUDENT = None, "augmented", "student"


def lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.0, target_modules="all-linear",
                init_lora_weights=True):
    """A peft ``LoraConfig`` for causal LMs (all linear layers except the LM head by default)."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ImportError("LoRA mode needs peft: `pip install peft` (or `pip install rklu_fast[lora]`)") from None
    if r <= 0:
        raise ValueError(f"lora.r: must be a positive rank, got {r!r}")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      init_lora_weights=init_lora_weights, task_type="CAUSAL_LM")


def add_adapter(model, name: str, config):
    """Add adapter ``name`` to ``model`` (wrapping a plain transformers model in a ``PeftModel`` first) and make
    it the active, trainable one; returns the ``PeftModel``.  Base weights are frozen by peft."""
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        if name in model.peft_config:
            raise ValueError(f"adapter: {name!r} already exists on this model")
        model.add_adapter(name, config)
    else:
        model = get_peft_model(model, config, adapter_name=name)
    model.set_adapter(name)
    return model


@contextmanager
def active_adapter(model, name: str | None):
    """Run the body with adapter ``name`` active (``None``: all adapters disabled, i.e. the base model), then
    restore the previously active adapter and its trainability."""
    previous = model.active_adapter
    if name is None:
        with model.disable_adapter():
            yield model
        return
    model.set_adapter(name, inference_mode=True)
    try:
        yield model
    finally:
        model.set_adapter(previous)  # trainable again, as before


class SharedBaseTeacher:
    """Teacher logits from the shared-base ``PeftModel``: original = adapters off, augmented = ``"augmented"``."""

    def __init__(self, model, augmented: str = AUGMENTED):
        if augmented not in getattr(model, "peft_config", {}):
            raise ValueError(f"model: no adapter named {augmented!r}; train one in the augment stage (LoRA mode)")
        self.model, self.augmented = model, augmented

    @torch.no_grad()
    def _forward(self, adapter, batch):
        with active_adapter(self.model, adapter):
            was_training = self.model.training
            self.model.eval()  # the teacher is frozen: no dropout
            try:
                return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            finally:
                self.model.train(was_training)

    def original_logits(self, batch) -> torch.Tensor:
        return self._forward(ORIGINAL, batch)

    def logits(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self._forward(ORIGINAL, batch), self._forward(self.augmented, batch)
