"""Shared by the tests of the loss: the backends to run every case on, and the independent float64 oracle.

Every backend usable on a CPU is tested with the same cases: `torch`, `triton` (Triton's CPU interpreter) and the
C++ `cpu` backend (skipped, with the reason `rklu_fast.backends()` gives, until it is built).
"""
import pytest
import torch

import rklu_fast
from rklu_fast.reference import reference_kl

GRAD_RTOL = {torch.float32: 3e-5, torch.bfloat16: 4e-3, torch.float16: 1e-3, torch.float64: 1e-10}


def _param(name):
    status = rklu_fast.backends()[name]
    usable = status["usable"]
    return pytest.param(name, id=name, marks=pytest.mark.skipif(
        not usable, reason=f"backend {name!r} not usable here: {status.get('reason')}"))


CPU_BACKENDS = [_param(name) for name in ("torch", "triton", "cpu")]


def loss_fn(reverse: bool):
    return rklu_fast.reverse_kl_loss if reverse else rklu_fast.forward_kl_loss


def oracle(student, original, augmented=None, alpha=8.0, *, temperature=1.0, reverse=True, valid=None):
    """Per-row float64 losses (0 on invalid rows) and the float64 gradient of their sum w.r.t. the student,
    computed by autograd through `reference_kl` from the SAME (possibly low-precision) inputs upcast."""
    s = student.detach().double().requires_grad_()
    x = s if valid is None else torch.where(valid.unsqueeze(-1), s, 0)  # keep invalid rows' NaN out of the grad
    rows = reference_kl(x, original.double(), None if augmented is None else augmented.double(), alpha,
                        temperature=temperature, reverse=reverse)
    if valid is not None:
        rows = torch.where(valid, rows, torch.zeros_like(rows))
    (grad,) = torch.autograd.grad(rows.sum(), s)
    return rows.detach(), grad


def run(backend, student, original, augmented=None, alpha=8.0, reverse=True, **kw):
    """Per-row losses (reduction='none') and the gradient of their sum, from the loss under test."""
    s = student.detach().clone().requires_grad_()
    rows = loss_fn(reverse)(s, original, augmented, alpha, reduction="none", backend=backend, **kw)
    rows.sum().backward()
    return rows.detach(), s.grad


def assert_rows_close(rows, ref):
    """Per-row |Δloss| ≤ 1e-5·|ref| + 1e-6."""
    err = (rows.double() - ref).abs()
    bound = 1e-5 * ref.abs() + 1e-6
    assert bool((err <= bound).all()), f"row errors {err.tolist()} exceed {bound.tolist()}"


def assert_grad_close(grad, ref, dtype):
    """‖g − g_ref‖ / ‖g_ref‖ within the dtype's tolerance."""
    assert grad.dtype == dtype
    rel = ((grad.double() - ref).norm() / ref.norm()).item()
    assert rel <= GRAD_RTOL[dtype], f"relative gradient error {rel:.3g} > {GRAD_RTOL[dtype]} ({dtype})"
