"""The online teacher source: the original's and the augmented model's logits computed on the fly by the two frozen
models (the paper's setting).  ``rows(batch)`` gives the ``TeacherRows`` a method feeds the loss; the cached source
(``teacher_cache.CachedTeacher``) has the same interface.
"""
from __future__ import annotations

import torch

from rklu_fast.reference import shifted_augmented
from rklu_fast.train.frozen import TeacherRows


def _frozen(model):
    model.eval()
    model.requires_grad_(False)
    return model


class OnlineTeacher:
    """Both frozen models run on every forget micro-batch; rows are all positions, shifted (``rows="all"``).
    ``form``: the teacher form (``rklu_fast.reference.TEACHER_FORMS``): the augmented logits are shifted by the
    form's per-row ``c`` before the loss forms ``l_o − α·relu(l_aug − c − l_o)``."""

    def __init__(self, original, augmented, form: str = "logits"):
        self.original, self.augmented, self.form = _frozen(original), _frozen(augmented), form

    @staticmethod
    @torch.no_grad()
    def _forward(model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def logits(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Unshifted ``[B, T, V]`` logits of the original and the augmented model."""
        return self._forward(self.original, batch), self._forward(self.augmented, batch)

    def rows(self, batch) -> TeacherRows:
        original, augmented = self.logits(batch)
        original, augmented = original[:, :-1], augmented[:, :-1]
        return TeacherRows(original, shifted_augmented(original, augmented, self.form), "all")


def fp32_head(model: torch.nn.Module) -> torch.nn.Module:
    """Make a frozen model's LM head compute in fp32 whatever the weights' dtype and the autocast around it.

    bf16 keeps 8 significant bits, so a logit of magnitude 16–32 is rounded by up to 0.0625; the teacher
    ``l_o − α·relu(l_aug − l_o)`` multiplies the rounding of the difference by α (up to ≈ 1 nat at α = 8).  The
    rounding happens in the head's output, before anything is cached, so the head itself must run in fp32: its
    input (the last hidden state) is upcast and the head's weights are kept once in fp32 (frozen: no update)."""
    head = model.get_output_embeddings()
    weight = head.weight.detach().float()
    bias = head.bias.detach().float() if getattr(head, "bias", None) is not None else None

    def forward(hidden):
        with torch.autocast(hidden.device.type, enabled=False):
            return torch.nn.functional.linear(hidden.float(), weight.to(hidden.device), None if bias is None
                                              else bias.to(hidden.device))
    head.forward = forward
    return model


def check_same_vocab(**models) -> None:
    """Student, original and augmented must share one vocabulary: the teacher is formed token by token."""
    sizes = {name: m.config.vocab_size for name, m in models.items() if m is not None}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"vocab mismatch between student and teacher models: {sizes}")
