"""Per-row partial statistics of a (student, teacher) pair over a slice of the vocabulary, their merge, and the
KL that follows from them. This is the vocab-parallel building block: each rank holding a vocab shard computes
`partial_stats` on its slice, the statistics are merged (an all-gather of six numbers per row, then `merge`), and
`kl_from_stats` gives the same per-row KL as the unsharded computation.

With `a = z_student / T` and `b = z_teacher / T` (the teacher already formed by `teacher_logits`):

    m_s = max a,  S_s = Σ e^{a − m_s},  W_s = Σ e^{a − m_s} (a − b)      (the reverse-KL numerator)
    m_t = max b,  S_t = Σ e^{b − m_t},  W_t = Σ e^{b − m_t} (b − a)      (the forward-KL numerator)

    KL(p‖q) = W_s/S_s − (m_s − m_t) − log(S_s/S_t),   KL(q‖p) = W_t/S_t − (m_t − m_s) − log(S_t/S_s)

(written with differences so that a KL of 1e-4 is not lost to the cancellation of two log-sum-exps near log V).
−inf rules: an entry whose own logit is −inf contributes 0 to its numerator; a finite logit against −inf on the
other side contributes +inf. A row with no finite entry of the distribution has S = 0 and a NaN KL.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

NEG_INF = float("-inf")


class RowStats(NamedTuple):
    """Statistics of each row over a vocab slice; every field has the row shape."""

    m_s: torch.Tensor
    s_s: torch.Tensor
    w_s: torch.Tensor
    m_t: torch.Tensor
    s_t: torch.Tensor
    w_t: torch.Tensor


def _side(x: torch.Tensor, other: torch.Tensor):
    """(max, Σ e^{x−max}, Σ e^{x−max}(x − other)) over the last dim, with the −inf rules."""
    finite = x != NEG_INF  # NaN counts as present, so it propagates
    m = x.amax(dim=-1)
    m_safe = torch.where(m == NEG_INF, torch.zeros_like(m), m)
    e = torch.where(finite, torch.exp(torch.where(finite, x, 0) - m_safe.unsqueeze(-1)), 0)
    diff = torch.where(finite, x - other, 0)  # own −inf: 0 (no 0·inf)
    # A finite logit against −inf gives +inf, even where e^{x−max} underflows to 0 (0·inf would be NaN).
    terms = torch.where(finite & (other == NEG_INF), float("inf"), e * diff)
    return m, e.sum(-1), terms.sum(-1)


def partial_stats(a: torch.Tensor, b: torch.Tensor) -> RowStats:
    """Statistics of scaled student logits `a` and scaled teacher logits `b` (same shape `[..., V_slice]`)."""
    m_s, s_s, w_s = _side(a, b)
    m_t, s_t, w_t = _side(b, a)
    return RowStats(m_s, s_s, w_s, m_t, s_t, w_t)


def _merge_side(m1, s1, w1, m2, s2, w2):
    m = torch.maximum(m1, m2)
    m_safe = torch.where(m == NEG_INF, torch.zeros_like(m), m)
    # A side whose max is −inf holds nothing (S = W = 0): its factor is irrelevant, keep it finite.
    f1 = torch.where(m1 == NEG_INF, 0, torch.exp(m1 - m_safe))
    f2 = torch.where(m2 == NEG_INF, 0, torch.exp(m2 - m_safe))
    # A +inf numerator stays +inf even where its factor underflows to 0 (a max jump past ~88 in fp32): not inf·0.
    return m, s1 * f1 + s2 * f2, _rescaled(w1, f1) + _rescaled(w2, f2)


def _rescaled(w, f):
    return torch.where(w == float("inf"), w, w * f)


def merge(x: RowStats, y: RowStats) -> RowStats:
    """Combine the statistics of two disjoint vocab slices of the same rows (associative and commutative)."""
    m_s, s_s, w_s = _merge_side(x.m_s, x.s_s, x.w_s, y.m_s, y.s_s, y.w_s)
    m_t, s_t, w_t = _merge_side(x.m_t, x.s_t, x.w_t, y.m_t, y.s_t, y.w_t)
    return RowStats(m_s, s_s, w_s, m_t, s_t, w_t)


def kl_from_stats(st: RowStats, reverse: bool = True) -> torch.Tensor:
    """Per-row KL(p_student ‖ p_teacher) if `reverse`, else KL(p_teacher ‖ p_student)."""
    if reverse:
        return st.w_s / st.s_s - (st.m_s - st.m_t) - torch.log(st.s_s / st.s_t)
    return st.w_t / st.s_t - (st.m_t - st.m_s) - torch.log(st.s_t / st.s_s)
