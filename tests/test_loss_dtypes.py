"""Dtypes through the public API: float64 is computed in float64 (backend="auto" takes the torch backend), mixed
teacher dtypes follow docs/loss-api.md, and a fused backend asked for a float64 input says which argument and
which backend to use."""
import pytest
import torch

import rklu_fast
from loss_support import CPU_BACKENDS, assert_grad_close, assert_rows_close, loss_fn, oracle

F64 = torch.float64


def inputs(dtypes, b=2, t=4, v=53):
    """Student (requires grad), original, augmented in the given dtypes; labels with two ignored rows."""
    s, o, a = (torch.randn(b, t, v, dtype=F64) * 2 for _ in range(3))
    labels = torch.randint(0, v, (b, t))
    labels[0, 1] = labels[1, 3] = -100
    s, o, a = (x.to(dt) for x, dt in zip((s, o, a), dtypes))
    return s.requires_grad_(), o, a, labels


def float64_truth(s, o, a, labels, reverse, weights=None):
    """Per-row float64 losses and the gradient of Σ weights·rows from the definition (log_softmax in float64)."""
    valid = labels != -100
    rows, grad = oracle(s.reshape(-1, s.shape[-1]), o.reshape(-1, o.shape[-1]), a.reshape(-1, a.shape[-1]), 8.0,
                        reverse=reverse, valid=valid.reshape(-1))
    return rows.view(valid.shape), grad.view(s.shape), valid


@pytest.mark.parametrize("reverse", [True, False], ids=["reverse", "forward"])
@pytest.mark.parametrize("dtypes", [(F64, F64, F64), (torch.float32, F64, F64), (torch.float32, torch.float32, F64),
                                    (torch.bfloat16, F64, torch.float32)],
                         ids=["all-f64", "f32-student-f64-teachers", "f64-augmented", "bf16-student-f64-original"])
def test_float64_anywhere_is_computed_in_float64_by_auto(dtypes, reverse):
    s, o, a, labels = inputs(dtypes)
    rows_ref, grad_ref, valid = float64_truth(s, o, a, labels, reverse)
    fn = loss_fn(reverse)
    rows = fn(s, o, a, labels=labels, reduction="none")
    assert rows.dtype == F64
    torch.testing.assert_close(rows, rows_ref, rtol=1e-12, atol=1e-13)
    # mean with an explicit divisor: 1/7 in float64, not a float32 1/7 (relative error 3e-8)
    loss = fn(s, o, a, labels=labels, num_items_in_batch=7)
    torch.testing.assert_close(loss, rows_ref.sum() / 7, rtol=1e-12, atol=1e-13)
    loss.backward()
    assert s.grad.dtype == s.dtype
    if s.dtype == F64:
        torch.testing.assert_close(s.grad, grad_ref / 7, rtol=1e-10, atol=1e-13)
    else:  # computed in float64, rounded once to the student's dtype: within one ulp of the rounded truth
        torch.testing.assert_close(s.grad, (grad_ref / 7).to(s.dtype), rtol=torch.finfo(s.dtype).eps, atol=1e-30)


def test_float64_backward_scales_by_a_float64_incoming_gradient():
    s, o, a, labels = inputs((F64, F64, F64))
    rows_ref, _, valid = float64_truth(s, o, a, labels, True)
    weights = torch.rand(2, 4, dtype=F64) + 0.1
    rows = rklu_fast.reverse_kl_loss(s, o, a, labels=labels, reduction="none")
    (rows * weights).sum().backward()
    s64 = s.detach().clone().requires_grad_()
    ref = rklu_fast.reference.reference_kl(s64, o, a, 8.0)
    (torch.where(valid, ref, 0) * weights).sum().backward()
    torch.testing.assert_close(s.grad, s64.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.float16, torch.bfloat16),
                                    (torch.bfloat16, torch.float32, None)],
                         ids=["f32-student-bf16-teachers", "f32-student-f16-bf16", "bf16-student-f32-original"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_low_precision_teachers_are_read_as_given(backend, dtypes):
    """No fp64 input: computed in fp32 from each tensor's own values (the oracle upcasts the same values)."""
    s, o, a, labels = inputs((dtypes[0], dtypes[1], dtypes[2] or dtypes[1]))
    a = None if dtypes[2] is None else a
    valid = (labels != -100).reshape(-1)
    rows = rklu_fast.reverse_kl_loss(s, o, a, labels=labels, reduction="none", backend=backend)
    rows.sum().backward()
    flat = [None if x is None else x.reshape(-1, x.shape[-1]) for x in (s, o, a)]
    ref_rows, ref_grad = oracle(*flat, 8.0, valid=valid)
    assert rows.dtype == torch.float32 and s.grad.dtype == s.dtype
    assert_rows_close(rows.reshape(-1), ref_rows)
    assert_grad_close(s.grad.reshape(-1, s.shape[-1]), ref_grad, s.dtype)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("which", ["student_logits", "original_logits", "augmented_logits"])
def test_fused_backend_refuses_float64_by_name(which, backend, monkeypatch):
    dtypes = [torch.float32] * 3
    dtypes[["student_logits", "original_logits", "augmented_logits"].index(which)] = F64
    s, o, a, labels = inputs(dtypes)

    def must_not_run(*args):
        raise AssertionError("the kernel was called")

    from rklu_fast import cpp_backend, triton_kl
    for mod in (cpp_backend, triton_kl):
        monkeypatch.setattr(mod, "kl_fwd", must_not_run)
    expect = (f"{which} is float64; backend '{backend}' takes float32/bfloat16/float16: "
              "use backend='torch' or 'auto'")
    with pytest.raises(ValueError) as info:
        rklu_fast.reverse_kl_loss(s, o, a, labels=labels, backend=backend)
    assert str(info.value) == expect
