"""Retain terms, shared by every training method: ``unlearn.retain_term`` ∈ {``RT``, ``KL``, ``none``}, weighted by
``unlearn.retain_weight`` (λ, default 1).

- ``RT``: NLL of the retain answers, summed over counted targets ÷ their number in the step.
- ``KL``: forward KL(p_o ‖ p_θ) from the frozen original to the student.  ``unlearn.retain_kl_positions``:
  ``answer`` (default): the retain answers' counted targets, ÷ their number in the step;
  ``all``: every position of every padded retain sequence (prompt, padding and last position included) ÷ the
  number of positions (Σ B·T over the step's micro-batches).  ``all`` is TOFU's code (``kl_div(...,
  reduction="batchmean")`` on ``[B·T, V]``) and open-unlearning's; with one micro-batch per step the two are equal,
  with accumulation TOFU averages per-micro-batch means instead.
"""
from __future__ import annotations

import rklu_fast
from rklu_fast.train.methods.base import StepCounts, token_nll_sum

KL_POSITIONS = ("answer", "all")


class RetainNLL:
    """RT: NLL of the retain answers."""
    name, needs = "RT", frozenset()

    def loss(self, student, batch, frozen, counts: StepCounts):
        return token_nll_sum(student(batch), batch["labels"]) / counts.retain_tokens


class RetainKL:
    """KL: forward KL(p_o ‖ p_θ) to the frozen original on the retain set."""
    name, needs = "KL", frozenset({"original"})

    def __init__(self, backend: str = "auto", positions: str = "answer"):
        if positions not in KL_POSITIONS:
            raise ValueError(f"unlearn.retain_kl_positions: must be one of {KL_POSITIONS}, got {positions!r}")
        self.backend, self.positions = backend, positions

    def loss(self, student, batch, frozen, counts: StepCounts):
        logits, original = student(batch), frozen.original_logits(batch)
        if self.positions == "all":
            return rklu_fast.forward_kl_loss(logits, original, None, num_items_in_batch=counts.retain_positions,
                                             backend=self.backend)
        return rklu_fast.forward_kl_loss(logits[:, :-1], original[:, :-1], None, labels=batch["labels"][:, 1:],
                                         num_items_in_batch=counts.retain_tokens, backend=self.backend)


RETAIN_TERMS = ("RT", "KL", "none")


def make_retain_term(name: str, backend: str = "auto", kl_positions: str = "answer"):
    """``RT``, ``KL``, or ``None`` for ``none``."""
    if name == "RT":
        return RetainNLL()
    if name == "KL":
        return RetainKL(backend, kl_positions)
    if name == "none":
        return None
    raise ValueError(f"unlearn.retain_term: unknown retain term {name!r}; choose one of {list(RETAIN_TERMS)}")
