"""Shared by the tests of the loss: the backends to run every case on, and the independent float64 oracle.

Every backend is tested with the same cases: on CPU tensors `torch`, `triton` (Triton's CPU interpreter) and the
C++ `cpu` backend; on a GPU machine also `triton` and `cuda` on CUDA tensors. A backend that cannot run here is
skipped with the reason `rklu_fast.backends()` gives (e.g. how to build it).
"""
import pytest
import torch

import rklu_fast
from rklu_fast.backends import resolve
from rklu_fast.reference import reference_kl

GRAD_RTOL = {torch.float32: 3e-5, torch.bfloat16: 4e-3, torch.float16: 1e-3, torch.float64: 1e-10}


def _param(name, device="cpu"):
    """A pytest param for backend `name` on `device`, skipped with the reason when it cannot run here."""
    reason = None
    if device == "cuda" and not torch.cuda.is_available():
        reason = "needs a CUDA GPU"
    else:
        try:
            resolve(name, torch.device(device))
        except ValueError as err:
            reason = str(err)
    case = name if device == "cpu" else (name, device)
    return pytest.param(case, id=name if device == "cpu" else f"{name}-{device}",
                        marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


# Backend names for tensors on the CPU (the API tests), and (name, device) cases for the numerics tests,
# which also run the GPU backends when there is a GPU.
CPU_BACKENDS = [_param(name) for name in ("torch", "triton", "cpu")]
ALL_BACKENDS = CPU_BACKENDS + [_param("triton", "cuda"), _param("cuda", "cuda")]


def split_case(case):
    """(backend name, device) of a case from ALL_BACKENDS."""
    return (case, "cpu") if isinstance(case, str) else case


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


def run(case, student, original, augmented=None, alpha=8.0, reverse=True, **kw):
    """Per-row losses (reduction='none') and the gradient of their sum from the loss under test, on the case's
    device (tensor keyword arguments move along), returned on the CPU."""
    backend, device = split_case(case)
    s = student.detach().to(device).requires_grad_()
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    rows = loss_fn(reverse)(s, original.to(device), None if augmented is None else augmented.to(device), alpha,
                            reduction="none", backend=backend, **kw)
    rows.sum().backward()
    return rows.detach().cpu(), s.grad.cpu()


def assert_rows_close(rows, ref, atol=1e-6):
    """Per-row |Δloss| ≤ 1e-5·|ref| + atol."""
    err = (rows.double() - ref).abs()
    bound = 1e-5 * ref.abs() + atol
    assert bool((err <= bound).all()), f"row errors {err.tolist()} exceed {bound.tolist()}"


def assert_grad_close(grad, ref, dtype):
    """‖g − g_ref‖ / ‖g_ref‖ within the dtype's tolerance."""
    assert grad.dtype == dtype
    rel = ((grad.double() - ref).norm() / ref.norm()).item()
    assert rel <= GRAD_RTOL[dtype], f"relative gradient error {rel:.3g} > {GRAD_RTOL[dtype]} ({dtype})"
