"""RKLU: reverse-KL distillation towards the unlearning teacher (Wang et al., NAACL 2025; arXiv 2406.01983).

Per counted target position, with the frozen original's logits ``l_o`` and the augmented model's ``l_aug``::

    l_t = l_o − α·relu(l_aug − l_o)              (the teacher: tokens the forget set boosted are pushed down)
    loss = Σ_v p_θ(v)·(log p_θ(v) − log p_t(v))   (KL(p_θ ‖ p_t): the student is the FIRST argument)

summed over the step's counted targets and divided by their number.  The fused op
``rklu_fast.reverse_kl_loss`` computes it without materialising probabilities.
"""
from __future__ import annotations

import torch

import rklu_fast
from rklu_fast.data.collate import target_mask
from rklu_fast.train.methods.base import Method, StepCounts, answer_prob_sum


class RKLU(Method):
    name = "rklu"
    summary = "reverse KL KL(p_θ ‖ p_t) to the teacher l_o − α·relu(l_aug − l_o) on the forget answers"
    paper = "Wang et al., RKLD: Reverse KL-Divergence-based Knowledge Distillation for Unlearning, NAACL 2025"
    needs = frozenset({"teacher"})
    uses = ("alpha", "teacher_form")
    fused_linear = True
    reverse = True

    def loss(self, student, batch, frozen, counts: StepCounts, want_stats=False):
        b = batch["forget"]
        t = frozen.teacher(b)
        kwargs = dict(alpha=self.ctx.alpha, labels=b["labels"][:, 1:], num_items_in_batch=counts.tokens["forget"],
                      teacher_rows=t.rows, backend=self.ctx.backend)
        if getattr(student, "fused", False):  # from hidden states and the LM head: no [B, T, V] student logits
            hidden = student.hidden(b)
            kl = rklu_fast.fused_linear_reverse_kl_loss if self.reverse else rklu_fast.fused_linear_forward_kl_loss
            loss = kl(hidden[:, :-1], student.head.weight, t.original, t.augmented, bias=student.head.bias, **kwargs)
            logits = None
        else:
            logits = student(b)
            kl = rklu_fast.reverse_kl_loss if self.reverse else rklu_fast.forward_kl_loss
            loss = kl(logits[:, :-1], t.original, t.augmented, **kwargs)
        stats = {}
        if want_stats:  # logging steps only: the fused path forms the logits here, without gradient
            if logits is None:
                with torch.no_grad():
                    logits = student.head(hidden.detach())
            stats = {"forget_prob": answer_prob_sum(logits, b["labels"]),
                     "teacher_entropy": teacher_entropy_sum(t, b["labels"], self.ctx.alpha)}
        return loss, stats


@torch.no_grad()
def teacher_entropy_sum(t, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """Σ over sequences of the mean entropy (nats) of the teacher over the sequence's counted targets (a collapse
    detector: a teacher of entropy ≈ 0 puts all mass on one token)."""
    mask = target_mask(labels)
    original, augmented = t.original, t.augmented
    if t.rows == "all":  # [B, T-1, V] positions → the counted rows
        original = original[mask]
        augmented = augmented[mask] if augmented is not None else None
    logq = torch.log_softmax(rklu_fast.teacher_logits(original, augmented, alpha).float(), dim=-1)
    entropy = -(logq.exp() * logq.nan_to_num(neginf=0.0)).sum(-1)
    seq = mask.nonzero()[:, 0]
    per_seq = torch.zeros(len(labels), device=entropy.device).index_add_(0, seq, entropy)
    return (per_seq / mask.sum(1).clamp(min=1)).sum()
