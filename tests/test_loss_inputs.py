"""Bad input gives a clear ValueError/TypeError that names the argument."""
import pytest
import torch

import rklu_fast
from loss_support import CPU_BACKENDS

S = torch.randn(2, 3, 11, requires_grad=True)
O = torch.randn(2, 3, 11)
A = torch.randn(2, 3, 11)
LABELS = torch.zeros(2, 3, dtype=torch.long)


def call(**changes):
    kw = dict(student_logits=S, original_logits=O, augmented_logits=A, alpha=8.0)
    kw.update(changes)
    return rklu_fast.reverse_kl_loss(**kw)


@pytest.mark.parametrize("changes,error,pattern", [
    (dict(original_logits=torch.randn(2, 4, 11), augmented_logits=None), ValueError, "original_logits has 8 rows"),
    (dict(augmented_logits=torch.randn(2, 3, 12)), ValueError, "augmented_logits has vocab size 12"),
    (dict(original_logits=torch.randn(2, 3, 10)), ValueError, "original_logits has vocab size 10"),
    (dict(augmented_logits=torch.randn(6, 11)), ValueError, "augmented_logits has shape"),
    (dict(student_logits=torch.randn(11)), ValueError, "student_logits must be"),
    (dict(student_logits=torch.zeros(2, 3, 11, dtype=torch.long)), TypeError, "student_logits must be bfloat16"),
    (dict(original_logits=torch.zeros(2, 3, 11, dtype=torch.int32)), TypeError, "original_logits must be"),
    (dict(original_logits=O.numpy()), TypeError, "original_logits must be a torch.Tensor"),
    (dict(original_logits=O.to("meta")), ValueError, "original_logits is on meta"),
    (dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, "labels must have the row shape"),
    (dict(labels=torch.zeros(2, 3)), TypeError, "labels must be an integer tensor"),
    (dict(labels=LABELS.to("meta")), ValueError, "labels is on meta"),
    (dict(mask=torch.ones(6, dtype=torch.bool)), ValueError, "mask must have the row shape"),
    (dict(mask=torch.ones(2, 3)), TypeError, "mask must be a bool tensor"),
    (dict(reduction="batchmean"), ValueError, "reduction must be one of"),
    (dict(backend="jax"), ValueError, "backend must be"),
    (dict(teacher_rows="some"), ValueError, "teacher_rows must be"),
    (dict(temperature=0.0), ValueError, "temperature must be"),
    (dict(alpha="8"), TypeError, "alpha must be"),
    (dict(num_items_in_batch=2.5), TypeError, "num_items_in_batch must be"),
    (dict(num_items_in_batch=torch.ones(2)), TypeError, "num_items_in_batch must be"),
    (dict(num_items_in_batch=4, reduction="sum"), ValueError, "num_items_in_batch replaces"),
    (dict(original_logits=O.clone().requires_grad_()), ValueError, "original_logits requires grad"),
    (dict(augmented_logits=A.clone().requires_grad_()), ValueError, "augmented_logits requires grad"),
    (dict(original_logits=O[:, :2], augmented_logits=A[:, :2], labels=LABELS, teacher_rows="valid"),
     ValueError, "6 valid rows, 4 teacher rows"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch must be > 0 .*got 0"),
    (dict(num_items_in_batch=-3), ValueError, "num_items_in_batch must be > 0 .*got -3"),
    (dict(num_items_in_batch=torch.tensor(0)), ValueError, "num_items_in_batch must be > 0 .*got 0"),
    (dict(num_items_in_batch=torch.tensor(-3.0)), ValueError, "num_items_in_batch must be > 0 .*got -3"),
    (dict(student_logits=torch.randn(2, 3, 0), original_logits=torch.randn(2, 3, 0), augmented_logits=None),
     ValueError, r"student_logits has vocab size 0 \(shape \(2, 3, 0\)\)"),
    (dict(student_logits=S.reshape(1, 2, 3, 11), original_logits=O.reshape(6, 11), augmented_logits=None),
     ValueError, r"student_logits must be \[N, V\] or \[B, T, V\], got shape \(1, 2, 3, 11\)"),
    (dict(original_logits=O.reshape(1, 2, 3, 11), augmented_logits=None),
     ValueError, r"original_logits must be \[N, V\] or \[B, T, V\], got shape \(1, 2, 3, 11\)"),
])
def test_bad_input(changes, error, pattern):
    with pytest.raises(error, match=pattern):
        call(**changes)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 11), (0, 5, 11), (3, 0, 11)], ids=str)
def test_no_rows_gives_zero_loss_and_zero_gradient(backend, shape):
    s = torch.randn(shape, requires_grad=True)
    for reduction in ("mean", "sum"):
        loss = rklu_fast.reverse_kl_loss(s, torch.randn(shape), torch.randn(shape), reduction=reduction,
                                         backend=backend)
        loss.backward()
        assert loss.item() == 0.0
        assert s.grad is not None and torch.equal(s.grad, torch.zeros(shape))
        s.grad = None
    rows = rklu_fast.forward_kl_loss(s, torch.randn(shape), reduction="none", backend=backend)
    assert rows.shape == shape[:-1]
    (g,) = torch.autograd.grad(rows.sum(), s)
    assert torch.equal(g, torch.zeros(shape))


@pytest.mark.parametrize("name", ["cpu", "cuda", "triton"])
def test_unusable_backend_says_why(name):
    status = rklu_fast.backends()[name]
    if status["usable"]:
        pytest.skip(f"{name} is usable here")
    with pytest.raises(ValueError, match=f"backend='{name}' is not usable here") as info:
        call(backend=name)
    if not status["built"] and name != "triton":
        assert "pip install --no-build-isolation" in str(info.value)
