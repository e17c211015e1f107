"""The `triton` backend of docs/kernel-contract.md: a fused, deterministic row kernel and a row-rescaling kernel.

`_kl_fwd_kernel`, one program per row (the math of `rklu_fast.row_stats`, in fp32 registers):
  pass 1 reads the student row and its teacher row(s) in chunks of BLOCK and keeps online statistics
      m_s, S_s = max a, Σ e^{a−m_s}; m_t, S_t likewise for b; W = Σ e^{a−m_s}(a−b) (reverse) or Σ e^{b−m_t}(b−a),
      with a = z_θ/T and b = l_t/T, l_t = l_o − α·relu(l_aug − l_o) (−inf where l_o = −inf);
      KL_rev = W/S_s − (m_s − m_t) − log(S_s/S_t),  KL_fwd = W/S_t − (m_t − m_s) − log(S_t/S_s);
  pass 2 (only when the gradient is wanted) re-reads the row and writes, in the student's dtype,
      grad_scale · p·((a−b) − (m_s−m_t) − log(S_s/S_t) − KL)/T   (reverse)   or   grad_scale · (p − q)/T.
Nothing of shape [N, V] is materialised besides the gradient. BLOCK and num_warps depend only on V, so the
reduction order, hence every output bit, is the same run to run (no autotuning over them).
−inf rules as in the contract; masked lanes never compute −inf − (−inf), which keeps the CPU interpreter quiet.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NEG_INF = tl.constexpr(float("-inf"))  # a constexpr global: kernels may read it


@triton.jit
def _teacher_chunk(O, A, o_off, a_off, cols, inb, alpha, inv_t, HAS_AUG: tl.constexpr, POLICY: tl.constexpr):
    lo = tl.load(O + o_off + cols, mask=inb, other=NEG_INF, eviction_policy=POLICY).to(tl.float32)
    if HAS_AUG:
        la = tl.load(A + a_off + cols, mask=inb, other=NEG_INF, eviction_policy=POLICY).to(tl.float32)
        lo_is_neg_inf = lo == NEG_INF
        d = la - tl.where(lo_is_neg_inf, 0.0, lo)
        penalty = tl.where(d < 0.0, 0.0, d)  # relu that keeps NaN
        lo = tl.where(lo_is_neg_inf, lo, lo - alpha * penalty)
    return lo * inv_t


@triton.jit
def _to_out(x, dtype: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """x (fp32) in the output dtype, rounded to nearest even (by hand where the interpreter would truncate)."""
    if BF16_BY_HAND:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # exactly representable in bf16 afterwards
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)


@triton.jit
def _kl_fwd_kernel(S, O, A, TR, M, LOSS, G, SCALE, s_stride, o_stride, a_stride, V, alpha, inv_t,
                   HAS_AUG: tl.constexpr, REVERSE: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                   BLOCK: tl.constexpr, BF16_BY_HAND: tl.constexpr, L2_HINTS: tl.constexpr):
    # L2_HINTS: pass 1 asks L2 to keep the row (evict_last) for pass 2, whose reads are the row's last use
    FIRST: tl.constexpr = "evict_last" if L2_HINTS and COMPUTE_GRAD else ""
    LAST: tl.constexpr = "evict_first" if L2_HINTS else ""
    row = tl.program_id(0).to(tl.int64)
    t_row = tl.load(TR + row)
    offs = tl.arange(0, BLOCK)
    # M teacher rows: a row index past them (a compact teacher of the wrong length, which only a device-side check
    # can see without a host sync) is never read; the row's loss and gradient are NaN. TRITON_DEBUG=1 also asserts.
    tl.device_assert(t_row < M, "rklu_fast: teacher_row past the teacher's rows")
    past_end = t_row >= M
    if (t_row < 0) | past_end:  # ignored row: read nothing, write zeros (NaN past the end)
        fill = tl.where(past_end, float("nan"), 0.0)
        tl.store(LOSS + row, fill)
        if COMPUTE_GRAD:
            fill_block = (tl.zeros([BLOCK], dtype=tl.float32) + fill).to(G.dtype.element_ty)
            for start in range(0, V, BLOCK):
                cols = start + offs
                tl.store(G + row * V + cols, fill_block, mask=cols < V)
    else:
        s_off = row * s_stride
        o_off = t_row * o_stride
        a_off = t_row * a_stride
        m_s = tl.full([], NEG_INF, tl.float32)
        m_t = tl.full([], NEG_INF, tl.float32)
        sum_s = tl.zeros([], tl.float32)
        sum_t = tl.zeros([], tl.float32)
        w = tl.zeros([], tl.float32)
        # ---- pass 1: online statistics
        for start in range(0, V, BLOCK):
            cols = start + offs
            inb = cols < V
            a = tl.load(S + s_off + cols, mask=inb, other=NEG_INF, eviction_policy=FIRST).to(tl.float32) * inv_t
            b = _teacher_chunk(O, A, o_off, a_off, cols, inb, alpha, inv_t, HAS_AUG, FIRST)
            a_ok = inb & (a != NEG_INF)  # NaN counts as present, so it propagates
            b_ok = inb & (b != NEG_INF)
            new_m_s = tl.maximum(m_s, tl.max(tl.where(a_ok, a, NEG_INF), 0))
            new_m_t = tl.maximum(m_t, tl.max(tl.where(b_ok, b, NEG_INF), 0))
            ms = tl.where(new_m_s == NEG_INF, 0.0, new_m_s)  # finite shifts: no −inf − (−inf)
            mt = tl.where(new_m_t == NEG_INF, 0.0, new_m_t)
            e_a = tl.where(a_ok, tl.exp(a - ms), 0.0)
            e_b = tl.where(b_ok, tl.exp(b - mt), 0.0)
            f_s = tl.exp(m_s - ms)
            f_t = tl.exp(m_t - mt)
            sum_s = sum_s * f_s + tl.sum(e_a, 0)
            sum_t = sum_t * f_t + tl.sum(e_b, 0)
            # own −inf: 0; finite against −inf: +inf. A +inf numerator stays +inf when rebased to a much larger
            # max (its factor underflows to 0 past a jump of ~88, and inf·0 would be NaN).
            if REVERSE:
                diff = tl.where(a_ok, a, 0.0) - tl.where(a_ok, b, 0.0)
                term = tl.where(a_ok & (b == NEG_INF), float("inf"), e_a * diff)
                w = tl.where(w == float("inf"), w, w * f_s) + tl.sum(term, 0)
            else:
                diff = tl.where(b_ok, b, 0.0) - tl.where(b_ok, a, 0.0)
                term = tl.where(b_ok & (a == NEG_INF), float("inf"), e_b * diff)
                w = tl.where(w == float("inf"), w, w * f_t) + tl.sum(term, 0)
            m_s = new_m_s
            m_t = new_m_t
        if REVERSE:
            kl = w / sum_s - (m_s - m_t) - tl.log(sum_s / sum_t)
        else:
            kl = w / sum_t - (m_t - m_s) - tl.log(sum_t / sum_s)
        tl.store(LOSS + row, kl)
        # ---- pass 2: the gradient, re-reading the row
        if COMPUTE_GRAD:
            scale = tl.load(SCALE).to(tl.float32) * inv_t
            ms = tl.where(m_s == NEG_INF, 0.0, m_s)
            mt = tl.where(m_t == NEG_INF, 0.0, m_t)
            c = (m_s - m_t) + tl.log(sum_s / sum_t) + kl  # log p − log q − KL = (a − b) − c
            for start in range(0, V, BLOCK):
                cols = start + offs
                inb = cols < V
                a = tl.load(S + s_off + cols, mask=inb, other=NEG_INF, eviction_policy=LAST).to(tl.float32) * inv_t
                b = _teacher_chunk(O, A, o_off, a_off, cols, inb, alpha, inv_t, HAS_AUG, LAST)
                a_ok = inb & (a != NEG_INF)
                p = tl.where(a_ok, tl.exp(a - ms) / sum_s, 0.0)
                if REVERSE:
                    diff = tl.where(a_ok, a, 0.0) - tl.where(a_ok, b, 0.0)
                    g = tl.where(a_ok, p * (diff - c), 0.0)
                else:
                    b_ok = inb & (b != NEG_INF)
                    g = p - tl.where(b_ok, tl.exp(b - mt) / sum_t, 0.0)
                tl.store(G + row * V + cols, _to_out(g * scale, G.dtype.element_ty, BF16_BY_HAND), mask=inb)


@triton.jit
def _scale_grad_kernel(G, APPLIED, GO, V, BLOCK: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(GO + row)
    done = tl.load(APPLIED + row)
    if g != done:  # the usual backward (g == 1 == applied) reads two floats per row and stops
        ratio = g / done
        offs = tl.arange(0, BLOCK)
        for start in range(0, V, BLOCK):
            cols = start + offs
            inb = cols < V
            x = tl.load(G + row * V + cols, mask=inb, other=0.0).to(tl.float32)
            tl.store(G + row * V + cols, _to_out(x * ratio, G.dtype.element_ty, BF16_BY_HAND), mask=inb)
        tl.store(APPLIED + row, g)


def _bf16_by_hand(dtype: torch.dtype) -> bool:
    """The CPU interpreter truncates fp32 → bf16 (GPUs round to nearest even): round by hand there."""
    return _INTERPRET and dtype == torch.bfloat16


# GPU launch overrides for benchmarks/tune_kernels.py (None: the measured rule in _launch_shape).
GPU_LAUNCH = {"block": None, "warps": None, "l2_hints": True}
# The interpreter's widest chunk (its cost is per chunk); tests lower it to run rows of several chunks.
INTERPRET_BLOCK = 8192


def _launch_shape(v: int):
    """(BLOCK, num_warps, L2 hints) for vocab size v: a function of v only, so results are bitwise reproducible.

    On an H100 (benchmarks/results/tune_kernels_*.json, N = 16384 bf16, gradient-writing): V = 32000 is fastest
    with 4096-wide chunks and 16 warps, V = 51200 with 2048 and 8; L2 hints help by 5-15 %."""
    if _INTERPRET:  # the interpreter's cost is per chunk: few, wide chunks
        return min(triton.next_power_of_2(v), INTERPRET_BLOCK), 1, False
    cap, warps = (4096, 16) if v <= 32768 else (2048, 8)
    block = min(triton.next_power_of_2(v), GPU_LAUNCH["block"] or cap)
    warps = GPU_LAUNCH["warps"] or warps
    return block, (min(warps, 4) if block <= 1024 else warps), GPU_LAUNCH["l2_hints"]


def _device_of(t: torch.Tensor):
    """Launch on the tensor's GPU, not on whichever GPU happens to be current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def kl_fwd(student, original, augmented, teacher_row, grad_scale, alpha: float, inv_temperature: float,
           reverse: bool, compute_grad: bool):
    """Contract `kl_fwd` (docs/kernel-contract.md)."""
    n, v = student.shape
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    grad = torch.empty((n, v) if compute_grad else (0,), dtype=student.dtype, device=student.device)
    aug = original if augmented is None else augmented
    block, warps, hints = _launch_shape(v)
    if n:
        with _device_of(student):
            _kl_fwd_kernel[(n,)](student, original, aug, teacher_row, original.shape[0], loss, grad, grad_scale,
                                 student.stride(0), original.stride(0), aug.stride(0), v, float(alpha),
                                 float(inv_temperature), HAS_AUG=augmented is not None, REVERSE=bool(reverse),
                                 COMPUTE_GRAD=bool(compute_grad), BLOCK=block,
                                 BF16_BY_HAND=_bf16_by_hand(student.dtype), L2_HINTS=hints,
                                 num_warps=warps)
    return loss, grad


def kl_scale_grad_(grad, applied, grad_output_rows) -> None:
    """Contract `kl_scale_grad_`: in place, one program per row, nothing but `g` read where `g == applied`."""
    n, v = grad.shape
    block, warps, _ = _launch_shape(v)
    if n:
        with _device_of(grad):
            _scale_grad_kernel[(n,)](grad, applied, grad_output_rows.to(torch.float32).contiguous(), v,
                                     BLOCK=block, BF16_BY_HAND=_bf16_by_hand(grad.dtype), num_warps=warps)
