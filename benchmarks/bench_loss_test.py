"""The loss benchmark's own tests, at tiny shapes so that CI runs them (pytest passes --benchmark-disable: each
`benchmark(fn)` then calls fn once). Run timed:  python -m pytest benchmarks/bench_loss_test.py --benchmark-enable

Every method is checked against an independent float64 NumPy computation of the loss and its closed-form
gradient on fresh random inputs; the suite's dry run must write the full JSON schema.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import log_softmax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_loss as B  # noqa: E402
import methods as M  # noqa: E402

ALPHA = 8.0
REPO = Path(__file__).resolve().parents[1]


def numpy_reverse_kl(student, original, augmented, labels, alpha):
    """Mean reverse KL over valid rows and its gradient p(log p - log q - KL)/n_valid, in float64 NumPy."""
    s, o, a = (x.detach().double().numpy() for x in (student, original, augmented))
    log_p = log_softmax(s, axis=-1)
    log_q = log_softmax(o - alpha * np.maximum(a - o, 0.0), axis=-1)
    p = np.exp(log_p)
    kl = (p * (log_p - log_q)).sum(-1)
    valid = labels.numpy() != M.IGNORE_INDEX
    n_valid = max(valid.sum(), 1)
    grad = p * (log_p - log_q - kl[:, None]) * valid[:, None] / n_valid
    return kl[valid].sum() / n_valid, grad


def random_inputs(n=16, v=300, ignored=5):
    """Fresh inputs every call (no seed): V not a multiple of any block size, some rows ignored."""
    original = 2.0 * torch.randn(n, v)
    augmented = original + 0.5 * torch.randn(n, v)
    student = (original + 0.3 * torch.randn(n, v)).requires_grad_(True)
    labels = torch.randint(0, v, (n,))
    labels[torch.randperm(n)[:ignored]] = M.IGNORE_INDEX
    return student, original, augmented, labels


@pytest.mark.parametrize("name", [m.name for m in M.METHODS if m.kind == "loss"])
def test_loss_method_matches_float64(benchmark, name):
    try:
        fn, _ = M.build(name, "cpu")
    except M.Unavailable as e:
        pytest.skip(str(e))
    student, original, augmented, labels = random_inputs()

    def step():
        student.grad = None
        loss = fn(student, original, augmented, labels, ALPHA)
        loss.backward()
        return loss

    loss = benchmark(step)
    ref_loss, ref_grad = numpy_reverse_kl(student, original, augmented, labels, ALPHA)
    assert abs(loss.item() - ref_loss) <= 1e-5 * abs(ref_loss)
    grad = student.grad.double().numpy()
    assert np.linalg.norm(grad - ref_grad) <= 1e-4 * np.linalg.norm(ref_grad)
    ignored = labels.numpy() == M.IGNORE_INDEX
    assert np.all(grad[ignored] == 0)


def test_byte_floor_hand_computed():
    # bf16, N=8, V=10, 6 valid rows: forward reads 3*6*10*2 = 360 B; the backward adds the gradient, 8*10*2 = 160 B
    assert B.byte_floor(B.Config(8, 10, "bf16", 0.25, "fwd"), 6) == 360
    assert B.byte_floor(B.Config(8, 10, "bf16", 0.25, "fwdbwd"), 6) == 520
    assert B.byte_floor(B.Config(8, 10, "fp32", 0.0, "fwdbwd"), 8) == 4 * 8 * 10 * 4


def test_reference_loss_matches_numpy():
    inputs = random_inputs(n=40, v=130, ignored=9)
    ref_loss, ref_grad = numpy_reverse_kl(*inputs, ALPHA)
    assert B.reference_loss(inputs, ALPHA, chunk_rows=7) == pytest.approx(ref_loss, rel=1e-12)
    assert np.allclose(B.reference_grad_rows(inputs, ALPHA, 11).numpy(), ref_grad[:11], rtol=1e-10, atol=1e-15)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")
def test_rss_probe_sees_a_transient_allocation():
    nbytes = 64 << 20
    _, extra = B.RssProbe().run(lambda: torch.ones(nbytes // 4).sum())  # touched, then freed before returning
    assert 0.9 * nbytes <= extra <= 1.3 * nbytes
    _, extra = B.RssProbe().run(lambda: None)  # the high-water mark was reset: nothing left of the 64 MiB
    assert extra < 0.1 * nbytes
    small = 8 << 20  # below glibc's (raised) mmap threshold: served from the heap, re-used call after call
    for _ in range(3):
        _, extra = B.RssProbe().run(lambda: torch.ones(small // 4).sum())
        assert 0.9 * small <= extra <= 1.5 * small


def _row(method, time_ms, mem=None, status="ok"):
    return {"method": method, "n": 2048, "v": 32000, "dtype": "fp32", "mode": "fwdbwd", "ignore_frac": 0.0,
            "status": status, "time_ms": time_ms, "peak_extra_vs_grad": mem, "reason": None}


def test_issue4_verdicts_from_rows():
    rows = [_row("eager", 600.0), _row("compile", 90.0), _row("compile_chunked", 80.0), _row("rklu_cpu", 100.0, 1.2)]
    got = {t["target"]: t for t in B.verdicts(rows)}
    assert got["issue 4: cpu vs eager speed-up"]["measured"] == pytest.approx(6.0)
    assert got["issue 4: cpu vs eager speed-up"]["pass"] is True
    assert got["issue 4: cpu vs torch.compile speed-up"]["measured"] == pytest.approx(0.9)
    assert got["issue 4: cpu vs torch.compile speed-up"]["pass"] is False
    assert got["issue 4: cpu peak extra / gradient"]["pass"] is True
    rows[-1] = _row("rklu_cpu", None, status="unavailable")
    (missing,) = B.verdicts(rows)
    assert missing["pass"] is None


def check_report(report: dict, methods: list[str]) -> None:
    """The JSON schema: top-level keys, a row with every key for every method at every config, reasons for
    every row that is not ok, float64-accurate losses where measured."""
    assert report["schema"] == B.SCHEMA and report["copy"]["bandwidth_gbps"] > 0
    assert {"date", "device", "versions", "settings", "rklu_backends", "rows", "verdicts", "wall_s"} <= report.keys()
    configs = {(r["n"], r["v"], r["ignore_frac"], r["mode"]) for r in report["rows"]}
    assert len(configs) == 2 * 1 * 2 * 2  # N {16, 32} x V {512} x ignore {0, .5} x {fwd, fwdbwd}
    for r in report["rows"]:
        assert set(B.ROW_KEYS) <= r.keys()
        assert r["status"] in ("ok", "unavailable", "error", "oom", "skipped")
        assert r["status"] == "ok" or r["reason"]  # never a silent omission
        if r["status"] == "ok" and r["loss_rel_err"] is not None:
            assert r["loss_rel_err"] < 1e-5 and r["time_ms"] > 0 and r["peak_extra_bytes"] is not None
    loss_methods = {m for m in methods if M.BY_NAME[m].kind == "loss"}
    for cfg in configs:
        assert {r["method"] for r in report["rows"] if (r["n"], r["v"], r["ignore_frac"], r["mode"]) == cfg} \
            >= loss_methods
    assert any(r["method"] == "eager" and r["status"] == "ok" and r["grad_rel_err"] < 1e-5 for r in report["rows"])


def test_dry_run_in_process_writes_the_schema(tmp_path):
    threads = torch.get_num_threads()
    try:
        report = B.main(["--dry-run", "--isolation", "none", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    check_report(json.loads(next(tmp_path.glob("bench_loss_*.json")).read_text()), list(M.BY_NAME))
    assert report["settings"]["dry_run"] and list(tmp_path.glob("bench_loss_*.md"))
    assert list(tmp_path.glob("bench_loss_*_V512.png"))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_suite_dry_run_writes_the_schema(tmp_path):
    """The suite script itself, with a worker subprocess; three methods keep it quick (imports dominate)."""
    methods = ["sol_addcmul", "eager", "rklu_torch"]
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run"], cwd=REPO,
                          env=dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable,
                                   BENCH_ARGS="--methods " + " ".join(methods)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert suite["dry_run"] is True
    assert {s["name"]: s["status"] for s in suite["steps"]} == {
        "build": "skipped (dry-run)", "test": "skipped (dry-run)", "errpath": "skipped (dry-run)",
        "sanitize": "skipped (dry-run)", "tune": "skipped (dry-run)", "whole": "not requested", "bench": "ok",
        "train": "skipped (dry-run)"}
    (bench_json,) = tmp_path.glob("bench_loss_*.json")
    report = json.loads(bench_json.read_text())
    check_report(report, methods)
    assert {r["method"] for r in report["rows"]} == set(methods)
    assert bench_json.with_suffix(".md").exists() and (tmp_path / "suite.log").stat().st_size > 0
