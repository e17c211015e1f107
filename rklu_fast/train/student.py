"""The model being trained, as a method sees it: ``student(batch)`` gives its logits; with the fused linear loss
(``unlearn.fused_linear``) a method may instead take ``student.hidden(batch)`` and ``student.head`` and never form
the ``[B, T, V]`` logits (``rklu_fast.fused_linear``)."""
from __future__ import annotations

import torch


class Student:
    def __init__(self, model: torch.nn.Module, fused: bool = False):
        self.model, self.fused = model, fused
        if fused:
            from rklu_fast.fused_linear import fused_linear_parts

            self.body, self.head = fused_linear_parts(model)

    def __call__(self, batch: dict) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def hidden(self, batch: dict) -> torch.Tensor:
        """The last hidden states ``[B, T, d]`` the LM head reads (fused mode only)."""
        return self.body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def fused_linear_choice(setting: str, model: torch.nn.Module, device, distributed: bool,
                        method=None) -> tuple[bool, str]:
    """Whether to use the fused linear loss (``unlearn.fused_linear``: ``auto`` = on CUDA for supported models and
    methods, ``true``, ``false``) and, when it is not used although asked or possible, why."""
    from rklu_fast.fused_linear import supports_fused_linear

    if setting == "false" or setting is False:
        return False, ""
    if setting == "auto" and torch.device(device).type != "cuda":
        return False, ""
    if method is not None and not method.fused_linear:
        return False, f"fused linear loss off: method {method.name!r} reads the student's logits"
    if distributed:  # the body called directly would skip DDP's forward, hence its gradient synchronisation
        return False, "fused linear loss off: the model is trained by several processes (DDP wraps its forward)"
    ok, why = supports_fused_linear(model)
    return ok, "" if ok else f"fused linear loss off: {why}"
