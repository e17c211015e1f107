"""TA: task arithmetic, "forgetting via negation" (Ilharco et al., ICLR 2023) — no training.

``θ = θ_o − β·(θ_aug − θ_o)`` for every parameter (embeddings and norms included), with θ_aug the augmented
model (the original fine-tuned further on the forget set: the "forget task vector" is θ_aug − θ_o); β = 2.5 as in
the RKLU paper's baseline.  With LoRA the augmented model is its adapter merged into the base.
"""
from __future__ import annotations

import torch

from rklu_fast.train.methods.base import Method


class TaskArithmetic(Method):
    name = "ta"
    summary = "task arithmetic: θ_o − β·(θ_aug − θ_o), no training (β = 2.5)"
    paper = "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023"
    needs = frozenset({"augmented"})
    trains = False
    uses = ("beta",)

    @classmethod
    def defaults(cls, forget_split):
        return {"beta": 2.5}

    def build(self, original_ref, augmented_ref, load_model):
        """The unlearned model from the original's and the augmented model's references."""
        return task_arithmetic(load_model(original_ref), load_model(augmented_ref), self.ctx.beta)


@torch.no_grad()
def task_arithmetic(original: torch.nn.Module, augmented: torch.nn.Module, beta: float) -> torch.nn.Module:
    """``original`` with every parameter set to θ_o − β·(θ_aug − θ_o) (computed in fp32 at least), returned."""
    theirs = dict(augmented.named_parameters())
    ours = dict(original.named_parameters())
    if ours.keys() != theirs.keys():
        raise ValueError(f"augmented: its parameters differ from the original's "
                         f"({sorted(ours.keys() ^ theirs.keys())[:5]}...); task arithmetic needs one architecture")
    for name, p in ours.items():
        q = theirs[name]
        if p.shape != q.shape:
            raise ValueError(f"augmented: parameter {name} has shape {tuple(q.shape)}, the original's "
                             f"{tuple(p.shape)}")
        dtype = torch.promote_types(p.dtype, torch.float32)
        w = p.to(dtype)
        p.copy_(w - beta * (q.to(device=p.device, dtype=dtype) - w))
    return original
