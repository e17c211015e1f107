"""The public API around the kernels: reductions, row selection, views, autograd, torch.library integration."""
import pytest
import torch

import rklu_fast
import rklu_fast.reference
import rklu_fast.triton_kl
from loss_support import CPU_BACKENDS, assert_grad_close, oracle
from rklu_fast.loss import kl_div


def batch(b=2, t=5, v=37, dtype=torch.float32):
    s = torch.randn(b, t, v).to(dtype).requires_grad_()
    o, a = torch.randn(b, t, v).to(dtype), torch.randn(b, t, v).to(dtype)
    labels = torch.randint(0, v, (b, t))
    labels[0, 1] = labels[1, 3] = -100
    return s, o, a, labels


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reductions_and_num_items_in_batch(backend):
    s, o, a, labels = batch()
    valid = labels != -100
    ref_rows, ref_grad = oracle(s, o, a, 8.0, valid=valid)
    kw = dict(labels=labels, backend=backend)
    rows = rklu_fast.reverse_kl_loss(s, o, a, **kw, reduction="none")
    assert rows.shape == (2, 5) and rows.dtype == torch.float32
    assert torch.equal(rows[~valid], torch.zeros(2))
    total = rklu_fast.reverse_kl_loss(s, o, a, **kw, reduction="sum")
    mean = rklu_fast.reverse_kl_loss(s, o, a, **kw)
    torch.testing.assert_close(total.double(), ref_rows.sum(), rtol=1e-5, atol=1e-6)
    # "mean" divides by the number of valid ROWS, not by N·V as F.kl_div(reduction="mean") does
    torch.testing.assert_close(mean.double(), ref_rows.sum() / valid.sum(), rtol=1e-5, atol=1e-6)
    for num in (20, torch.tensor(20), torch.tensor(20.0)):
        s.grad = None
        loss = rklu_fast.reverse_kl_loss(s, o, a, **kw, num_items_in_batch=num)
        loss.backward()
        torch.testing.assert_close(loss.double(), ref_rows.sum() / 20, rtol=1e-5, atol=1e-7)
        assert_grad_close(s.grad, ref_grad / 20, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_multiplies_by_incoming_gradient(backend):
    s, o, a, labels = batch()
    rows = rklu_fast.reverse_kl_loss(s, o, a, labels=labels, reduction="none", backend=backend)
    weights = torch.rand(2, 5)
    (rows * weights).sum().backward()
    s64 = s.detach().double().requires_grad_()
    ref_rows = rklu_fast.reference.reference_kl(s64, o.double(), a.double(), 8.0)
    ((ref_rows * (labels != -100) * weights.double()).sum()).backward()
    assert_grad_close(s.grad, s64.grad, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_retain_graph_second_backward(backend):
    s, o, a, labels = batch(dtype=torch.bfloat16)
    loss = rklu_fast.reverse_kl_loss(s, o, a, labels=labels, backend=backend)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    s.grad = None
    loss.backward()
    assert torch.equal(s.grad, first), "a second backward with the same incoming gradient is bitwise identical"
    # different incoming gradients: each result is right, and the first one handed out is not altered later
    loss = rklu_fast.reverse_kl_loss(s, o, a, labels=labels, backend=backend)
    (g3,) = torch.autograd.grad(3 * loss, s, retain_graph=True)
    g3_copy = g3.clone()
    (g1,) = torch.autograd.grad(loss, s)
    assert torch.equal(g3, g3_copy)
    torch.testing.assert_close(g1.float() * 3, g3.float(), rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_shifted_views_are_read_without_copy(backend, monkeypatch):
    """`logits[:, :-1]` with `labels[:, 1:]` equals the contiguous copy, and the kernel reads the original memory."""
    full, o_full, a_full, labels = batch(t=6)
    seen = []
    impl = {"torch": rklu_fast.reference, "triton": rklu_fast.triton_kl}.get(backend)
    if impl is not None:
        real = impl.kl_fwd

        def spy(student, original, augmented, *args):
            seen.append((student.untyped_storage().data_ptr(), original.untyped_storage().data_ptr()))
            return real(student, original, augmented, *args)

        monkeypatch.setattr(impl, "kl_fwd", spy)
    for cut in (slice(None, -1), slice(1, None)):
        view = full[:, cut]
        loss = rklu_fast.reverse_kl_loss(view, o_full[:, cut], a_full[:, cut], labels=labels[:, 1:],
                                         backend=backend)
        (g_view,) = torch.autograd.grad(loss, full)
        copy = view.detach().contiguous().requires_grad_()
        expect = rklu_fast.reverse_kl_loss(copy, o_full[:, cut].contiguous(), a_full[:, cut].contiguous(),
                                           labels=labels[:, 1:], backend=backend)
        expect.backward()
        torch.testing.assert_close(loss, expect, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g_view[:, cut], copy.grad, rtol=1e-6, atol=1e-8)
        assert torch.equal(g_view[:, 5 if cut.stop else 0], torch.zeros(2, 37))
    if impl is not None:
        assert seen[0] == (full.untyped_storage().data_ptr(), o_full.untyped_storage().data_ptr())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_btv_equals_nv_and_valid_teacher_rows(backend):
    s, o, a, labels = batch()
    loss_btv = rklu_fast.reverse_kl_loss(s, o, a, labels=labels, backend=backend)
    (g_btv,) = torch.autograd.grad(loss_btv, s)
    s2 = s.detach().reshape(10, 37).requires_grad_()
    loss_nv = rklu_fast.reverse_kl_loss(s2, o.reshape(10, 37), a.reshape(10, 37), labels=labels.reshape(10),
                                        backend=backend)
    loss_nv.backward()
    assert torch.equal(loss_btv, loss_nv) and torch.equal(g_btv.reshape(10, 37), s2.grad)
    # a compact teacher: one row per valid student row, in row-major order, with a mask instead of labels
    valid = labels != -100
    loss_valid = rklu_fast.reverse_kl_loss(s, o[valid], a[valid], mask=valid, teacher_rows="valid",
                                           backend=backend)
    (g_valid,) = torch.autograd.grad(loss_valid, s)
    assert torch.equal(loss_valid, loss_btv) and torch.equal(g_valid, g_btv)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=CPU_BACKENDS[1].marks)])
def test_no_grad_allocates_no_gradient(backend, monkeypatch):
    impl = {"torch": rklu_fast.reference, "triton": rklu_fast.triton_kl}[backend]
    real, calls = impl.kl_fwd, []

    def spy(*args):
        out = real(*args)
        calls.append((args[-1], out[1].numel()))
        return out

    monkeypatch.setattr(impl, "kl_fwd", spy)
    s, o, a, labels = batch()
    with torch.no_grad():
        rklu_fast.reverse_kl_loss(s, o, a, labels=labels, backend=backend)
    rklu_fast.reverse_kl_loss(s.detach(), o, a, labels=labels, backend=backend)
    rklu_fast.reverse_kl_loss(s, o, a, labels=labels, backend=backend)
    assert calls == [(False, 0), (False, 0), (True, 10 * 37)]


def test_auto_gives_the_documented_backends_bits_and_float64_on_float64():
    """docs/loss-api.md: CPU tensors → `cpu` if built, else `torch`; CUDA → `triton`, else `cuda`; fp64 → computed in
    fp64. Checked by outputs: auto's loss and gradient are bitwise those of the named backend."""
    status = rklu_fast.backends()
    assert all(st["usable"] or st["reason"] for st in status.values()), status
    cases = [("cpu", "cpu" if status["cpu"]["usable"] else "torch")]
    if torch.cuda.is_available():
        cases.append(("cuda", "triton" if status["triton"]["usable"] else "cuda"))
    for device, expect in cases:
        s, o, a, labels = (x.to(device) for x in batch())
        s = s.detach().requires_grad_()
        outs = []
        for backend in ("auto", expect):
            rows = rklu_fast.reverse_kl_loss(s, o, a, labels=labels, reduction="none", backend=backend)
            outs.append((rows, *torch.autograd.grad(rows.sum(), s)))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), (device, expect)
    s, o, a, labels = batch(dtype=torch.float64)
    rows = rklu_fast.reverse_kl_loss(s, o, a, labels=labels, reduction="none")
    ref, _ = oracle(s.reshape(10, 37), o.reshape(10, 37), a.reshape(10, 37), valid=(labels != -100).reshape(-1))
    assert rows.dtype == torch.float64
    torch.testing.assert_close(rows.reshape(-1), ref, rtol=1e-12, atol=1e-14)


def test_check_finite():
    s, o, a, labels = batch()
    s.data[1, 3] = float("nan")  # an ignored row: allowed
    rklu_fast.reverse_kl_loss(s, o, a, labels=labels, check_finite=True)
    for i, name in enumerate(("student_logits", "original_logits", "augmented_logits")):
        args = [s, o, a]
        args[i] = args[i].detach().clone()
        args[i][0, 0, 3] = float("nan")
        with pytest.raises(ValueError, match=name):
            rklu_fast.reverse_kl_loss(*args, labels=labels, check_finite=True)
        assert torch.isnan(rklu_fast.reverse_kl_loss(*args, labels=labels))  # unchecked: NaN, never finite
    no_dist = s.detach().clone()
    no_dist[0, 2] = float("-inf")
    with pytest.raises(ValueError, match="entirely -inf"):
        rklu_fast.reverse_kl_loss(no_dist, o, a, labels=labels, check_finite=True)


def test_teacher_logits_helper():
    lo = torch.tensor([[0.0, 1.0, float("-inf"), 2.0]])
    la = torch.tensor([[1.0, 0.5, 3.0, float("-inf")]])
    expect = torch.tensor([[0.0 - 8.0, 1.0, float("-inf"), 2.0]])
    assert torch.equal(rklu_fast.teacher_logits(lo, la, 8.0), expect)
    assert torch.equal(rklu_fast.teacher_logits(lo, None, 8.0), lo)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    """The custom op's schema, fake kernel and autograd registration on each backend (N = 8, V = 37: small for the
    Triton interpreter)."""
    s, o, a, labels = batch(t=4)
    valid = (labels != -100).reshape(-1)
    teacher_row = torch.where(valid, torch.arange(8), -1)
    scale = torch.tensor(0.125)
    full = torch.randn(2, 5, 37, requires_grad=True)
    cases = [(s, o, a, teacher_row, scale, 8.0, 1.0, True, True, backend),
             (full[:, :-1], o, None, teacher_row, scale, 2.0, 0.5, False, True, backend),
             (s.detach(), o[:, 1:], None, torch.where(valid, valid.cumsum(0) - 1, -1), scale, 2.0, 1.0, True,
              False, backend)]
    for args in cases:
        torch.library.opcheck(kl_div, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
def test_torch_compile_matches_eager(backend):
    def step(x, o, a, labels):
        return rklu_fast.reverse_kl_loss(x[:, :-1], o[:, :-1], a[:, :-1], alpha=4.0, labels=labels[:, 1:],
                                         temperature=2.0, backend=backend)

    x, o, a, labels = batch(t=5)
    eager = step(x, o, a, labels)
    (g_eager,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(step, fullgraph=True)(x, o, a, labels)
    (g_compiled,) = torch.autograd.grad(compiled, x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(g_compiled, g_eager)
    valid = (labels[:, 1:] != -100).reshape(-1)
    ref_rows, ref_grad = oracle(*(t[:, :-1].reshape(8, 37) for t in (x, o, a)), 4.0, temperature=2.0, valid=valid)
    torch.testing.assert_close(compiled.double(), ref_rows.sum() / valid.sum(), rtol=1e-5, atol=1e-6)
    assert_grad_close(g_compiled[:, :-1].reshape(8, 37), ref_grad / valid.sum(), torch.float32)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # Triton's interpreter (numpy) on the NaN rows
def test_triton_reads_no_teacher_row_past_the_end():
    """A teacher_row past the teacher's M rows (which only the device sees without a host sync) is never read: its
    row's loss and gradient are NaN. The teacher is a slice of a larger tensor, so a read past it would find data."""
    if not rklu_fast.backends()["triton"]["usable"]:
        pytest.skip(rklu_fast.backends()["triton"]["reason"])
    student, memory = torch.randn(5, 40), torch.randn(6, 40)
    teacher = memory[:2]
    loss, grad = rklu_fast.triton_kl.kl_fwd(student, teacher, None, torch.tensor([0, 2, 1, 5, -1]),
                                            torch.tensor(1.0), 8.0, 1.0, True, True)
    ref, ref_grad = oracle(student[[0, 2]], teacher[[0, 1]])
    torch.testing.assert_close(loss[[0, 2]].double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[[0, 2]].double(), ref_grad, rtol=1e-4, atol=1e-6)
    assert loss[[1, 3]].isnan().all() and grad[[1, 3]].isnan().all()
    assert loss[4] == 0 and (grad[4] == 0).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("n_valid", [7, 3], ids=["more-valid-rows", "fewer-valid-rows"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_compact_teacher_of_wrong_length_is_never_silent(backend, n_valid):
    """Under torch.compile the row count is not checked in Python (that would sync a GPU): every backend either
    refuses the call or gives NaN, never a finite loss read from misaligned or foreign rows."""
    student = torch.randn(2, 4, 37, requires_grad=True)
    labels = torch.zeros(2, 4, dtype=torch.long)
    labels.view(-1)[n_valid:] = -100
    teacher = torch.randn(10, 37)[:5]  # 5 rows; a read past them would find data

    def step(s, o, lab):
        return rklu_fast.reverse_kl_loss(s, o, labels=lab, teacher_rows="valid", backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    if backend == "triton":
        assert compiled(student, teacher, labels).isnan()
    else:  # cpu: the C++ op names teacher_row; torch: index_select refuses the index
        with pytest.raises((RuntimeError, IndexError), match="teacher_row|index out of range"):
            compiled(student, teacher, labels)


def test_autocast_bf16():
    head = torch.nn.Linear(16, 37)
    hidden = torch.randn(10, 16)
    teacher = torch.randn(10, 37)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(hidden)
        assert logits.dtype == torch.bfloat16
        loss = rklu_fast.reverse_kl_loss(logits, teacher)
    loss.backward()
    expect_rows, _ = oracle(logits.detach(), teacher)
    torch.testing.assert_close(loss.double(), expect_rows.mean(), rtol=1e-5, atol=1e-6)
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_irregular_layouts_fall_back_to_copies(backend):
    """Rows not on a regular grid, a non-unit vocab stride, and teachers of different layouts: same results."""
    big = torch.randn(5, 4, 37, requires_grad=True)
    student = big.transpose(0, 1)[:, 1:4]  # [4, 3, 37], strides (37, 148, 1): 37 is no multiple of 148, copied
    original = torch.randn(37, 4, 3).permute(1, 2, 0)  # vocab stride != 1: copied before the op
    augmented = torch.randn(4, 4, 37)[:, :-1]  # a shifted view, unlike `original`
    loss = rklu_fast.reverse_kl_loss(student, original, augmented, backend=backend)
    (g,) = torch.autograd.grad(loss, big)
    ref_rows, ref_grad = oracle(student.detach(), original, augmented)
    torch.testing.assert_close(loss.double(), ref_rows.mean(), rtol=1e-5, atol=1e-6)
    assert_grad_close(g.transpose(0, 1)[:, 1:4], ref_grad / ref_rows.numel(), torch.float32)
    assert torch.equal(g[0], torch.zeros_like(g[0]))
