"""Fused linear reverse-KL benchmark: the loss from hidden states and the LM head, against the ways to do without.

    python benchmarks/bench_fused_linear.py                  # GPU: (d, V) = (4096, 32000), (2048, 51200),
                                                             #      (4096, 128256); N = 4096, 16384; bf16
    python benchmarks/bench_fused_linear.py --device cpu     # N = 2048, d = 512, V = 32000, fp32, 2 threads
    python benchmarks/bench_fused_linear.py --dry-run        # tiny shapes on CPU: the whole pipeline in seconds

Methods (forward + backward of hidden and weight; the teacher logits are inputs):
  materialise      `hidden @ W.T` then `rklu_fast.reverse_kl_loss` (autograd does dhidden and dW)
  compile_chunked  torch.compile of one chunk's logits, reverse KL and its closed-form gradient, dhidden in the
                   same graph; dW accumulated in fp32 as this op does; all rows (ignored ones masked)
  liger_fljsd      Liger's LigerFusedLinearJSD(jsd_beta=1) (reverse KL); its API takes the teacher as hidden
                   states and a head, so it also computes teacher logits (counted in its FLOPs)
  liger_flkl       Liger's LigerFusedLinearKLDivLoss if the installed wheel has it: forward KL against teacher
                   probabilities (softmax of the teacher, formed outside the timed call)
  rklu_fused       `rklu_fast.fused_linear_reverse_kl_loss` (default chunks)
  rklu_fused_fkl   `rklu_fast.fused_linear_forward_kl_loss`: the direction Liger's KL-div computes
  matmuls_chunked  the GEMMs of `rklu_fused` alone, with its chunks, shapes and dtypes (no KL): the time floor
  matmuls_whole    the same three GEMMs over all valid rows at once (bf16 outputs): the unchunked floor

Each row: median time (and quartiles), peak extra memory, FLOPs performed, achieved TFLOP/s, loss and gradient
errors against float64. Writes bench_fused_linear_<device>_<date>.{json,md,png} to --out (default
benchmarks/results/). How time and memory are measured: benchmarks/NOTES.md (the same probes as bench_loss.py).
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # rklu_fast from this checkout when not installed
import bench_loss as B  # noqa: E402  (the probes, timers, device description)

import rklu_fast  # noqa: E402
from rklu_fast.fused_linear import _accumulate_weight_grad, chunk_rows  # noqa: E402

SCHEMA = "rklu_fast.bench_fused_linear/1"
IGNORE_INDEX = -100
RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("materialise", "compile_chunked", "liger_fljsd", "liger_flkl", "rklu_fused", "rklu_fused_fkl",
           "matmuls_chunked", "matmuls_whole")
LOSS_METHODS = METHODS[:6]
GPU_SHAPES = ((4096, 32000), (2048, 51200), (4096, 128256))  # (d, V)
ROW_KEYS = ("method", "n", "d", "v", "dtype", "ignore_frac", "n_valid", "status", "reason", "note", "load_avg",
            "time_ms", "time_ms_q25", "time_ms_q75", "reps", "first_call_s", "timing_meaningful", "flops", "tflops",
            "peak_extra_bytes", "bound_bytes", "chunk_rows", "loss", "loss_rel_err", "grad_hidden_rel_err",
            "grad_weight_rel_err")


class Unavailable(Exception):
    """The method cannot run here; the message says why (reported as a row, never omitted)."""


@dataclass(frozen=True)
class Shape:
    n: int
    d: int
    v: int
    dtype: str
    ignore_frac: float


# ------------------------------------------------------------------------------------------- inputs
def make_inputs(shape: Shape, device: str, seed: int):
    """hidden ~ N(0, 1), W ~ N(0, 1/d) (logits of unit scale), the original model's logits = the student's + noise,
    the augmented model's = the original's + noise; round(ignore_frac·N) random rows labelled −100."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = B.DTYPES[shape.dtype]
    hidden = torch.randn(shape.n, shape.d, generator=g, device=device).to(dtype)
    weight = (torch.randn(shape.v, shape.d, generator=g, device=device) / shape.d ** 0.5).to(dtype)
    original = torch.empty(shape.n, shape.v, dtype=dtype, device=device)
    augmented = torch.empty_like(original)
    for rows in torch.arange(shape.n, device=device).split(1024):  # fp32 temporaries a block of rows at a time
        z = hidden[rows].float() @ weight.float().t()
        o = z + 0.5 * torch.randn(z.shape, generator=g, device=device)
        original[rows] = o.to(dtype)
        augmented[rows] = (o + 0.5 * torch.randn(z.shape, generator=g, device=device)).to(dtype)
    labels = torch.randint(0, shape.v, (shape.n,), generator=g, device=device)
    labels[torch.randperm(shape.n, generator=g, device=device)[: round(shape.ignore_frac * shape.n)]] = IGNORE_INDEX
    return hidden, weight, original, augmented, labels


def reference(inputs, alpha: float, reverse: bool = True, rows_per_block: int = 512):
    """float64 loss (mean over valid rows) and its gradients w.r.t. hidden and weight, a block of rows at a time."""
    hidden, weight, original, augmented, labels = inputs
    w = weight.double()
    valid = labels != IGNORE_INDEX
    n_valid = max(int(valid.sum()), 1)
    loss, dh, dw = 0.0, torch.zeros(hidden.shape, dtype=torch.float64, device=hidden.device), torch.zeros_like(w)
    for rows in torch.arange(hidden.shape[0], device=hidden.device)[valid].split(rows_per_block):
        h = hidden[rows].double()
        z = (h @ w.t()).requires_grad_()
        lo, la = original[rows].double(), augmented[rows].double()
        logp = torch.log_softmax(z, -1)
        logq = torch.log_softmax(lo - alpha * torch.relu(la - lo), -1)
        kl = (logp.exp() * (logp - logq)).sum() if reverse else (logq.exp() * (logq - logp)).sum()
        (gz,) = torch.autograd.grad(kl / n_valid, z)
        loss += float(kl.detach()) / n_valid
        dh[rows] = gz @ w
        dw += gz.t() @ h
    return loss, dh, dw


def flops(method: str, n: int, n_valid: int, d: int, v: int) -> int:
    """Multiply-adds ×2 of the GEMMs each method performs (elementwise work not counted)."""
    gemm = 2 * v * d
    return {"materialise": 3 * n * gemm, "compile_chunked": 3 * n * gemm, "liger_fljsd": 4 * n * gemm,
            "liger_flkl": 3 * n * gemm, "matmuls_whole": 3 * n_valid * gemm}.get(method, 3 * n_valid * gemm)


def memory_bound(shape: Shape, n_valid: int) -> int:
    """The bound on the fused op's peak extra memory: fp32 dW + the dW autograd returns when the weight is
    not fp32 + dhidden + one chunk of student and teacher rows (3·C·V fp32)."""
    elem = torch.tensor([], dtype=B.DTYPES[shape.dtype]).element_size()
    dw = shape.v * shape.d * 4 + (shape.v * shape.d * elem if elem != 4 else 0)
    return dw + shape.n * shape.d * elem + 3 * chunk_rows(n_valid, shape.v) * shape.v * 4


# ------------------------------------------------------------------------------------------- methods
def _compiled_chunk(compile_backend: str):
    def chunk(h, w, o, a, valid, alpha: float, scale):
        """One chunk: logits, reverse KL per row, its closed-form gradient (scaled), dhidden."""
        z = (h @ w.t()).float()
        lo = o.float()
        logp = torch.log_softmax(z, -1)
        logq = torch.log_softmax(lo - alpha * torch.relu(a.float() - lo), -1)
        p = logp.exp()
        kl = (p * (logp - logq)).sum(-1)
        g = (p * (logp - logq - kl[:, None]) * (valid[:, None] * scale)).to(h.dtype)
        return (kl * valid).sum() * scale, g, g @ w
    return torch.compile(chunk, dynamic=False, backend=compile_backend)


class _ChunkedCompiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, original, augmented, labels, alpha, chunk_fn, c):
        valid = (labels != IGNORE_INDEX).to(torch.float32)
        scale = 1.0 / valid.sum().clamp(min=1.0)
        loss = torch.zeros((), device=hidden.device)
        dh = torch.empty_like(hidden)
        dw = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        for i, start in enumerate(range(0, hidden.shape[0], c)):
            s = slice(start, start + c)
            part, g, dh[s] = chunk_fn(hidden[s], weight, original[s], augmented[s], valid[s], alpha, scale)
            loss += part
            _accumulate_weight_grad(dw, g, hidden[s], first=i == 0)
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, go):
        dh, dw = ctx.saved_tensors
        return dh * go, (dw * go).to(ctx.weight_dtype), None, None, None, None, None, None


def _liger(name: str, device: str):
    if device != "cuda":
        raise Unavailable("Liger's fused linear losses are Triton kernels: GPU only (the CPU interpreter is not "
                          "timed)")
    try:
        import liger_kernel.transformers as lt
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"liger-kernel not importable ({type(e).__name__}: {e})"[:200]) from None
    cls = getattr(lt, "LigerFusedLinearJSD" if name == "liger_fljsd" else "LigerFusedLinearKLDivLoss", None)
    if cls is None:
        raise Unavailable(f"liger-kernel {B._version('liger-kernel')} has no "
                          f"{'LigerFusedLinearJSD' if name == 'liger_fljsd' else 'LigerFusedLinearKLDivLoss'}")
    return cls


def build(name: str, device: str, compile_backend: str, backend: str):
    """(prepare(inputs, alpha) -> step_inputs, fn(*step_inputs) -> loss or None, note)."""
    if name in ("rklu_fused", "rklu_fused_fkl"):
        fn = rklu_fast.fused_linear_reverse_kl_loss if name == "rklu_fused" else \
            rklu_fast.fused_linear_forward_kl_loss
        return (lambda x, alpha: (x, alpha)), \
            (lambda x, alpha: fn(x[0], x[1], x[2], x[3], alpha, labels=x[4], backend=backend)), ""
    if name == "materialise":
        return (lambda x, alpha: (x, alpha)), (lambda x, alpha: rklu_fast.reverse_kl_loss(
            x[0] @ x[1].t(), x[2], x[3], alpha, labels=x[4], backend=backend)), f"backend={backend}"
    if name == "compile_chunked":
        chunk_fn = _compiled_chunk(compile_backend)

        def fn(x, alpha):
            c = chunk_rows(x[0].shape[0], x[1].shape[0])
            return _ChunkedCompiled.apply(x[0], x[1], x[2], x[3], x[4], alpha, chunk_fn, c)
        return (lambda x, alpha: (x, alpha)), fn, "rklu_fused's chunk rule over all rows"
    if name == "liger_fljsd":
        loss = _liger(name, device)(jsd_beta=1.0, ignore_index=IGNORE_INDEX)

        def prepare(x, alpha):  # a teacher head and hidden states of the student's shapes
            g = torch.Generator(device=device).manual_seed(1)
            t_hidden = torch.randn(x[0].shape, generator=g, device=device).to(x[0].dtype)
            t_weight = (torch.randn(x[1].shape, generator=g, device=device) / x[1].shape[1] ** 0.5).to(x[1].dtype)
            return x, t_hidden, t_weight
        return prepare, (lambda x, th, tw: loss(x[0], x[1], th, tw, x[4])), \
            "teacher from hidden states and a head (its API): computes the teacher logits too"
    if name == "liger_flkl":
        loss = _liger(name, device)(reduction="batchmean", ignore_index=IGNORE_INDEX)

        def prepare(x, alpha):
            lo = x[2].float()
            return x, torch.softmax(lo - alpha * torch.relu(x[3].float() - lo), -1)
        return prepare, (lambda x, target: loss(x[0], x[1], target, x[4])), \
            "forward KL against teacher probabilities (fp32, formed before the timed call); 'batchmean'"
    if name in ("matmuls_chunked", "matmuls_whole"):
        return (lambda x, alpha: (x,)), (_matmuls_chunked if name == "matmuls_chunked" else _matmuls_whole), \
            "no loss: the GEMMs alone (the logits stand in for their gradient)"
    raise ValueError(f"name: unknown method {name!r}; known: {METHODS}")


@torch.no_grad()
def _matmuls_chunked(x):
    hidden, weight, _, _, labels = x
    idx = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    c = chunk_rows(idx.numel(), weight.shape[0])
    dh = torch.zeros_like(hidden)
    dw = torch.empty(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device)
    for start in range(0, idx.numel(), c):
        rows = idx[start:start + c]
        h = hidden[rows]
        z = h @ weight.t()
        dh[rows] = z @ weight
        _accumulate_weight_grad(dw, z, h, first=start == 0)
    return None


@torch.no_grad()
def _matmuls_whole(x):
    hidden, weight, _, _, labels = x
    h = hidden[labels != IGNORE_INDEX]
    z = h @ weight.t()
    z @ weight
    z.t() @ h
    return None


# ------------------------------------------------------------------------------------------- one row
def blank_row(method: str, shape: Shape, n_valid, status: str, reason: str = "") -> dict:
    row = dict.fromkeys(ROW_KEYS)
    row.update(method=method, n_valid=n_valid, status=status, reason=reason or None, note="",
               timing_meaningful=False, **asdict(shape))
    return row


def make_step(method: str, inputs, ctx: dict):
    """(step, note): one timed call of the method (a loss method: forward + backward of hidden and weight)."""
    hidden, weight = inputs[:2]
    prepare, fn, note = build(method, ctx["device"], ctx["compile_backend"], ctx["backend"])
    step_inputs = prepare(inputs, ctx["alpha"])
    if method not in LOSS_METHODS:
        return (lambda: fn(*step_inputs)), note
    hidden.requires_grad_(True)
    weight.requires_grad_(True)

    def step():
        hidden.grad = weight.grad = None
        loss = fn(*step_inputs)
        loss.backward()
        return loss
    return step, note


def interleaved_times(methods, shape: Shape, ctx: dict, cycles: int) -> dict:
    """{method: [ms per cycle]}: every method called once per cycle, in turn (reversed every other cycle), all in
    this process after a warm-up call each, so that the calls compared are seconds apart whatever the load does."""
    inputs = make_inputs(shape, ctx["device"], ctx["seed"])
    steps = {}
    for m in methods:
        try:
            steps[m] = make_step(m, inputs, ctx)[0]
            steps[m]()
        except Exception:  # noqa: BLE001 - its row already says why (the isolated run)
            steps.pop(m, None)
    times = {m: [] for m in steps}
    for c in range(cycles):
        for m in (list(steps) if c % 2 == 0 else list(steps)[::-1]):
            t0 = time.perf_counter()
            steps[m]()
            times[m].append((time.perf_counter() - t0) * 1e3)
    inputs[0].grad = inputs[1].grad = None
    return times


def measure(method: str, shape: Shape, inputs, ref, ctx: dict) -> dict:
    hidden, weight, original, augmented, labels = inputs
    n_valid = int((labels != IGNORE_INDEX).sum())
    device = ctx["device"]
    row = blank_row(method, shape, n_valid, "ok")
    row["flops"] = flops(method, shape.n, n_valid, shape.d, shape.v)
    try:
        step, row["note"] = make_step(method, inputs, ctx)
        is_loss = method in LOSS_METHODS
        if method.startswith("rklu_fused") or method == "matmuls_chunked":
            row["chunk_rows"] = chunk_rows(n_valid, shape.v)
        if method.startswith("rklu_fused"):
            row["bound_bytes"] = memory_bound(shape, n_valid)
        t0 = time.perf_counter()
        step()  # warm-up: compiles, loads modules
        if device == "cuda":
            torch.cuda.synchronize()
        row["first_call_s"] = time.perf_counter() - t0
        hidden.grad = weight.grad = None
        result, row["peak_extra_bytes"] = ctx["probe"].run(step)
        if is_loss:
            row["loss"] = float(result.detach())
            ref_loss, ref_dh, ref_dw = ref[method == "rklu_fused_fkl" or method == "liger_flkl"]
            row["loss_rel_err"] = abs(row["loss"] - ref_loss) / abs(ref_loss)
            if method != "liger_fljsd":  # its teacher is another model: no float64 reference here
                row["grad_hidden_rel_err"] = float((hidden.grad.double() - ref_dh).norm() / ref_dh.norm())
                row["grad_weight_rel_err"] = float((weight.grad.double() - ref_dw).norm() / ref_dw.norm())
            else:
                row["loss_rel_err"] = None
        times = B.time_cuda(step, ctx["warmup_ms"], ctx["rep_ms"]) if device == "cuda" else \
            B.time_cpu(step, ctx["min_reps"], ctx["min_time"])
        row["load_avg"] = os.getloadavg()[0]  # the 1-minute load average as the row's timing ended
        q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        row.update(time_ms=statistics.median(times), time_ms_q25=q[0], time_ms_q75=q[2], reps=len(times),
                   timing_meaningful=True)
        row["tflops"] = row["flops"] / row["time_ms"] / 1e9
    except Unavailable as e:
        row = blank_row(method, shape, n_valid, "unavailable", str(e))
    except torch.OutOfMemoryError as e:
        row = blank_row(method, shape, n_valid, "oom", str(e).splitlines()[0][:200])
    except Exception as e:  # noqa: BLE001 - a failing competitor is a result, not a crash of the benchmark
        row = blank_row(method, shape, n_valid, "error", f"{type(e).__name__}: {e}"[:300])
    finally:
        hidden.requires_grad_(False)
        weight.requires_grad_(False)
        hidden.grad = weight.grad = None
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def references(inputs, shape: Shape, methods, ctx) -> dict:
    """{False: reverse, True: forward} float64 (loss, dhidden, dW) for the loss methods among `methods`; kept
    in ctx["ref_dir"] when there is one (the CPU workers of one run share them)."""
    refs = {}
    for fwd in sorted({m in ("rklu_fused_fkl", "liger_flkl") for m in methods if m in LOSS_METHODS}):
        path = ctx.get("ref_dir") and Path(ctx["ref_dir"]) / f"ref_{'fkl' if fwd else 'rkl'}_{shape.n}_{shape.d}_" \
                                                             f"{shape.v}_{shape.dtype}_{shape.ignore_frac}.pt"
        if path and path.exists():
            refs[fwd] = torch.load(path)
        else:
            refs[fwd] = reference(inputs, ctx["alpha"], reverse=not fwd)
            if path:
                torch.save(refs[fwd], path)
    return refs


def run_shapes(methods, shapes, ctx: dict, deadline: float, emit, ref_methods=None) -> None:
    for shape in shapes:
        inputs = ref = None
        n_valid = shape.n - round(shape.ignore_frac * shape.n)
        for method in methods:
            if time.time() > deadline:
                emit(blank_row(method, shape, n_valid, "skipped", "time budget used up before this row"))
                continue
            if inputs is None:
                inputs = make_inputs(shape, ctx["device"], ctx["seed"])
                ref = references(inputs, shape, ref_methods or methods, ctx)
            emit(measure(method, shape, inputs, ref, ctx))
        del inputs, ref
        gc.collect()


# ------------------------------------------------------------------------------------------- CPU workers
def worker_main(job_path: str) -> None:
    """A fresh process for one method over every shape: its memory high-water mark starts clean."""
    with B.worker_job(job_path) as (job, ctx, emit):
        run_shapes(job["methods"], [Shape(**s) for s in job["shapes"]], ctx, job["deadline"], emit,
                   ref_methods=job["all_methods"])


def merge_rounds(rows: list[dict]) -> list[dict]:
    """One row per (method, shape) from several rounds: the median of the rounds' median times (each round's is
    kept in `time_ms_rounds`), the largest peak memory; the first round's errors (the same inputs each round)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], r["n"], r["d"], r["v"], r["dtype"], r["ignore_frac"]), []).append(r)
    out = []
    for group in groups.values():
        ok = [r for r in group if r["status"] == "ok"]
        if not ok:
            out.append(group[0])
            continue
        row = dict(ok[0], time_ms_rounds=[r["time_ms"] for r in ok], load_avg=[r["load_avg"] for r in ok])
        row["time_ms"] = statistics.median(row["time_ms_rounds"])
        row["time_ms_q25"] = min(r["time_ms_q25"] for r in ok)
        row["time_ms_q75"] = max(r["time_ms_q75"] for r in ok)
        row["reps"] = sum(r["reps"] for r in ok)
        row["peak_extra_bytes"] = max(r["peak_extra_bytes"] for r in ok)
        row["tflops"] = row["flops"] / row["time_ms"] / 1e9
        if len(ok) < len(group):
            row["note"] = (row["note"] + "; " if row["note"] else "") + f"{len(group) - len(ok)} round(s) failed"
        out.append(row)
    return out


def run_cpu_workers(methods, shapes, ctx, deadline, worker_timeout: float, emit) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for i, method in enumerate(methods):
            job = {"methods": [method], "shapes": [asdict(s) for s in shapes], "deadline": deadline,
                   "ctx": {k: v for k, v in ctx.items() if k != "probe"}, "out": f"{tmp}/rows{i}.jsonl",
                   "all_methods": methods}
            print(f"  worker: {method}", flush=True)
            got, failure = B.run_worker(__file__, job, Path(f"{tmp}/job{i}.json"), worker_timeout)
            done = {(r["n"], r["d"], r["v"], r["ignore_frac"]) for r in got}
            got += [blank_row(method, s, None, "error", failure or "worker wrote no row") for s in shapes
                    if (s.n, s.d, s.v, s.ignore_frac) not in done]
            for r in got:
                emit(r)


# ------------------------------------------------------------------------------------------- verdicts
def _find(rows, method, shape_key):
    return next((r for r in rows if r["method"] == method and r["status"] == "ok"
                 and (r["n"], r["d"], r["v"], r["dtype"], r["ignore_frac"]) == shape_key), None)


TIME_TARGETS = {"materialise": "materialising", "matmuls_chunked": "its matmuls (same chunks)",
                "liger_fljsd": "Liger FLJSD(beta=1)"}


def _time_ratio(a: dict, b: dict) -> tuple[float, str]:
    """a's time over b's and how it was taken: the median of the per-cycle ratios of interleaved calls (seconds
    apart), else of the per-round ratios (minutes apart), else the ratio of the medians."""
    for key, how in (("time_ms_interleaved_all", "median of interleaved per-call ratios"),
                     ("time_ms_rounds", "median of the rounds' ratios")):
        ra, rb = a.get(key), b.get(key)
        if ra and rb and len(ra) == len(rb):
            return statistics.median(x / y for x, y in zip(ra, rb)), how
    return a["time_ms"] / b["time_ms"], ""


def _target(name, measured, threshold, detail=""):
    return B._target(name, measured, threshold, at_least=False, detail=detail)


def verdicts(rows) -> list[dict]:
    """The targets, each judged where its rows were measured: everywhere, the fused op's peak extra memory
    within its bound; on CPU (N = 2048, d = 512, V = 32000) time ≤ 1.2× materialising; on a GPU time ≤ 1.3× its
    own matmuls and ≤ Liger's fused linear JSD(β=1) in time and memory."""
    out = []
    keys = sorted({(r["n"], r["d"], r["v"], r["dtype"], r["ignore_frac"]) for r in rows})
    for key in keys:
        fused = _find(rows, "rklu_fused", key)
        if fused is None:
            continue
        label = f"N={key[0]} d={key[1]} V={key[2]} {key[3]} {key[4]:.0%} ignored"
        out.append(_target(f"peak extra / bound, {label}", fused["peak_extra_bytes"] / fused["bound_bytes"], 1.0,
                           "bound: fp32 dW + returned dW + dhidden + 3·C·V·4 B"))
        for other, threshold, when in (("materialise", 1.2, key[:4] == (2048, 512, 32000, "fp32")),
                                       ("matmuls_chunked", 1.3, key[3] == "bf16"),
                                       ("liger_fljsd", 1.0, True)):
            row = _find(rows, other, key)
            if row is None or not when:
                continue
            ratio, how = _time_ratio(fused, row)
            out.append(_target(f"time / {TIME_TARGETS[other]}, {label}", ratio, threshold, how))
            if other == "liger_fljsd":
                out.append(_target(f"peak extra / {TIME_TARGETS[other]}, {label}",
                                   fused["peak_extra_bytes"] / row["peak_extra_bytes"], 1.0))
    return out


# ------------------------------------------------------------------------------------------- reports
def markdown(report: dict) -> str:
    dev, ver = report["device"], report["versions"]
    lines = [f"# bench_fused_linear: {dev['name']}, {report['date']}", "",
             f"Device: {dev['name']} ({dev['detail']}); load average at the end "
             f"{fmt_load(dev.get('load_avg_end'))}; torch {ver['torch']}, triton {ver['triton']}, liger-kernel "
             f"{ver['liger_kernel']}. KL backend: `{report['settings']['backend']}`. Wall time "
             f"{report['wall_s']:.0f} s. Command: `{report['command']}`", ""]
    if report["settings"]["dry_run"]:
        lines += ["**Dry run: tiny shapes, figures mean nothing.**", ""]
    if report["verdicts"]:
        lines += ["| target | measured | threshold | verdict |", "|---|---|---|---|"]
        for t in report["verdicts"]:
            verdict = {True: "PASS", False: "MISS", None: "n/a"}[t["pass"]]
            lines.append(f"| {t['target']} | {B.fmt(t['measured'])} | <= {B.fmt(t['threshold'])} | {verdict} "
                         f"{t['detail']} |")
        lines.append("")
    head = ("| method | status | time ms (IQR) | GFLOP | TFLOP/s | peak extra MiB | bound MiB | C | loss rel err "
            "| dh rel err | dW rel err | note |")
    shapes = list(dict.fromkeys((r["n"], r["d"], r["v"], r["dtype"], r["ignore_frac"]) for r in report["rows"]))
    for key in shapes:
        n, d, v, dtype, ign = key
        lines += [f"### N={n}, d={d}, V={v}, {dtype}, {ign:.0%} ignored rows", "", head, "|" + "---|" * 12]
        for r in report["rows"]:
            if (r["n"], r["d"], r["v"], r["dtype"], r["ignore_frac"]) != key:
                continue
            t = f"{r['time_ms']:.4g} ({r['time_ms_q25']:.4g}-{r['time_ms_q75']:.4g})" if r["time_ms"] else "-"
            if len(r.get("time_ms_rounds") or []) > 1:
                t += "; rounds " + "/".join(f"{x:.4g}" for x in r["time_ms_rounds"])
            if r.get("time_ms_interleaved"):
                t += f"; interleaved {r['time_ms_interleaved']:.4g}"
            note = r["reason"] if r["status"] != "ok" else r["note"]
            lines.append(f"| {r['method']} | {r['status']} | {t} | {B.fmt(r['flops'] and r['flops'] / 1e9, '.1f')} "
                         f"| {B.fmt(r['tflops'], '.3g')} | {B.fmt(mib(r['peak_extra_bytes']), '.1f')} "
                         f"| {B.fmt(mib(r['bound_bytes']), '.1f')} | {B.fmt(r['chunk_rows'], 'd')} "
                         f"| {B.fmt(r['loss_rel_err'], '.1e')} | {B.fmt(r['grad_hidden_rel_err'], '.1e')} "
                         f"| {B.fmt(r['grad_weight_rel_err'], '.1e')} | {note or ''} |")
        lines.append("")
    return "\n".join(lines)


def mib(nbytes):
    return None if nbytes is None else nbytes / 2**20


def fmt_load(load):
    return "-" if not load else "/".join(f"{x:.1f}" for x in load)


def plot(report: dict, stem: Path) -> list[str]:
    """One PNG: per (d, V) a row of two bar charts, time (the interleaved median where measured) and peak extra
    memory per method, one bar per (N, ignored fraction)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    dvs = sorted({(r["d"], r["v"]) for r in ok})
    if not dvs:
        return []
    fig, axes = plt.subplots(len(dvs), 2, figsize=(13, 4.2 * len(dvs)), squeeze=False)
    for i, (d, v) in enumerate(dvs):
        rows = [r for r in ok if (r["d"], r["v"]) == (d, v)]
        configs = sorted({(r["n"], r["ignore_frac"]) for r in rows})
        methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
        width = 0.8 / len(configs)
        for j, (what, value) in enumerate((
                ("time (ms)", lambda r: r.get("time_ms_interleaved") or r["time_ms"]),
                ("peak extra memory (MiB)", lambda r: None if r["method"].startswith("matmuls")
                 else mib(r["peak_extra_bytes"])))):
            ax = axes[i][j]
            for k, (n, ign) in enumerate(configs):
                ys = [next((value(r) for r in rows if (r["method"], r["n"], r["ignore_frac"]) == (m, n, ign)), None)
                      for m in methods]
                xs = [x + k * width for x, y in zip(range(len(methods)), ys) if y is not None]
                ax.bar(xs, [y for y in ys if y is not None], width, label=f"N={n}, {ign:.0%} ignored")
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(methods))], methods, rotation=30, ha="right",
                          fontsize=8)
            ax.set(ylabel=what, title=f"d={d}, V={v}")
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"fused linear KL, {report['device']['name'][:40]}, {report['settings']['dtype']}, "
                 f"{report['date'][:10]}", fontsize=10)
    fig.tight_layout()
    path = f"{stem}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


# ------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU; checks the pipeline and schema")
    p.add_argument("--n", type=int, nargs="+", help="rows (tokens); default by device")
    p.add_argument("--dv", nargs="+", help="hidden size and vocab as d:V pairs; default by device")
    p.add_argument("--dtype", choices=tuple(B.DTYPES), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--ignore", type=float, nargs="+", default=[0.0], help="fractions of ignored rows")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="default: all (CPU: no Liger)")
    p.add_argument("--backend", default=None, help="rklu_fast KL backend (default: cpu on CPU, auto on GPU)")
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="CPU: torch.set_num_threads")
    p.add_argument("--min-reps", type=int, default=5, help="CPU: at least this many timed calls")
    p.add_argument("--min-time", type=float, default=1.0, help="CPU: and at least this many seconds of them")
    p.add_argument("--warmup-ms", type=int, default=25, help="GPU: do_bench warm-up")
    p.add_argument("--rep-ms", type=int, default=100, help="GPU: do_bench repetition time")
    p.add_argument("--isolation", choices=("method", "none"), help="CPU: a fresh worker process per method "
                   "(default; clean memory high-water marks) or none (in this process)")
    p.add_argument("--interleave", type=int, default=0, help="CPU: then time every method again in this one "
                   "process, this many calls each, in turn (the time verdicts pair these calls)")
    p.add_argument("--rounds", type=int, default=1, help="CPU workers: run every method this many times in turn "
                   "and report the median of the rounds (a shared machine's load changes)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; dry run: eager)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; rows past it are reported skipped")
    p.add_argument("--worker-timeout", type=float, default=1800)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="appended to the file names (e.g. run2)")
    p.add_argument("--from-json", type=Path, help="only rewrite the Markdown and PNG of a saved JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.n, args.dv = "cpu", args.n or [48], args.dv or ["24:301"]
        args.dtype, args.isolation = args.dtype or "fp32", args.isolation or "none"
        args.compile_backend = args.compile_backend or "eager"
        args.min_reps, args.min_time, args.threads = 1, 0.0, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu or --dry-run)")
    gpu = args.device == "cuda"
    args.n = args.n or ([16384, 4096] if gpu else [2048])
    args.dv = [tuple(int(x) for x in s.split(":")) for s in args.dv] if args.dv else \
        (list(GPU_SHAPES) if gpu else [(512, 32000)])
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.methods = args.methods or [m for m in METHODS if gpu or not m.startswith("liger")]
    args.backend = args.backend or ("auto" if gpu else "cpu")
    args.isolation = args.isolation or "method"
    args.compile_backend = args.compile_backend or "inductor"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return {}
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        report["verdicts"] = verdicts(report["rows"])
        return write_reports(report, args.from_json.with_suffix(""))
    start = time.time()
    deadline = start + args.time_budget if args.time_budget else float("inf")
    B.allow_recompiles()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    # Priority order (a time budget cuts the last rows): each (d, V) in turn, largest N first.
    shapes = [Shape(n, d, v, args.dtype, ign) for d, v in args.dv for ign in sorted(args.ignore)
              for n in sorted(args.n, reverse=True)]
    print(f"bench_fused_linear: device={args.device} dtype={args.dtype} N={args.n} (d, V)={args.dv} "
          f"methods={args.methods}", flush=True)
    ctx = {"device": args.device, "alpha": args.alpha, "seed": args.seed, "threads": args.threads,
           "backend": args.backend, "compile_backend": args.compile_backend, "min_reps": args.min_reps,
           "min_time": args.min_time, "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms}
    report = {"schema": SCHEMA, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmarks/bench_fused_linear.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "device": B.device_info(args.device, args.threads),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "triton": B._version("triton"), "liger_kernel": B._version("liger-kernel")},
              "settings": {"dtype": args.dtype, "n": args.n, "dv": args.dv, "ignore": args.ignore,
                           "methods": args.methods, "backend": args.backend, "alpha": args.alpha,
                           "seed": args.seed, "dry_run": args.dry_run, "compile_backend": args.compile_backend,
                           "isolation": args.isolation, "rounds": args.rounds, "interleave": args.interleave,
                           "timing": ("triton.testing.do_bench median (CUDA events, L2 flushed)" if args.device ==
                                      "cuda" else f"time.perf_counter median, >= {args.min_reps} calls and "
                                                  f">= {args.min_time} s after a warm-up call"),
                           "memory": ("torch.cuda.max_memory_allocated - memory_allocated before the call"
                                      if args.device == "cuda" else "VmHWM of a fresh worker after a clear_refs "
                                      "reset, minus VmRSS before the call"),
                           "flops": "2·V·d per row per GEMM; fused and matmuls: valid rows only",
                           "chunk_budget_bytes": rklu_fast.fused_linear.CHUNK_BUDGET_BYTES},
              "rows": [], "verdicts": [], "wall_s": 0.0}
    slug = f"cpu-{args.threads}t" if args.device == "cpu" else \
        re.sub(r"[^a-z0-9]+", "-", report["device"]["name"].lower()).strip("-")[:40]
    tag = f"_{args.tag}" if args.tag else ""
    stem = args.out / f"bench_fused_linear_{slug}_{report['date'][:10]}{'_dryrun' if args.dry_run else ''}{tag}"
    args.out.mkdir(parents=True, exist_ok=True)

    def save():
        report["wall_s"] = time.time() - start
        report["verdicts"] = verdicts(report["rows"])
        Path(f"{stem}.json").write_text(json.dumps(report, indent=1))
        Path(f"{stem}.md").write_text(markdown(report) + "\n")

    def emit(row):  # the JSON is rewritten after every row: a run cut short still leaves its figures
        report["rows"].append(row)
        print(f"  {row['method']:<16} N={row['n']:<6} d={row['d']:<5} V={row['v']:<6} {row['status']:<11} "
              f"{B.fmt(row['time_ms'], '.4g')} ms {B.fmt(mib(row['peak_extra_bytes']), '.0f')} MiB "
              f"{(row['reason'] or '')[:80]}", flush=True)
        save()

    if args.device == "cuda" or args.isolation == "none":
        ctx["probe"] = B.CudaProbe() if args.device == "cuda" else B.RssProbe()
        run_shapes(args.methods, shapes, ctx, deadline, emit)
    else:  # rounds alternate the methods, so that a change of load on a shared machine hits them alike
        with tempfile.TemporaryDirectory() as ref_dir:
            ctx["ref_dir"] = ref_dir
            for r in range(args.rounds):  # odd rounds in reverse order: a steady drift of load cancels out
                order = args.methods if r % 2 == 0 else args.methods[::-1]
                run_cpu_workers(order, shapes, ctx, deadline, args.worker_timeout, emit)
        report["rows"] = merge_rounds(report["rows"])
    if args.interleave and args.device == "cpu":
        print(f"  interleaved timing: {args.interleave} cycles per shape", flush=True)
        ctx["probe"] = B.RssProbe()
        for shape in shapes:
            times = interleaved_times(args.methods, shape, ctx, args.interleave)
            for r in report["rows"]:
                if (r["n"], r["d"], r["v"], r["ignore_frac"]) == (shape.n, shape.d, shape.v, shape.ignore_frac) \
                        and times.get(r["method"]):
                    r["time_ms_interleaved_all"] = times[r["method"]]
                    r["time_ms_interleaved"] = statistics.median(times[r["method"]])
            save()
    order = {(s.n, s.d, s.v, s.ignore_frac): i for i, s in enumerate(shapes)}
    report["rows"].sort(key=lambda r: (order.get((r["n"], r["d"], r["v"], r["ignore_frac"]), len(order)),
                                       METHODS.index(r["method"])))
    report["device"]["load_avg_end"] = os.getloadavg()
    save()
    return write_reports(report, stem)


def write_reports(report: dict, stem: Path) -> dict:
    report["plots"] = [os.path.basename(p) for p in plot(report, stem)]
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1))
    Path(f"{stem}.md").write_text(markdown(report) + "\n")
    for t in report["verdicts"]:
        print(f"{t['target']:<70} {B.fmt(t['measured']):>8} <= {B.fmt(t['threshold'])}  "
              f"{ {True: 'PASS', False: 'MISS', None: 'n/a'}[t['pass']]}")
    print(f"wrote {stem}.json, {stem}.md and {len(report['plots'])} PNG; run took {report['wall_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
