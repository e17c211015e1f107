"""The plain-PyTorch implementation: the formulas of the loss, stated once for Python.

* `teacher_logits` (with `augmented_shift`: the teacher forms) and `reference_kl` are ordinary
  autograd-differentiable functions (float64-capable): the oracle the tests compare every backend with, and what
  `torch.autograd.gradcheck` checks.
* `kl_fwd` / `kl_scale_grad_` are the `torch` backend of the kernel contract (docs/kernel-contract.md): they
  materialise `[N, V]` temporaries, compute the loss from the row statistics of `rklu_fast.row_stats` and write
  the analytical gradient, in float64 when any input is float64 and float32 otherwise.
"""
from __future__ import annotations

from typing import Optional

import torch

from rklu_fast.row_stats import NEG_INF, kl_from_stats, partial_stats


TEACHER_FORMS = ("logits", "logprobs", "centered_mean", "centered_median")


def augmented_shift(original_logits: torch.Tensor, augmented_logits: torch.Tensor, form: str) -> torch.Tensor:
    """The per-row scalar `c` (shape `[..., 1]`, float32 at least) of a teacher form `l_o − α·relu(l_aug − c − l_o)`.

    - `logits`: c = 0 (the paper's teacher: raw logits, not invariant to a softmax shift of `l_aug`);
    - `logprobs`: c = LSE(l_aug) − LSE(l_o) (the teacher compares log-softmaxes);
    - `centered_mean` / `centered_median`: c = mean / median of `l_aug − l_o` over the row's entries where both
      are finite (the augmented model's typical drift is not penalised).
    A row whose `c` is not finite (no finite entry, NaN) is a ValueError (checked here; a host sync).
    """
    if form not in TEACHER_FORMS:
        raise ValueError(f"teacher_form: must be one of {TEACHER_FORMS}, got {form!r}")
    dtype = torch.promote_types(torch.promote_types(original_logits.dtype, augmented_logits.dtype), torch.float32)
    lo, la = original_logits.to(dtype), augmented_logits.to(dtype)
    if form == "logits":
        return torch.zeros(lo.shape[:-1] + (1,), dtype=dtype, device=lo.device)
    if form == "logprobs":
        c = torch.logsumexp(la, -1, keepdim=True) - torch.logsumexp(lo, -1, keepdim=True)
    else:
        both = torch.isfinite(lo) & torch.isfinite(la)
        d = torch.where(both, la - lo, torch.nan)
        c = d.nanmean(-1, keepdim=True) if form == "centered_mean" else _nan_median(d)
    if not bool(torch.isfinite(c).all()):
        raise ValueError(f"teacher_form={form!r}: a row's shift is not finite (a row with no finite entry in both "
                         "the original's and the augmented model's logits, or NaN logits)")
    return c


def _nan_median(d: torch.Tensor) -> torch.Tensor:
    """Median of each row's non-NaN entries, the mean of the two middle ones for an even count (as numpy's;
    ``torch.nanmedian`` takes the lower one); NaN for a row with none."""
    k = (~torch.isnan(d)).sum(-1, keepdim=True)
    s = d.sort(-1).values  # NaN sorts last
    lo_i, hi_i = ((k - 1) // 2).clamp(min=0), (k // 2).clamp(max=d.shape[-1] - 1)
    mid = (s.gather(-1, lo_i) + s.gather(-1, hi_i)) / 2
    return torch.where(k > 0, mid, torch.nan)


def shifted_augmented(original_logits: torch.Tensor, augmented_logits: torch.Tensor, form: str) -> torch.Tensor:
    """`l_aug − c` of a teacher form (`augmented_logits` itself, untouched, for `logits`; float32 at least else)."""
    if form == "logits":
        return augmented_logits
    c = augmented_shift(original_logits, augmented_logits, form)
    return augmented_logits.to(c.dtype) - c


def teacher_logits(original_logits: torch.Tensor, augmented_logits: Optional[torch.Tensor],
                   alpha: float, form: str = "logits") -> torch.Tensor:
    """`l_t = l_o − α·relu(l_aug − c − l_o)` (`c` of the teacher `form`, 0 for the paper's `logits`), and `−inf`
    wherever `l_o = −inf`; `l_o` itself without `augmented`.

    Computed in the wider of the two dtypes (float32 at least). NaN in either input stays NaN.
    """
    if augmented_logits is not None:
        augmented_logits = shifted_augmented(original_logits, augmented_logits, form)
    dtype = torch.promote_types(original_logits.dtype, torch.float32)
    if augmented_logits is not None:
        dtype = torch.promote_types(dtype, augmented_logits.dtype)
    lo = original_logits.to(dtype)
    if augmented_logits is None:
        return lo
    d = augmented_logits.to(dtype) - lo
    penalty = torch.where(d < 0, torch.zeros_like(d), d)  # relu that keeps NaN
    return torch.where(lo == NEG_INF, lo, lo - alpha * penalty)


def reference_kl(student_logits: torch.Tensor, original_logits: torch.Tensor,
                 augmented_logits: Optional[torch.Tensor] = None, alpha: float = 8.0, *,
                 temperature: float = 1.0, reverse: bool = True) -> torch.Tensor:
    """Per-row KL over the last dim, differentiable w.r.t. `student_logits` (the oracle; shapes `[..., V]`).

    reverse: `Σ p_θ (log p_θ − log p_t)`; forward: `Σ p_t (log p_t − log p_θ)`, with `p = softmax(z/T)`.
    A term whose own probability is 0 is 0; a positive probability against a zero one gives +inf.
    """
    t = teacher_logits(original_logits, augmented_logits, alpha)
    dtype = torch.promote_types(student_logits.dtype, t.dtype)
    logp = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    logq = torch.log_softmax(t.to(dtype) / temperature, dim=-1)
    if not reverse:
        logp, logq = logq, logp
    absent = logp == NEG_INF
    logp = torch.where(absent, 0, logp)  # keeps the gradient finite (no 0·inf) on the masked-out terms
    terms = logp.exp() * (logp - logq)
    return torch.where(absent, torch.zeros_like(terms), terms).sum(-1)


# ---------------------------------------------------------------- the `torch` backend of the kernel contract
def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def kl_fwd(student: torch.Tensor, original: torch.Tensor, augmented: Optional[torch.Tensor],
           teacher_row: torch.Tensor, grad_scale: torch.Tensor, alpha: float, inv_temperature: float,
           reverse: bool, compute_grad: bool):
    """Contract `kl_fwd`: per-row loss (`[N]`, grad_scale's dtype) and `grad_scale·∂loss_row/∂student` (student
    dtype) or `[0]`."""
    n, v = student.shape
    dtype = _compute_dtype(student, original, augmented)
    valid = teacher_row >= 0
    if original.shape[0] == 0:  # compact teacher with no valid row: nothing to compare with
        valid = torch.zeros_like(valid)
        idx = None
    else:
        idx = teacher_row.clamp(min=0)
    a = student.to(dtype) * inv_temperature
    if idx is None:
        b = torch.zeros_like(a)
    else:
        t = teacher_logits(original.index_select(0, idx),
                           None if augmented is None else augmented.index_select(0, idx), alpha)
        b = t.to(dtype) * inv_temperature
    stats = partial_stats(a, b)
    kl = kl_from_stats(stats, reverse)
    loss_rows = torch.where(valid, kl, 0).to(grad_scale.dtype)
    if not compute_grad:
        return loss_rows, student.new_empty(0)
    m_s, s_s = stats.m_s.unsqueeze(-1), stats.s_s.unsqueeze(-1)
    m_t, s_t = stats.m_t.unsqueeze(-1), stats.s_t.unsqueeze(-1)
    finite_a = a != NEG_INF
    p = torch.where(finite_a, torch.exp(torch.where(finite_a, a, 0) - m_s) / s_s, 0)
    if reverse:  # p·(log p − log q − KL)/T, with log p − log q = (a − b) − (m_s − m_t) − log(S_s/S_t)
        c = (m_s - m_t) + torch.log(s_s / s_t) + kl.unsqueeze(-1)
        g = torch.where(finite_a, p * (torch.where(finite_a, a - b, 0) - c), 0)
    else:  # (p − q)/T
        finite_b = b != NEG_INF
        q = torch.where(finite_b, torch.exp(torch.where(finite_b, b, 0) - m_t) / s_t, 0)
        g = p - q
    scale = grad_scale.to(dtype) * inv_temperature
    g = torch.where(valid.unsqueeze(-1), g * scale, 0)
    return loss_rows, g.to(student.dtype).contiguous()


def kl_scale_grad_(grad: torch.Tensor, applied: torch.Tensor, grad_output_rows: torch.Tensor) -> None:
    """Contract `kl_scale_grad_`: rescale each row of `grad` from `applied[r]` to `grad_output_rows[r]` in place."""
    g = grad_output_rows.to(applied.dtype)
    ratio = torch.where(g != applied, g / applied, 1.0)  # exactly 1 where nothing changes: bitwise stable
    grad.copy_(grad.to(torch.promote_types(grad.dtype, ratio.dtype)) * ratio.unsqueeze(-1))
    applied.copy_(g)
