"""Reverse-KL loss benchmark: time, bandwidth, peak extra memory and accuracy of every implementation side by side.

    python benchmarks/bench_loss.py                 # GPU if there is one: full grid, bf16
    python benchmarks/bench_loss.py --device cpu    # N <= 2048, V = 32000, fp32, 2 threads, + the issue-4 verdict
    python benchmarks/bench_loss.py --dry-run       # tiny shapes on CPU: checks the whole pipeline in seconds

Methods live in benchmarks/methods.py. Writes bench_loss_<device>_<date>.{json,md} and one PNG per vocab size
(time and peak extra memory vs N) to --out (default benchmarks/results/). How each figure is measured: see
benchmarks/NOTES.md. A method that cannot be built, fails or runs out of memory is a row with its reason.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Triton reads this when it decorates a kernel; the CPU workers are started with it set.
INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET") == "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # rklu_fast from this checkout when not installed
import methods as M  # noqa: E402

SCHEMA = "rklu_fast.bench_loss/1"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwdbwd", "fwd")  # fwdbwd: loss + loss.backward(); fwd: loss under torch.no_grad()
REF_GRAD_ROWS = 128  # gradient error is measured on the first rows (a slice), against float64
RESULTS = Path(__file__).resolve().parent / "results"
ROW_KEYS = ("method", "label", "n", "v", "dtype", "ignore_frac", "n_valid", "mode", "status", "reason", "note",
            "time_ms", "time_ms_q25", "time_ms_q75", "reps", "first_call_s", "timing_meaningful", "floor_bytes",
            "achieved_gbps", "pct_copy_bw", "peak_extra_bytes", "peak_extra_vs_grad", "loss", "loss_rel_err",
            "grad_rel_err")


@dataclass(frozen=True)
class Config:
    n: int
    v: int
    dtype: str
    ignore_frac: float
    mode: str

    @property
    def inputs_key(self):
        return (self.n, self.v, self.dtype, self.ignore_frac)


# ---------------------------------------------------------------------------------------------- the inputs
def make_inputs(n: int, v: int, dtype: str, ignore_frac: float, device: str, seed: int):
    """Three logits tensors like a fine-tuned pair and a student near the original, plus labels with
    round(ignore_frac * n) rows ignored. Deterministic for (seed, shape) on a given device."""
    g = torch.Generator(device=device).manual_seed(seed)
    original = 2.0 * torch.randn(n, v, generator=g, device=device)
    augmented = (original + 0.5 * torch.randn(n, v, generator=g, device=device)).to(DTYPES[dtype])
    student = (original + 0.3 * torch.randn(n, v, generator=g, device=device)).to(DTYPES[dtype])
    original = original.to(DTYPES[dtype])
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    ignored = torch.randperm(n, generator=g, device=device)[: round(ignore_frac * n)]
    labels[ignored] = M.IGNORE_INDEX
    return student, original, augmented, labels


def reference_loss(inputs, alpha: float, chunk_rows: int = 256) -> float:
    """The float64 loss over all rows, computed a chunk of rows at a time to bound memory."""
    student, original, augmented, labels = inputs
    valid = (labels != M.IGNORE_INDEX).double()
    total = sum((M.row_kl(s, o, a, alpha, torch.float64) * m).sum().item() for s, o, a, m in zip(
        student.split(chunk_rows), original.split(chunk_rows), augmented.split(chunk_rows), valid.split(chunk_rows)))
    return total / max(valid.sum().item(), 1.0)


def reference_grad_rows(inputs, alpha: float, rows: int) -> torch.Tensor:
    """float64 d(loss)/d(student) for the first `rows` rows (the divisor is the full count of valid rows)."""
    student, original, augmented, labels = inputs
    s = student[:rows].detach().double().requires_grad_(True)
    valid = (labels != M.IGNORE_INDEX).double()
    row_loss = M.row_kl(s, original[:rows], augmented[:rows], alpha, torch.float64) * valid[:rows]
    (row_loss.sum() / valid.sum().clamp_min(1)).backward()
    return s.grad


def byte_floor(cfg: Config, n_valid: int) -> int:
    """Fewest bytes a fused kernel must move. Valid rows read student, original and augmented once; ignored rows
    read nothing; with a backward the gradient ([N, V], student dtype, zeros on ignored rows) is written once."""
    elem = torch.tensor([], dtype=DTYPES[cfg.dtype]).element_size()
    reads = 3 * n_valid * cfg.v * elem
    return reads + (cfg.n * cfg.v * elem if cfg.mode == "fwdbwd" else 0)


# ------------------------------------------------------------------------------------- memory and timing
class CudaProbe:
    """Peak bytes allocated by the caching allocator during one call, above what was allocated before it."""

    def run(self, fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base


try:
    import ctypes
    _LIBC = ctypes.CDLL("libc.so.6")  # glibc: malloc_trim
except OSError:
    _LIBC = None


class RssProbe:
    """Peak resident memory during one call, above the resident memory just before it (inputs, torch, compiled
    code). Resets the kernel's high-water mark first (`echo 5 > /proc/self/clear_refs`), so one fresh worker
    process can measure several calls; reads VmHWM, the counter getrusage's ru_maxrss reports for this process
    (ru_maxrss also keeps the parent's peak inherited through exec, which VmHWM does not)."""

    @staticmethod
    def _status_kib(field: str) -> int:
        return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))

    def run(self, fn):
        gc.collect()
        if _LIBC is not None:  # hand freed heap pages back, so that re-using them shows in the high-water mark
            _LIBC.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        base = self._status_kib("VmRSS")
        out = fn()
        return out, (self._status_kib("VmHWM") - base) * 1024


def time_cuda(step, warmup_ms: int, rep_ms: int) -> list[float]:
    """CUDA-event times (ms) of each repetition; do_bench zeroes a 256 MB buffer before each one (L2 flushed)."""
    import triton.testing
    return list(triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="all"))


def time_cpu(step, min_reps: int, min_time_s: float, max_reps: int = 50) -> list[float]:
    times, start = [], time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure_copy(device: str, args) -> dict:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written: the ceiling for this run."""
    nbytes = (1 << 30) if device == "cuda" else (32 << 20) if args.dry_run else (256 << 20)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    step = lambda: dst.copy_(src)  # noqa: E731
    step()
    times = time_cuda(step, 25, 200) if device == "cuda" else time_cpu(step, max(args.min_reps, 5), args.min_time)
    ms = statistics.median(times)
    return {"bytes_each_way": nbytes, "time_ms": ms, "bandwidth_gbps": 2 * nbytes / ms / 1e6}


# ------------------------------------------------------------------------------------------- one row
def blank_row(method: M.Method, cfg: Config, n_valid: int, status: str, reason: str = "") -> dict:
    row = dict.fromkeys(ROW_KEYS)
    row.update(method=method.name, label=method.label, n_valid=n_valid, status=status, reason=reason or None,
               note="", timing_meaningful=False, **asdict(cfg))
    return row


def measure(method: M.Method, cfg: Config, inputs, ref_loss: float, ref_grad, ctx: dict) -> dict:
    """One row: build the method, warm it up (compiles), measure peak memory on one call (its loss and gradient
    give the errors), then time it."""
    student, original, augmented, labels = inputs
    n_valid = int((labels != M.IGNORE_INDEX).sum())
    device = ctx["device"]
    interpreted = device == "cpu" and method.interpreted_on_cpu
    row = blank_row(method, cfg, n_valid, "ok")
    grad_bytes = student.numel() * student.element_size()
    try:
        if method.kind == "sol":
            out = torch.empty_like(student)
            step = lambda: torch.addcmul(student, original, augmented, out=out)  # noqa: E731
            row["floor_bytes"] = 4 * grad_bytes
        else:
            fn, row["note"] = M.build(method.name, device, ctx["compile_backend"])
            alpha = ctx["alpha"]
            student.requires_grad_(cfg.mode == "fwdbwd")

            def step():
                if cfg.mode == "fwd":
                    with torch.no_grad():
                        return fn(student, original, augmented, labels, alpha)
                student.grad = None
                loss = fn(student, original, augmented, labels, alpha)
                loss.backward()
                return loss
            row["floor_bytes"] = byte_floor(cfg, n_valid)
        if not interpreted:  # the interpreter has nothing to warm up, and one call of it is slow enough
            t0 = time.perf_counter()
            step()  # warm-up: compiles, autotunes, loads modules
            if device == "cuda":
                torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t0
        if method.kind != "sol":
            student.grad = None
        t0 = time.perf_counter()
        result, extra = ctx["probe"].run(step)
        probe_ms = (time.perf_counter() - t0) * 1e3
        row["peak_extra_bytes"] = extra
        row["peak_extra_vs_grad"] = extra / grad_bytes
        if method.kind != "sol":
            row["loss"] = float(result.detach())
            row["loss_rel_err"] = abs(row["loss"] - ref_loss) / abs(ref_loss)
            if cfg.mode == "fwdbwd":
                g = student.grad[: ref_grad.shape[0]].double().cpu()
                row["grad_rel_err"] = float((g - ref_grad).norm() / ref_grad.norm())
        if interpreted:
            times = [probe_ms]
            row["note"] = (row["note"] + "; " if row["note"] else "") + "Triton interpreter: time not meaningful"
        elif device == "cuda":
            times = time_cuda(step, ctx["warmup_ms"], ctx["rep_ms"])
        else:
            times = time_cpu(step, ctx["min_reps"], ctx["min_time"])
        q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        row.update(time_ms=statistics.median(times), time_ms_q25=q[0], time_ms_q75=q[2], reps=len(times),
                   timing_meaningful=not interpreted)
        row["achieved_gbps"] = row["floor_bytes"] / row["time_ms"] / 1e6
        row["pct_copy_bw"] = 100 * row["achieved_gbps"] / ctx["copy_gbps"]
    except M.Unavailable as e:
        row = blank_row(method, cfg, n_valid, "unavailable", str(e))
    except torch.OutOfMemoryError as e:
        row = blank_row(method, cfg, n_valid, "oom", str(e).splitlines()[0][:200])
    except Exception as e:  # noqa: BLE001 - a failing competitor is a result, not a crash of the benchmark
        row = blank_row(method, cfg, n_valid, "error", f"{type(e).__name__}: {e}"[:300])
    finally:
        student.requires_grad_(False)
        student.grad = None
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def wanted(method: M.Method, cfg: Config) -> bool:
    return method.kind != "sol" or (cfg.ignore_frac == 0 and cfg.mode == "fwdbwd")  # one speed-of-light row


def not_run_reasons(method_names, ctx: dict) -> dict:
    """{method: reason} for loss methods that cannot be built here (found once, before any input is made)."""
    reasons = {}
    for name in method_names:
        if ctx["device"] == "cpu" and M.BY_NAME[name].interpreted_on_cpu and not INTERPRET_AT_START:
            reasons[name] = ("Triton on CPU needs TRITON_INTERPRET=1 set before the process starts (the worker "
                             "processes of --isolation method/single have it)")
        elif M.BY_NAME[name].kind == "loss":
            try:
                M.build(name, ctx["device"], ctx["compile_backend"])
            except M.Unavailable as e:
                reasons[name] = str(e)
    return reasons


def run_configs(method_names, configs, refs: dict, ctx: dict, deadline: float, emit):
    """Measure every method at every config (inputs built once per input set, and only when something will run
    on them); emit(row) for each."""
    unavailable = not_run_reasons(method_names, ctx)
    for key, group in itertools.groupby(configs, key=lambda c: c.inputs_key):
        todo = [(cfg, M.BY_NAME[name]) for cfg in group for name in method_names if wanted(M.BY_NAME[name], cfg)]
        n_valid = key[0] - round(key[3] * key[0])
        interp_skip = ctx["device"] == "cpu" and key[0] > ctx["interp_max_n"]
        inputs = ref_grad = None
        for cfg, method in todo:
            if method.name in unavailable:
                emit(blank_row(method, cfg, n_valid, "unavailable", unavailable[method.name]))
            elif interp_skip and method.interpreted_on_cpu:
                emit(blank_row(method, cfg, n_valid, "skipped", f"Triton on CPU runs only in its interpreter "
                               f"(correctness, not speed): run at N <= {ctx['interp_max_n']} only"))
            elif time.time() > deadline:
                emit(blank_row(method, cfg, n_valid, "skipped", "time budget used up before this row"))
            else:
                if inputs is None:
                    inputs = make_inputs(*key, device=ctx["device"], seed=ctx["seed"])
                    ref_grad = reference_grad_rows(inputs, ctx["alpha"], min(REF_GRAD_ROWS, key[0])).cpu()
                emit(measure(method, cfg, inputs, refs[cfg.inputs_key], ref_grad, ctx))
        del inputs
        gc.collect()


def allow_recompiles() -> None:
    """One compile per shape and grad mode: past dynamo's default limit of 8 it would silently run eager."""
    for name in ("recompile_limit", "cache_size_limit"):  # the older name first existed alone
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)


# ------------------------------------------------------------------------------------- CPU worker processes
def run_worker(script: str, job: dict, job_path: Path, timeout: float, env: dict | None = None
               ) -> tuple[list[dict], str]:
    """Runs ``script --worker job_path`` in a fresh process (its memory high-water starts clean): the rows it
    wrote to ``job["out"]`` and why it failed ("" when it exited cleanly)."""
    job_path.write_text(json.dumps(job))
    try:
        proc = subprocess.run([sys.executable, script, "--worker", str(job_path)], env=env,
                              capture_output=True, text=True, timeout=timeout)
        failure = f"worker exited {proc.returncode}: {proc.stderr.strip()[-300:]}" if proc.returncode else ""
    except subprocess.TimeoutExpired:
        failure = f"worker killed after {timeout:.0f} s"
    out = Path(job["out"])
    return ([json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []), failure


@contextlib.contextmanager
def worker_job(job_path: str):
    """In a worker process: its job, its context (with a fresh memory probe) and a row writer that flushes each
    row, so a crash keeps the rows already measured."""
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["ctx"]["threads"])
    allow_recompiles()
    with open(job["out"], "a") as out:
        def emit(row):
            out.write(json.dumps(row) + "\n")
            out.flush()
        yield job, dict(job["ctx"], probe=RssProbe()), emit


def worker_main(job_path: str) -> None:
    """Runs in a fresh process: one (or, with --isolation single, every) method over the configs of a job."""
    with worker_job(job_path) as (job, ctx, emit):
        refs = {tuple(r["key"]): r["loss"] for r in job["refs"]}
        run_configs(job["methods"], [Config(**c) for c in job["configs"]], refs, ctx, job["deadline"], emit)


def run_cpu_workers(method_names, configs, refs, ctx, deadline, isolation: str, worker_timeout: float, emit):
    """A fresh subprocess per method (isolation "method") or one for all (isolation "single"), so that each
    method's memory high-water starts from a clean process. emit(row) for each row once its worker ends."""
    groups = [[m] for m in method_names] if isolation == "method" else [list(method_names)]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")  # before any @triton.jit is decorated
    with tempfile.TemporaryDirectory() as tmp:
        for i, names in enumerate(groups):
            job = {"methods": names, "configs": [asdict(c) for c in configs], "deadline": deadline,
                   "refs": [{"key": list(k), "loss": v} for k, v in refs.items()],
                   "ctx": {k: v for k, v in ctx.items() if k != "probe"}, "out": f"{tmp}/rows{i}.jsonl"}
            print(f"  worker: {', '.join(names)}", flush=True)
            got, failure = run_worker(__file__, job, Path(f"{tmp}/job{i}.json"), worker_timeout, env)
            done = {(r["method"], r["n"], r["v"], r["ignore_frac"], r["mode"]) for r in got}
            for name, cfg in itertools.product(names, configs):  # rows a crashed worker never wrote
                method = M.BY_NAME[name]
                if wanted(method, cfg) and (name, cfg.n, cfg.v, cfg.ignore_frac, cfg.mode) not in done:
                    got.append(blank_row(method, cfg, None, "error", failure or "worker wrote no row"))
            for r in got:
                emit(r)


# ------------------------------------------------------------------------------------------- verdicts
def _find(rows, method, n, v, dtype, mode, ignore=0.0):
    for r in rows:
        if (r["method"], r["n"], r["v"], r["dtype"], r["mode"], r["ignore_frac"]) == (method, n, v, dtype, mode,
                                                                                     ignore):
            return r
    return None


def _speedup(rows, subject, others, where):
    """Best time among `others` over the subject's time, or None when either is missing."""
    base = [r["time_ms"] for m in others if (r := _find(rows, m, *where)) and r["status"] == "ok"]
    return min(base) / subject["time_ms"] if base else None


def _target(name, measured, threshold, at_least=True, detail=""):
    ok = None if measured is None else (measured >= threshold if at_least else measured <= threshold)
    return {"target": name, "measured": measured, "threshold": threshold, "at_least": at_least,
            "pass": ok, "detail": detail}


def verdicts(rows) -> list[dict]:
    """Issue 4's CPU targets (N=2048, V=32000, fp32, fwd+bwd) and issue 5's GPU targets (N=16384, V=32000, bf16),
    each judged only when its row set was measured."""
    out = []
    where = (2048, 32000, "fp32", "fwdbwd")
    cpu, eager = _find(rows, "rklu_cpu", *where), _find(rows, "eager", *where)
    if eager is not None and eager["status"] == "ok":  # the CPU grid ran at the issue-4 shape
        if cpu is None or cpu["status"] != "ok":
            why = cpu["reason"] if cpu else "not measured"
            out.append(_target("issue 4: C++ cpu backend measured", None, None, detail=why))
        else:
            out += [_target("issue 4: cpu vs eager speed-up", _speedup(rows, cpu, ["eager"], where), 5.0),
                    _target("issue 4: cpu vs torch.compile speed-up", _speedup(rows, cpu, ["compile"], where), 1.0),
                    _target("issue 4: cpu vs chunked torch.compile speed-up",
                            _speedup(rows, cpu, ["compile_chunked"], where), 1.0, detail="informative"),
                    _target("issue 4: cpu peak extra / gradient", cpu["peak_extra_vs_grad"], 1.25, at_least=False)]
    where = (16384, 32000, "bf16", "fwdbwd")
    for backend, floor_pct in (("cuda", 80.0), ("triton", 65.0)):
        r = _find(rows, f"rklu_{backend}", *where)
        if r is None or r["status"] != "ok":
            continue
        out += [_target(f"issue 5: {backend} % of copy bandwidth (gradient-writing forward)", r["pct_copy_bw"],
                        floor_pct),
                _target(f"issue 5: {backend} vs eager", _speedup(rows, r, ["eager"], where), 5.0),
                _target(f"issue 5: {backend} vs best torch.compile",
                        _speedup(rows, r, ["compile", "compile_chunked"], where), 1.5),
                _target(f"issue 5: {backend} vs Liger JSD(beta=1)", _speedup(rows, r, ["liger_jsd"], where), 1.3),
                _target(f"issue 5: {backend} peak extra / bf16 gradient", r["peak_extra_vs_grad"], 1.1,
                        at_least=False)]
    return out


# ------------------------------------------------------------------------------------------- reports
def fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    dev, ver, copy = report["device"], report["versions"], report["copy"]
    lines = [f"# bench_loss: {dev['name']}, {report['date']}", "",
             f"Device: {dev['name']} ({dev['detail']}); torch {ver['torch']}, triton {ver['triton']}, "
             f"liger-kernel {ver['liger_kernel']}, torchtune {ver['torchtune']}. "
             f"Copy bandwidth (read + write): {copy['bandwidth_gbps']:.1f} GB/s. Wall time {report['wall_s']:.0f} s. "
             f"Command: `{report['command']}`", ""]
    if report["settings"]["dry_run"]:
        lines += ["**Dry run: tiny shapes, figures mean nothing.**", ""]
    if report["verdicts"]:
        lines += ["| target | measured | threshold | verdict |", "|---|---|---|---|"]
        for t in report["verdicts"]:
            verdict = {True: "PASS", False: "MISS", None: "n/a"}[t["pass"]]
            sign = ">=" if t["at_least"] else "<="
            lines.append(f"| {t['target']} | {fmt(t['measured'])} | {sign} {fmt(t['threshold'])} | {verdict} "
                         f"{t['detail']} |")
        lines.append("")
    head = ("| method | status | time ms (IQR) | GB/s | % copy bw | peak extra MiB | x grad | loss rel err "
            "| grad rel err | note |")
    for key, group in itertools.groupby(report["rows"], key=lambda r: (r["v"], r["dtype"], r["mode"], r["n"],
                                                                        r["ignore_frac"])):
        v, dtype, mode, n, ign = key
        lines += [f"### {mode}, N={n}, V={v}, {dtype}, {ign:.0%} ignored rows", "", head, "|" + "---|" * 10]
        for r in group:
            t = f"{r['time_ms']:.3g} ({r['time_ms_q25']:.3g}-{r['time_ms_q75']:.3g})" if r["time_ms"] else "-"
            mib = None if r["peak_extra_bytes"] is None else r["peak_extra_bytes"] / 2**20
            note = r["reason"] if r["status"] != "ok" else r["note"]
            lines.append(f"| {r['method']} | {r['status']} | {t} | {fmt(r['achieved_gbps'], '.1f')} "
                         f"| {fmt(r['pct_copy_bw'], '.1f')} | {fmt(mib, '.1f')} | {fmt(r['peak_extra_vs_grad'], '.2f')}"
                         f" | {fmt(r['loss_rel_err'], '.1e')} | {fmt(r['grad_rel_err'], '.1e')} | {note or ''} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, stem: Path) -> list[str]:
    """One PNG per vocab size: time and peak extra memory vs N, per method (0% ignored rows, measured rows;
    interpreter timings left out). A method keeps its colour in every panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths, names = [], list(M.BY_NAME)
    for v in sorted({r["v"] for r in report["rows"]}):
        fig, axes = plt.subplots(2, 2, figsize=(12, 9), squeeze=False)
        for i, mode in enumerate(MODES):
            for name in names:
                pts = sorted((r["n"], r) for r in report["rows"] if r["method"] == name and r["v"] == v and
                             r["mode"] == mode and r["ignore_frac"] == 0 and r["status"] == "ok")
                style = {"marker": "o", "label": name, "color": f"C{names.index(name)}"}
                timed = [(n, r["time_ms"]) for n, r in pts if r["timing_meaningful"]]
                if timed:
                    axes[i][0].plot(*zip(*timed), **style)
                if pts and M.BY_NAME[name].kind == "loss":
                    axes[i][1].plot([n for n, _ in pts], [r["peak_extra_bytes"] / 2**20 for _, r in pts], **style)
            for j, what in enumerate(("median time (ms)", "peak extra memory (MiB)")):
                ax = axes[i][j]
                ax.set_xscale("log", base=2)
                ax.set(xlabel="N (rows)", ylabel=what, title=f"{mode}, V={v}")
                if any(y > 0 for line in ax.lines for y in line.get_ydata()):
                    ax.set_yscale("log", nonpositive="mask")
                ax.grid(True, which="both", alpha=0.3)
                if ax.lines:
                    ax.legend(fontsize=7)
        fig.suptitle(f"reverse-KL loss, {report['device']['name']}, {report['settings']['dtype']}, "
                     f"0% ignored rows, {report['date'][:16].replace('T', ' ')} UTC")
        fig.tight_layout()
        path = f"{stem}_V{v}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------- environment
def _version(module: str):
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:  # noqa: BLE001
        return None


def device_info(device: str, threads: int) -> dict:
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            driver = None
        return {"type": "cuda", "name": p.name, "driver": driver, "cuda": torch.version.cuda,
                "detail": f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, driver {driver}, "
                          f"CUDA {torch.version.cuda}", "load_avg": os.getloadavg()}
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    name = model.group(1).strip() if model else platform.processor() or "cpu"
    return {"type": "cpu", "name": name, "driver": None, "cuda": None, "threads": threads,
            "detail": f"{os.cpu_count()} cores visible, torch.set_num_threads({threads}), "
                      f"load average {os.getloadavg()[0]:.1f} at start", "load_avg": os.getloadavg()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU; checks the pipeline and schema")
    p.add_argument("--n", type=int, nargs="+", help="rows (tokens); default by device")
    p.add_argument("--v", type=int, nargs="+", help="vocab sizes; default by device")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--ignore", type=float, nargs="+", default=[0.0, 0.5], help="fractions of ignored rows")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--methods", nargs="+", choices=tuple(M.BY_NAME), default=list(M.BY_NAME))
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="CPU: torch.set_num_threads (issue 4 uses 2)")
    p.add_argument("--min-reps", type=int, default=5, help="CPU: at least this many timed calls")
    p.add_argument("--min-time", type=float, default=1.0, help="CPU: and at least this many seconds of them")
    p.add_argument("--warmup-ms", type=int, default=25, help="GPU: do_bench warm-up")
    p.add_argument("--rep-ms", type=int, default=100, help="GPU: do_bench repetition time")
    p.add_argument("--interp-max-n", type=int, default=64, help="CPU: largest N for Triton-interpreter methods")
    p.add_argument("--isolation", choices=("method", "single", "none"), help="CPU: a fresh worker process per "
                   "method (default), one for all (dry run), or none (in this process: quickest, memory less clean)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; the dry "
                   "run uses 'eager' to skip code generation)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; rows past it are reported skipped")
    p.add_argument("--worker-timeout", type=float, default=1800)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--from-json", type=Path, help="only rewrite the Markdown and PNGs of a saved JSON (e.g. one "
                   "that a time limit cut short)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
        args.n, args.v, args.dtype = args.n or [16, 32], args.v or [512], args.dtype or "fp32"
        args.isolation, args.compile_backend = args.isolation or "single", args.compile_backend or "eager"
        args.min_reps, args.min_time, args.interp_max_n, args.threads = 1, 0.0, 16, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu or --dry-run)")
    gpu = args.device == "cuda"
    args.n = args.n or ([16384, 8192, 4096, 2048] if gpu else [2048, 1024, 256, 64])
    args.v = args.v or ([32000, 51200] if gpu else [32000])
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
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
        write_reports(report, args.from_json.with_suffix(""))
        return report
    start = time.time()
    deadline = start + args.time_budget if args.time_budget else float("inf")
    allow_recompiles()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    # Priority order (a time budget cuts the last rows): first vocab, 0% ignored, largest N first; the configs of
    # one input set stay together so its tensors are built once.
    configs = [Config(n, v, args.dtype, ign, mode) for v in args.v for ign in sorted(args.ignore)
               for n in sorted(args.n, reverse=True) for mode in MODES if mode in args.modes]
    print(f"bench_loss: device={args.device} dtype={args.dtype} N={args.n} V={args.v} ignore={args.ignore} "
          f"modes={args.modes} methods={len(args.methods)}", flush=True)
    ctx = {"device": args.device, "alpha": args.alpha, "seed": args.seed, "threads": args.threads,
           "compile_backend": args.compile_backend, "interp_max_n": args.interp_max_n,
           "min_reps": args.min_reps, "min_time": args.min_time, "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms}
    copy = measure_copy(args.device, args)
    ctx["copy_gbps"] = copy["bandwidth_gbps"]
    print(f"copy bandwidth: {copy['bandwidth_gbps']:.1f} GB/s", flush=True)
    report = {"schema": SCHEMA, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmarks/bench_loss.py", *(argv if argv is not None else
                                                                            sys.argv[1:])]),
              "device": device_info(args.device, args.threads),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "triton": _version("triton"), "rklu_fast": _version("rklu_fast"),
                           "liger_kernel": _version("liger-kernel"), "torchtune": _version("torchtune")},
              "rklu_backends": {b: {"usable": ok, "reason": why} for b, (ok, why) in M.rklu_usable().items()},
              "settings": {"dtype": args.dtype, "n": args.n, "v": args.v, "ignore": args.ignore,
                           "modes": args.modes, "alpha": args.alpha, "seed": args.seed, "dry_run": args.dry_run,
                           "compile_backend": args.compile_backend, "isolation": args.isolation,
                           "timing": ("triton.testing.do_bench median (CUDA events, L2 flushed)" if args.device ==
                                      "cuda" else f"time.perf_counter median, >= {args.min_reps} calls and "
                                                  f">= {args.min_time} s after a warm-up call"),
                           "memory": ("torch.cuda.max_memory_allocated - memory_allocated before the call"
                                      if args.device == "cuda" else "VmHWM (ru_maxrss) of a fresh worker after "
                                      "clear_refs reset, minus VmRSS before the call"),
                           "byte_floor": "fwd: 3*N_valid*V*elem; fwdbwd: (3*N_valid + N)*V*elem",
                           "grad_error_rows": REF_GRAD_ROWS},
              "copy": copy, "rows": [], "verdicts": [], "wall_s": 0.0}
    slug = re.sub(r"[^a-z0-9]+", "-", report["device"]["name"].lower()).strip("-")[:40]
    if args.device == "cpu":
        slug = f"cpu-{args.threads}t"
    stem = args.out / f"bench_loss_{slug}_{report['date'][:10]}{'_dryrun' if args.dry_run else ''}"
    args.out.mkdir(parents=True, exist_ok=True)

    def save():
        report["wall_s"] = time.time() - start
        report["verdicts"] = verdicts(report["rows"])
        Path(f"{stem}.json").write_text(json.dumps(report, indent=1))
        Path(f"{stem}.md").write_text(markdown(report) + "\n")

    refs = {}
    for key in dict.fromkeys(c.inputs_key for c in configs):
        refs[key] = reference_loss(make_inputs(*key, device=args.device, seed=args.seed), args.alpha)
    def emit(row):  # the JSON is rewritten after every row: a run cut short still leaves its figures
        report["rows"].append(row)
        print(f"  {row['method']:<16} N={row['n']:<6} V={row['v']:<6} ign={row['ignore_frac']:<4} "
              f"{row['mode']:<7} {row['status']:<11} {fmt(row['time_ms'], '.3f')} ms "
              f"{fmt(row['pct_copy_bw'], '.0f')}% {(row['reason'] or '')[:80]}", flush=True)
        save()

    if args.device == "cuda" or args.isolation == "none":
        ctx["probe"] = CudaProbe() if args.device == "cuda" else RssProbe()
        run_configs(args.methods, configs, refs, ctx, deadline, emit)
    else:
        run_cpu_workers(args.methods, configs, refs, ctx, deadline, args.isolation, args.worker_timeout, emit)
    order = {c: i for i, c in enumerate(configs)}
    report["rows"].sort(key=lambda r: (order.get(Config(r["n"], r["v"], r["dtype"], r["ignore_frac"], r["mode"]),
                                                 len(order)), list(M.BY_NAME).index(r["method"])))
    report["device"]["load_avg_end"] = os.getloadavg()
    save()
    return write_reports(report, stem)


def write_reports(report: dict, stem: Path) -> dict:
    """The Markdown table and the PNGs beside the JSON, and the verdicts on the terminal."""
    report["plots"] = [os.path.basename(p) for p in plot(report, stem)]
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1))
    Path(f"{stem}.md").write_text(markdown(report) + "\n")
    print_verdicts(report)
    print(f"wrote {stem}.json, {stem}.md and {len(report['plots'])} PNG(s); run took {report['wall_s']:.0f} s")
    return report


def print_verdicts(report: dict) -> None:
    if not report["verdicts"]:
        print("verdicts: none (the target shapes were not in this run's grid)")
        return
    print(f"\n{'target':<58} {'measured':>9} {'threshold':>11}  verdict")
    for t in report["verdicts"]:
        verdict = {True: "PASS", False: "MISS", None: "n/a"}[t["pass"]]
        bound = ('>= ' if t['at_least'] else '<= ') + fmt(t['threshold'])
        print(f"{t['target']:<58} {fmt(t['measured']):>9} {bound:>11}  {verdict} {t['detail']}")


if __name__ == "__main__":
    main()
