"""Teacher sources: where a method gets the original's and the augmented model's logits for a batch.

A source has two methods, ``logits(batch) -> (original, augmented)`` and ``original_logits(batch)``, so the loop
and the methods never care whether logits come from live models (here) or, later, from a cache on disk.
"""
from __future__ import annotations

import torch


def _frozen(model):
    model.eval()
    model.requires_grad_(False)
    return model


class OnlineTeacher:
    """Logits computed on the fly by the two frozen models (the paper's setting): the original ``m_o`` and the
    augmented ``m_aug`` (``None`` when only the original is needed, e.g. FT stages never build a teacher)."""

    def __init__(self, original, augmented=None):
        self.original = _frozen(original)
        self.augmented = _frozen(augmented) if augmented is not None else None

    @staticmethod
    @torch.no_grad()
    def _forward(model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def original_logits(self, batch) -> torch.Tensor:
        return self._forward(self.original, batch)

    def logits(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.augmented is None:
            raise ValueError("teacher: has no augmented model; build OnlineTeacher(original, augmented)")
        return self._forward(self.original, batch), self._forward(self.augmented, batch)


def check_same_vocab(**models) -> None:
    """Student, original and augmented must share one vocabulary: the teacher is formed token by token."""
    sizes = {name: m.config.vocab_size for name, m in models.items() if m is not None}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"vocab mismatch between student and teacher models: {sizes}")
