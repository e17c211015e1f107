"""Numerics of every CPU backend against the independent float64 oracle (fresh random inputs each run)."""
import math

import pytest
import torch

import rklu_fast
from loss_support import ALL_BACKENDS, assert_grad_close, assert_rows_close, oracle, run, split_case
from rklu_fast.reference import reference_kl
from rklu_fast.row_stats import kl_from_stats, merge, partial_stats

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INF = float("inf")


def mixed_batch(v, dtype, seed_offset=0):
    """Rows with KL of order 1, rows with KL ≈ 1e-4, and an ignored row full of NaN; labels mark it."""
    n = 6
    student = torch.randn(n, v) * 2
    original = torch.randn(n, v) * 2
    augmented = original + torch.randn(n, v)
    original[2:4] = student[2:4] + 0.014 * torch.randn(2, v)  # KL ≈ 1e-4 against the bare original
    augmented[2:4] = original[2:4] - 1.0  # relu(aug − orig) = 0: the teacher is the original there
    student[5] = float("nan")
    labels = torch.arange(n)
    labels[5] = -100
    return student.to(dtype), original.to(dtype), augmented.to(dtype), labels


@pytest.mark.parametrize("reverse", [True, False], ids=["reverse", "forward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_matches_float64_oracle(backend, dtype, reverse):
    s, o, a, labels = mixed_batch(333, dtype)
    valid = labels != -100
    rows, grad = run(backend, s, o, a, alpha=3.0, reverse=reverse, labels=labels)
    ref_rows, ref_grad = oracle(s, o, a, 3.0, reverse=reverse, valid=valid)
    assert rows.dtype == torch.float32
    assert_rows_close(rows, ref_rows)
    assert_grad_close(grad, ref_grad, dtype)
    assert bool((rows >= -1e-6).all())
    assert 1e-5 < ref_rows[2] < 1e-3, "the batch must hold a row with KL ≈ 1e-4"
    assert torch.equal(grad[5], torch.zeros_like(grad[5])), "an ignored row gets a zero gradient, NaN or not"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_temperature_two(backend):
    s, o, a, labels = mixed_batch(257, torch.float32)
    for reverse in (True, False):
        rows, grad = run(backend, s, o, a, alpha=2.0, reverse=reverse, labels=labels, temperature=2.0)
        ref_rows, ref_grad = oracle(s, o, a, 2.0, temperature=2.0, reverse=reverse, valid=labels != -100)
        assert_rows_close(rows, ref_rows)
        assert_grad_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("n,v,dtype", [(3, 5, torch.float32), (2, 1001, torch.float32), (1, 4099, torch.float16),
                                       (2, 32000, torch.float32), (2, 51200, torch.bfloat16)],
                         ids=["V5-below-block", "V1001-odd", "N1-V4099", "V32000", "V51200-bf16"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_vocab_sizes(backend, n, v, dtype):
    s, o, a = (torch.randn(n, v).to(dtype) for _ in range(3))
    rows, grad = run(backend, s, o, a, alpha=8.0)
    ref_rows, ref_grad = oracle(s, o, a, 8.0)
    assert_rows_close(rows, ref_rows)
    assert_grad_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_all_rows_ignored(backend):
    name, device = split_case(backend)
    s = torch.randn(2, 3, 17, device=device, requires_grad=True)
    o = torch.randn(2, 3, 17, device=device)
    labels = torch.full((2, 3), -100, device=device)
    for reduction in ("mean", "sum"):
        loss = rklu_fast.reverse_kl_loss(s, o, labels=labels, reduction=reduction, backend=name)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.equal(s.grad, torch.zeros_like(s))
        s.grad = None


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_alpha_zero_is_the_original_teacher(backend):
    s, o, a = (torch.randn(4, 50) for _ in range(3))
    rows0, grad0 = run(backend, s, o, a, alpha=0.0)
    rows_none, grad_none = run(backend, s, o, None)
    ref_rows, ref_grad = oracle(s, o, None)
    assert_rows_close(rows0, ref_rows)
    assert torch.allclose(rows0, rows_none) and torch.allclose(grad0, grad_none)


@pytest.mark.parametrize("reverse", [True, False], ids=["reverse", "forward"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_student_equals_teacher(backend, reverse):
    s = torch.randn(3, 300) * 3
    rows, grad = run(backend, s, s.clone(), reverse=reverse)
    assert rows.abs().max().item() <= 1e-6
    assert grad.abs().max().item() <= 1e-6


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_large_logits_stay_finite(backend):
    """Rows of ±1e4: fp32 cancellation bounds the gradient error near ulp(|z|), but nothing overflows."""
    s = (torch.rand(32, 200) * 2 - 1) * 1e4  # many rows: a kernel forming p = e^{a − lse} fails this reliably
    o = (torch.rand(32, 200) * 2 - 1) * 1e4
    for reverse in (True, False):
        rows, grad = run(backend, s, o, reverse=reverse)
        ref_rows, ref_grad = oracle(s, o, reverse=reverse)
        assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
        # A row whose loss is ≈ 0 still sums terms of size |z| ~ 1e4 rounded in fp32 (ulp 2**-10): its absolute error
        # reached 5.5e-6 over 300 draws (torch and C++ kernels). atol = ulp/8 = 1.2e-4 leaves 20× room and stays far
        # below the losses of the other rows (10 to 2e4 in 3200 draws), so an error of the size of a loss still fails.
        assert_rows_close(rows, ref_rows, atol=math.ulp(1e4) * 2**29 / 8)
        # the gradient cancels (a − b) against the row's shift, both up to |2e4|: a few fp32 roundings there
        ulp = math.ulp(2e4)  # of float64; fp32's is 2**29 times larger
        assert (grad.double() - ref_grad).abs().max().item() <= 4 * ulp * 2**29


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # Triton's interpreter (numpy) on the inf/NaN rows
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_neg_inf_rules(backend):
    v = 40
    s, o, a = (torch.randn(5, v) for _ in range(3))
    s[0, :5] = -INF                       # student −inf entries: their terms are 0
    o[1, :3] = -INF; a[1, :3] = 5.0       # l_o = −inf makes l_t = −inf whatever l_aug says ...
    s[1, :3] = -INF                       # ... and a student −inf there too: 0, finite
    o[2, 7] = -INF                        # finite student against −inf teacher: +inf (reverse)
    s[3] = -INF                           # a valid all −inf student row has no distribution: NaN
    a[4, :10] = -INF                      # l_aug = −inf: relu(−inf) = 0, the teacher is l_o
    rows, grad = run(backend, s, o, a, alpha=2.0)
    ref_rows, ref_grad = oracle(s, o, a, 2.0)
    finite = [0, 1, 4]
    assert_rows_close(rows[finite], ref_rows[finite])
    assert_grad_close(grad[finite], ref_grad[finite], torch.float32)
    assert rows[2].item() == INF and ref_rows[2].item() == INF
    assert math.isnan(rows[3].item()) and math.isnan(ref_rows[3].item())
    assert torch.equal(grad[0, :5], torch.zeros(5))
    # forward KL: mirror rules (teacher −inf term is 0; finite teacher against −inf student: +inf)
    rows_f, _ = run(backend, s, o, a, alpha=2.0, reverse=False)
    ref_f, _ = oracle(s, o, a, 2.0, reverse=False)
    assert rows_f[0].item() == INF == ref_f[0].item()
    assert_rows_close(rows_f[[1, 4]], ref_f[[1, 4]])
    assert math.isnan(rows_f[3].item())


@pytest.fixture
def small_triton_blocks(monkeypatch):
    """Triton chunks of 1024 entries, like the C++ CPU kernel's: a row of 4500 spans five chunks on every backend
    that chunks (the torch backend reads whole rows; the CUDA kernel's threads stride over the row)."""
    try:
        from rklu_fast import triton_kl
    except ImportError:
        return
    monkeypatch.setattr(triton_kl, "INTERPRET_BLOCK", 1024)
    monkeypatch.setitem(triton_kl.GPU_LAUNCH, "block", 1024)


def late_max_rows(v=4500):
    """Rows spanning several chunks whose maximum arrives late, 200 above the first chunk's (e^{-200} underflows in
    fp32), with −inf entries before it. Returns student, original, augmented (finite except where set)."""
    s, o = torch.randn(6, v), torch.randn(6, v)
    a = o + torch.randn(6, v)
    s[0, 3500:3600] += 200; o[0, 10:20] = -INF           # reverse: +inf in chunk 0, then the student max jumps
    s[1, 5:8] = -INF; o[1, 4000:4100] += 200             # forward: +inf in chunk 0, then the teacher max jumps
    s[2, ::97] = -INF; o[2, ::97] = -INF                 # −inf on both sides in every chunk: finite both ways ...
    s[2, 4200:] += 200; o[2, 4200:] += 200               # ... with a late max on both
    o[3, 1000:1100] = -INF; a[3, 1000:1100] = 9.0        # teacher −inf across a chunk boundary, whatever l_aug
    s[3, 2100:2200] += 200; o[3, 2100:2200] += 200       # forward finite; reverse +inf
    a[4, :2000] = -INF                                   # l_aug −inf: the teacher is l_o there
    s[4, 3000:3050] += 200; o[4, 3000:3050] += 200
    s[5, 4400:] += 200                                   # only the student jumps: large but finite both ways
    return s, o, a


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # Triton's interpreter (numpy) on the inf rows
@pytest.mark.parametrize("reverse", [True, False], ids=["reverse", "forward"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_neg_inf_and_late_max_across_chunks(backend, reverse, small_triton_blocks):
    s, o, a = late_max_rows()
    rows, grad = run(backend, s, o, a, alpha=2.0, reverse=reverse)
    ref_rows, ref_grad = oracle(s, o, a, 2.0, reverse=reverse)
    inf_rows = [0, 3] if reverse else [1]
    assert ref_rows[inf_rows].eq(INF).all(), "the oracle's +inf rows: a finite logit against −inf"
    assert rows[inf_rows].eq(INF).all(), f"+inf expected, got {rows[inf_rows].tolist()}"
    finite = [r for r in range(6) if r not in inf_rows]
    assert torch.isfinite(ref_rows[finite]).all()
    assert_rows_close(rows[finite], ref_rows[finite])
    assert_grad_close(grad[finite], ref_grad[finite], torch.float32)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_in_a_valid_row_gives_nan(backend):
    for which in range(3):
        t = [torch.randn(3, 30) for _ in range(3)]
        t[which][1, 4] = float("nan")
        for reverse in (True, False):
            rows, _ = run(backend, *t, alpha=2.0, reverse=reverse)
            assert math.isnan(rows[1].item()), (which, reverse)
            assert torch.isfinite(rows[[0, 2]]).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_deterministic(backend):
    s, o, a, labels = mixed_batch(700, torch.bfloat16)
    r1, g1 = run(backend, s, o, a, labels=labels)
    r2, g2 = run(backend, s, o, a, labels=labels)
    assert torch.equal(r1, r2) and torch.equal(g1, g2)


def test_reference_gradcheck():
    s = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    o, a = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    for reverse in (True, False):
        assert torch.autograd.gradcheck(
            lambda x: reference_kl(x, o, a, 4.0, temperature=2.0, reverse=reverse), (s,))


@pytest.mark.parametrize("dtype,jump", [(torch.float32, 200.0), (torch.float64, 1000.0)], ids=str)
def test_merge_keeps_an_infinite_numerator_when_a_later_shard_has_a_much_larger_max(dtype, jump):
    """e^{m_old − m_new} underflows to 0 past a jump of ~88 (fp32) or ~745 (fp64): +inf must stay +inf, not NaN."""
    a = torch.randn(2, 64, dtype=dtype)
    b = torch.randn(2, 64, dtype=dtype)
    b[0, 3] = -INF          # reverse: a finite student against −inf in the first shard ...
    a[0, 40:] += jump       # ... then a second shard whose student max is far larger
    a[1, 3] = -INF          # forward: the mirror case
    b[1, 40:] += jump
    merged = merge(partial_stats(a[:, :32], b[:, :32]), partial_stats(a[:, 32:], b[:, 32:]))
    assert kl_from_stats(merged, True)[0].item() == INF
    assert kl_from_stats(merged, False)[1].item() == INF
    # and the finite directions still equal the float64 definition
    ref = reference_kl(a.double(), b.double(), None, reverse=False)[0]
    torch.testing.assert_close(kl_from_stats(merged, False)[0].double(), ref,
                               rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)


def test_vocab_parallel_partial_stats_merge():
    """Statistics of two vocab shards, merged, give the unsharded per-row KL in both directions."""
    a = torch.randn(4, 101, dtype=torch.float64)
    b = torch.randn(4, 101, dtype=torch.float64) * 2
    a[0, 60:] = -INF  # a whole shard of −inf in one row
    whole = partial_stats(a, b)
    merged = merge(partial_stats(a[:, :60], b[:, :60]), partial_stats(a[:, 60:], b[:, 60:]))
    for reverse in (True, False):
        expect = reference_kl(a, b, None, temperature=1.0, reverse=reverse)
        assert torch.allclose(kl_from_stats(merged, reverse), expect, rtol=1e-12, atol=1e-12)
        assert torch.allclose(kl_from_stats(whole, reverse), expect, rtol=1e-12, atol=1e-12)
