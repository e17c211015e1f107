"""The online teacher source: the original's and the augmented model's logits computed on the fly by the two frozen
models (the paper's setting).  ``rows(batch)`` gives the ``TeacherRows`` a method feeds the loss; the cached source
(``teacher_cache.CachedTeacher``) has the same interface.
"""
from __future__ import annotations

import torch

from rklu_fast.train.frozen import TeacherRows


def _frozen(model):
    model.eval()
    model.requires_grad_(False)
    return model


class OnlineTeacher:
    """Both frozen models run on every forget micro-batch; rows are all positions, shifted (``rows="all"``)."""

    def __init__(self, original, augmented):
        self.original, self.augmented = _frozen(original), _frozen(augmented)

    @staticmethod
    @torch.no_grad()
    def _forward(model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def logits(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Unshifted ``[B, T, V]`` logits of the original and the augmented model."""
        return self._forward(self.original, batch), self._forward(self.augmented, batch)

    def rows(self, batch) -> TeacherRows:
        original, augmented = self.logits(batch)
        return TeacherRows(original[:, :-1], augmented[:, :-1], "all")


def check_same_vocab(**models) -> None:
    """Student, original and augmented must share one vocabulary: the teacher is formed token by token."""
    sizes = {name: m.config.vocab_size for name, m in models.items() if m is not None}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"vocab mismatch between student and teacher models: {sizes}")
