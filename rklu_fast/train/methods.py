"""Methods are loss plug-ins: each turns the student's logits on a forget micro-batch (plus teacher logits when it
needs them) into its share of the step's loss.  Retain terms are shared by all methods.

``loss(logits, batch, teacher, num_items) -> (loss, stats)``: ``stats`` maps a name to a float logged per step
(averaged over micro-batches), e.g. the teacher's entropy.

Normalisation under gradient accumulation: every term is a sum over valid answer tokens divided by
``num_items`` — the count of valid tokens in the whole optimizer step (all micro-batches) — so accumulating
micro-batches gives exactly the gradient of one big batch.  Causal shift: position t predicts label t+1, so the
loss ops get ``logits[:, :-1]`` with ``labels[:, 1:]`` (they never shift).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import rklu_fast
from rklu_fast.data.collate import IGNORE_INDEX


def nll_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: int) -> torch.Tensor:
    """Summed next-token cross-entropy over valid labels, divided by ``num_items``."""
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / num_items


class NLL:
    """Plain fine-tuning (stages ``finetune`` and ``augment``)."""
    name, needs_teacher = "nll", False

    def loss(self, logits, batch, teacher, num_items):
        return nll_loss(logits, batch["labels"], num_items), {}


class KLToTeacher:
    """RKLU (reverse KL, the paper's method) or FKLU (forward KL, the ablation) to l_o - alpha*relu(l_aug - l_o)."""
    needs_teacher = True

    def __init__(self, reverse: bool = True, alpha: float = 8.0, backend: str = "auto"):
        self.name = "rklu" if reverse else "fklu"
        self.kl = rklu_fast.reverse_kl_loss if reverse else rklu_fast.forward_kl_loss
        self.alpha, self.backend = alpha, backend

    def loss(self, logits, batch, teacher, num_items):
        original, augmented = teacher.logits(batch)
        labels = batch["labels"][:, 1:]
        rows = getattr(teacher, "teacher_rows", "all")  # "valid": a cached teacher's compact rows (issue 7)
        if rows == "all":
            original, augmented = original[:, :-1], augmented[:, :-1]
        loss = self.kl(logits[:, :-1], original, augmented, alpha=self.alpha, labels=labels,
                       num_items_in_batch=num_items, reduction="mean", teacher_rows=rows, backend=self.backend)
        return loss, {"teacher_entropy": teacher_entropy(original, augmented, labels, self.alpha, sliced=True)}


@torch.no_grad()
def teacher_entropy(original, augmented, labels, alpha: float, sliced: bool = False) -> float:
    """Mean entropy (nats) of the teacher distribution over the valid answer positions (a collapse detector).
    ``sliced``: the logits are already shifted (``[:, :-1]``), or already the valid rows (cached teacher)."""
    if not sliced:
        original, augmented = original[:, :-1], augmented[:, :-1]
    if original.dim() == 3:  # [B, T, V] positions → the valid rows
        valid = labels != IGNORE_INDEX
        original, augmented = original[valid], augmented[valid]
    t = rklu_fast.teacher_logits(original, augmented, alpha).float()
    logq = torch.log_softmax(t, dim=-1)
    return float(-(logq.exp() * logq.nan_to_num(neginf=0.0)).sum(-1).mean())


def make_method(name: str, alpha: float = 8.0, backend: str = "auto"):
    if name == "nll":
        return NLL()
    if name in ("rklu", "fklu"):
        return KLToTeacher(reverse=name == "rklu", alpha=alpha, backend=backend)
    raise ValueError(f"method: unknown method {name!r}; choose rklu, fklu or nll")


class RetainNLL:
    """RT: NLL of the retain answers."""
    name, needs_teacher = "RT", False

    def loss(self, logits, batch, teacher, num_items):
        return nll_loss(logits, batch["labels"], num_items), {}


class RetainKL:
    """KL: forward KL(p_o ‖ p_θ) to the frozen original on the retain answers."""
    name, needs_teacher = "KL", True

    def __init__(self, backend: str = "auto"):
        self.backend = backend

    def loss(self, logits, batch, teacher, num_items):
        original = teacher.original_logits(batch)
        return rklu_fast.forward_kl_loss(logits[:, :-1], original[:, :-1], None, labels=batch["labels"][:, 1:],
                                         num_items_in_batch=num_items, reduction="mean", backend=self.backend), {}


def make_retain_term(name: str, backend: str = "auto"):
    """``RT``, ``KL``, or ``None`` for ``none``."""
    if name == "RT":
        return RetainNLL()
    if name == "KL":
        return RetainKL(backend)
    if name == "none":
        return None
    raise ValueError(f"retain_term: unknown retain term {name!r}; choose RT, KL or none")
