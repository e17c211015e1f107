"""The compiled ops `torch.ops.rklu_fast.kl_fwd` / `kl_scale_grad_` (csrc/, via rklu_fast.cpp_backend), called raw.

The public API on backend="cpu" is covered by the parametrised tests/test_loss_*.py; here: registration, the C++
numerics against an independent float64 computation, the −inf/NaN rules, strides, determinism, opcheck, and the
CUDA kernel against the CPU one (skipped without a GPU).
"""
import math
import subprocess
import sys

import pytest
import torch

from conftest import requires_cuda
from rklu_fast import cpp_backend

pytestmark = pytest.mark.skipif(not cpp_backend.BUILT_CPU, reason=f"C++ extension not built: {cpp_backend.BUILD_ERROR}")

INF = math.inf
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# tolerance on a gradient already rounded to the dtype (the oracle is rounded the same way)
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def expected(student, original, augmented, rows, alpha, inv_t, reverse, grad_scale=1.0):
    """float64 per-row KL and grad_scale·∂KL/∂student, written from the definition (log_softmax), not the kernel's
    statistics, with the contract's −inf rules. Ignored rows (rows < 0): 0 and zeros; NaN KL: a NaN gradient row."""
    valid = rows >= 0
    o = original.double()[rows.clamp(min=0)]
    lt = o
    if augmented is not None:
        aug = augmented.double()[rows.clamp(min=0)]
        lt = torch.where(o == -INF, o, o - alpha * torch.relu(aug - o))
    a, b = student.double() * inv_t, lt * inv_t
    logp, logq = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    p, q = logp.exp(), logq.exp()
    if reverse:
        kl = torch.where(a == -INF, 0.0, p * (logp - logq)).sum(-1)
        grad = torch.where(a == -INF, 0.0, p * (logp - logq - kl[:, None]))
    else:
        kl = torch.where(b == -INF, 0.0, q * (logq - logp)).sum(-1)
        grad = p - q
    no_distribution = ((a if reverse else b) == -INF).all(-1)  # the side the KL is under has no finite entry
    kl = torch.where(no_distribution, math.nan, kl)
    grad = torch.where(kl.isnan()[:, None], math.nan, grad * inv_t * grad_scale)
    return torch.where(valid, kl, 0.0), torch.where(valid[:, None], grad, 0.0)


def run_fwd(student, original, augmented, rows, alpha=8.0, inv_t=1.0, reverse=True, compute_grad=True,
            grad_scale=1.0):
    return cpp_backend.kl_fwd(student, original, augmented, rows, torch.tensor(grad_scale, dtype=torch.float32),
                              alpha, inv_t, reverse, compute_grad)


def logits(n, v, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * scale).to(dtype)


def test_ops_registered_for_cpu_meta_and_cuda_when_built():
    for op in ("rklu_fast::kl_fwd", "rklu_fast::kl_scale_grad_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "Meta")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA") == cpp_backend.BUILT_CUDA


@pytest.mark.parametrize("reverse", [True, False])
@pytest.mark.parametrize("s_dtype,o_dtype,a_dtype", [
    (torch.float32, torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16, torch.float16),
    (torch.float32, torch.bfloat16, torch.float16),  # teacher dtypes differ from the student's and each other
    (torch.bfloat16, torch.float32, None),
])
def test_matches_float64(reverse, s_dtype, o_dtype, a_dtype):
    n, m, v = 7, 5, 1003  # V not a multiple of any vector width: exercises the tails
    student, original = logits(n, v, s_dtype, seed=1), logits(m, v, o_dtype, seed=2)
    augmented = None if a_dtype is None else logits(m, v, a_dtype, seed=3)
    rows = torch.tensor([4, 0, -1, 2, 2, 1, 3])
    loss, grad = run_fwd(student, original, augmented, rows, alpha=4.0, inv_t=0.5, reverse=reverse, grad_scale=0.25)
    kl, g = expected(student, original, augmented, rows, 4.0, 0.5, reverse, grad_scale=0.25)
    assert loss.dtype == torch.float32 and loss.shape == (n,)
    assert grad.dtype == s_dtype and grad.shape == (n, v) and grad.is_contiguous()
    torch.testing.assert_close(loss.double(), kl, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(grad.double(), g.to(s_dtype).double(), rtol=GRAD_RTOL[s_dtype], atol=1e-7)
    assert loss[2] == 0 and (grad[2] == 0).all()


def test_without_grad_returns_empty_and_same_loss():
    student, original, augmented = logits(4, 300, torch.float32), logits(4, 300, torch.float32, seed=5), None
    rows = torch.arange(4)
    loss, grad = run_fwd(student, original, augmented, rows, compute_grad=False)
    assert grad.shape == (0,)
    torch.testing.assert_close(loss, run_fwd(student, original, augmented, rows)[0], rtol=0, atol=0)


@pytest.mark.parametrize("reverse", [True, False])
def test_neg_inf_rules(reverse):
    v = 40
    student, original = logits(5, v, torch.float32, seed=7), logits(5, v, torch.float32, seed=8)
    student[0, :10] = -INF          # student −inf: its own terms are 0 (reverse), finite against it (forward): +inf
    original[1, 5:8] = -INF         # teacher −inf: finite student against it (reverse): +inf
    student[2, 3:9] = -INF          # both −inf at the same entries: 0 on both sides
    original[2, 3:9] = -INF
    student[3, :] = -INF            # no student distribution
    original[4, :] = -INF           # no teacher distribution
    rows = torch.arange(5)
    augmented = original + 1.0      # α·relu(aug − o) on the finite entries; −inf where original is −inf
    loss, grad = run_fwd(student, original, augmented, rows, alpha=2.0, reverse=reverse)
    kl, g = expected(student, original, augmented, rows, 2.0, 1.0, reverse)
    if reverse:
        assert math.isfinite(loss[0]) and loss[1] == INF
        assert (grad[0, :10] == 0).all()
    else:
        assert loss[0] == INF and math.isfinite(loss[1])
    assert math.isfinite(loss[2])
    assert loss[3].isnan() and loss[4].isnan() and grad[3].isnan().all() and grad[4].isnan().all()
    finite = [r for r in range(5) if math.isfinite(kl[r])]
    torch.testing.assert_close(loss[finite].double(), kl[finite], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(grad[finite].double(), g[finite], rtol=1e-4, atol=1e-7)


def test_nan_in_a_valid_row_propagates_and_ignored_rows_read_nothing():
    student, original = logits(3, 50, torch.float32), logits(3, 50, torch.float32, seed=9)
    student[0, 7] = math.nan
    original[1, 3] = math.nan
    student[2, :] = math.nan        # ignored row: its contents must not matter
    loss, grad = run_fwd(student, original, None, torch.tensor([0, 1, -1]), reverse=False)
    assert loss[0].isnan() and loss[1].isnan() and grad[:2].isnan().all()
    assert loss[2] == 0 and (grad[2] == 0).all()


def test_strided_student_rows_and_teacher_row_indexing():
    v = 257
    big = logits(6, 2 * v + 3, torch.bfloat16, seed=11)
    student = big[::2, 1:v + 1]     # row stride 2·(2V+3), stride(1) == 1, odd start offset
    assert not student.is_contiguous() and student.stride(1) == 1
    original = logits(4, v, torch.bfloat16, seed=12)
    rows = torch.tensor([3, -1, 3])
    loss, grad = run_fwd(student, original, None, rows)
    ref_loss, ref_grad = run_fwd(student.contiguous(), original, None, rows)
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)
    kl, _ = expected(student, original, None, rows, 8.0, 1.0, True)
    torch.testing.assert_close(loss.double(), kl, rtol=1e-5, atol=2e-5)


def test_bitwise_deterministic_across_runs_and_thread_counts():
    student, original, augmented = (logits(16, 2000, torch.float32, seed=s) for s in (13, 14, 15))
    rows = torch.arange(16)
    first = run_fwd(student, original, augmented, rows)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run_fwd(student, original, augmented, rows)
    finally:
        torch.set_num_threads(threads)
    again = run_fwd(student, original, augmented, rows)
    for out in (single, again):
        assert torch.equal(out[0], first[0]) and torch.equal(out[1], first[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_grad_in_place(dtype):
    grad = logits(4, 100, dtype, seed=16)
    before = grad.clone()
    applied = torch.ones(4)
    g = torch.tensor([1.0, 0.5, 1.0, -2.0])
    cpp_backend.kl_scale_grad_(grad, applied, g)
    assert torch.equal(applied, g)
    assert torch.equal(grad[[0, 2]], before[[0, 2]])          # g == applied: untouched
    expect = before.float() * g[:, None]
    torch.testing.assert_close(grad.float(), expect.to(dtype).float(), rtol=GRAD_RTOL[dtype], atol=0)
    again = grad.clone()
    cpp_backend.kl_scale_grad_(grad, applied, g)              # a second backward with the same g: bitwise the same
    assert torch.equal(grad, again)


def test_meta_kernels_give_shapes():
    student = torch.empty(5, 64, dtype=torch.bfloat16, device="meta")
    original = torch.empty(3, 64, device="meta")
    rows = torch.empty(5, dtype=torch.int64, device="meta")
    scale = torch.empty((), device="meta")
    loss, grad = cpp_backend.kl_fwd(student, original, None, rows, scale, 8.0, 1.0, True, True)
    assert loss.shape == (5,) and loss.dtype == torch.float32 and loss.device.type == "meta"
    assert grad.shape == (5, 64) and grad.dtype == torch.bfloat16
    assert cpp_backend.kl_fwd(student, original, None, rows, scale, 8.0, 1.0, True, False)[1].shape == (0,)


def test_opcheck_raw_ops():
    student, original, augmented = (logits(3, 64, torch.float32, seed=s) for s in (17, 18, 19))
    args = (student, original, augmented, torch.tensor([1, -1, 0]), torch.tensor(0.5), 8.0, 0.5, True, True)
    torch.library.opcheck(torch.ops.rklu_fast.kl_fwd.default, args)
    torch.library.opcheck(torch.ops.rklu_fast.kl_scale_grad_.default,
                          (logits(3, 64, torch.float32), torch.ones(3), torch.tensor([1.0, 2.0, 0.5])))


@pytest.mark.parametrize("bad,match", [
    (dict(student=torch.zeros(2, 8, dtype=torch.float64)), "student must be float32"),
    (dict(original=torch.zeros(2, 9)), "original has vocab 9"),
    (dict(rows=torch.tensor([0, 1], dtype=torch.int32)), "teacher_row must be int64 of shape \\[2\\], got Int \\[2\\]"),
    (dict(rows=torch.tensor([0, 5])), "teacher_row\\[1\\] = 5 but the teacher has 2 rows"),
    (dict(student=torch.zeros(8, 2).t()), "stride\\(1\\) == 1 \\(rows may be strided\\), got strides \\[1, 2\\]"),
])
def test_bad_arguments_name_the_argument(bad, match):
    args = dict(student=torch.zeros(2, 8), original=torch.zeros(2, 8), rows=torch.tensor([0, 1]))
    args.update(bad)
    with pytest.raises(RuntimeError, match=match):
        run_fwd(args["student"], args["original"], None, args["rows"])


def test_cpp_ops_and_python_custom_op_share_the_namespace_in_either_import_order():
    # The package defines rklu_fast::kl_div (Python, FRAGMENT) at import; here the C++ library loads first.
    code = (
        "import glob, importlib.util, os, torch\n"
        "pkg = importlib.util.find_spec('rklu_fast').submodule_search_locations[0]\n"
        "torch.ops.load_library(glob.glob(os.path.join(pkg, '_C.*.so'))[0])\n"
        "import rklu_fast.loss, rklu_fast.cpp_backend\n"
        "assert rklu_fast.cpp_backend.BUILT_CPU\n"
        "torch.ops.rklu_fast.kl_div, torch.ops.rklu_fast.kl_fwd\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    torch.ops.rklu_fast.kl_div  # and in this process the Python op came first
    torch.ops.rklu_fast.kl_fwd


@requires_cuda
@pytest.mark.skipif(not cpp_backend.BUILT_CUDA, reason=f"CUDA extension not built: {cpp_backend.BUILD_ERROR}")
@pytest.mark.parametrize("reverse", [True, False])
@pytest.mark.parametrize("dtype,v", [(torch.bfloat16, 32000), (torch.float32, 32000), (torch.float16, 1003)])
def test_cuda_matches_cpu(reverse, dtype, v):
    # 16-byte loads with L2 hints (bf16 and fp32 rows of 32000) and the unaligned path (V = 1003)
    student, original, augmented = (logits(6, v, dtype, seed=s) for s in (21, 22, 23))
    rows = torch.tensor([0, -1, 5, 2, 2, 4])
    cpu = run_fwd(student, original, augmented, rows, reverse=reverse, grad_scale=0.5)
    cuda = cpp_backend.kl_fwd(student.cuda(), original.cuda(), augmented.cuda(), rows.cuda(),
                              torch.tensor(0.5, device="cuda"), 8.0, 1.0, reverse, True)
    torch.testing.assert_close(cuda[0].cpu(), cpu[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cuda[1].float().cpu(), cpu[1].float(), rtol=GRAD_RTOL[dtype], atol=1e-6)
    again = cpp_backend.kl_fwd(student.cuda(), original.cuda(), augmented.cuda(), rows.cuda(),
                               torch.tensor(0.5, device="cuda"), 8.0, 1.0, reverse, True)
    assert torch.equal(again[0], cuda[0]) and torch.equal(again[1], cuda[1])
    applied, g = torch.ones(6, device="cuda"), torch.full((6,), 2.0, device="cuda")
    cpp_backend.kl_scale_grad_(cuda[1], applied, g)
    torch.testing.assert_close(cuda[1].float().cpu(), (cpu[1].float() * 2).to(dtype).float(),
                               rtol=GRAD_RTOL[dtype], atol=1e-6)
