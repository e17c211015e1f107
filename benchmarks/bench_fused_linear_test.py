"""The fused linear benchmark's own tests at tiny shapes (CI): its float64 reference against an independent NumPy
computation, the hand-counted FLOPs and memory bound, the verdicts and round merging, and a dry run's schema."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import log_softmax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fused_linear as BF  # noqa: E402


def test_reference_matches_numpy():
    shape = BF.Shape(n=20, d=6, v=37, dtype="fp32", ignore_frac=0.25)
    inputs = BF.make_inputs(shape, "cpu", seed=3)
    loss, dh, dw = BF.reference(inputs, 8.0, rows_per_block=7)
    h, w, o, a, labels = (x.double().numpy() for x in inputs)
    valid = labels != BF.IGNORE_INDEX
    log_p = log_softmax(h @ w.T, axis=-1)
    log_q = log_softmax(o - 8.0 * np.maximum(a - o, 0.0), axis=-1)
    p = np.exp(log_p)
    kl = (p * (log_p - log_q)).sum(-1)
    g = p * (log_p - log_q - kl[:, None]) * valid[:, None] / valid.sum()
    assert valid.sum() == 15 and loss == pytest.approx(kl[valid].sum() / 15, rel=1e-12)
    np.testing.assert_allclose(dh.numpy(), g @ w, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(dw.numpy(), g.T @ h, rtol=1e-9, atol=1e-14)


def test_flops_and_memory_bound_hand_counted():
    # 2·V·d per row per GEMM: materialising runs 3 GEMMs on all 10 rows, the fused op on the 6 valid ones
    assert BF.flops("materialise", 10, 6, 4, 100) == 3 * 10 * 2 * 100 * 4 == 24000
    assert BF.flops("rklu_fused", 10, 6, 4, 100) == 3 * 6 * 800 == 14400
    assert BF.flops("liger_fljsd", 10, 6, 4, 100) == 4 * 10 * 800  # + the teacher's logits
    # bf16, N = 10, d = 4, V = 100, 6 valid rows (C = 6): fp32 dW 1600 B + bf16 dW 800 B + dh 80 B + 3·6·100·4 B
    assert BF.memory_bound(BF.Shape(10, 4, 100, "bf16", 0.4), 6) == 1600 + 800 + 80 + 7200
    assert BF.memory_bound(BF.Shape(10, 4, 100, "fp32", 0.4), 6) == 1600 + 160 + 7200  # fp32: dW returned as is


def _row(method, time_ms, peak=None, bound=None, key=(2048, 512, 32000, "fp32", 0.0)):
    n, d, v, dtype, ign = key
    return dict(method=method, n=n, d=d, v=v, dtype=dtype, ignore_frac=ign, status="ok", time_ms=time_ms,
                peak_extra_bytes=peak, bound_bytes=bound)


def test_verdicts():
    rows = [_row("rklu_fused", 130.0, 90, 100), _row("materialise", 100.0)]
    got = {t["target"].split(",")[0]: t for t in BF.verdicts(rows)}
    assert got["peak extra / bound"]["measured"] == pytest.approx(0.9) and got["peak extra / bound"]["pass"]
    assert got["time / materialising"]["measured"] == pytest.approx(1.3)
    assert got["time / materialising"]["pass"] is False
    gpu = (16384, 4096, 32000, "bf16", 0.0)
    rows = [_row("rklu_fused", 12.0, 50, 100, gpu), _row("matmuls_chunked", 10.0, key=gpu),
            _row("liger_fljsd", 24.0, 200, key=gpu)]
    got = {t["target"].split(",")[0]: t for t in BF.verdicts(rows)}
    assert got["time / its matmuls (same chunks)"]["measured"] == pytest.approx(1.2)
    assert got["time / its matmuls (same chunks)"]["pass"] is True
    assert got["time / Liger FLJSD(beta=1)"]["measured"] == pytest.approx(0.5)
    assert got["peak extra / Liger FLJSD(beta=1)"]["measured"] == pytest.approx(0.25)
    assert "time / materialising" not in got  # only judged at the CPU target shape


def test_time_verdict_pairs_the_rounds():
    fused, mat = _row("rklu_fused", 20.0, 90, 100), _row("materialise", 30.0)
    fused["time_ms_rounds"], mat["time_ms_rounds"] = [10.0, 20.0, 40.0], [5.0, 30.0, 41.0]  # ratios 2, 0.67, 0.98
    (_, time_target) = BF.verdicts([fused, mat])
    assert time_target["measured"] == pytest.approx(40.0 / 41.0) and time_target["pass"] is True
    # interleaved calls (seconds apart) take precedence over rounds (minutes apart)
    fused["time_ms_interleaved_all"], mat["time_ms_interleaved_all"] = [13.0, 14.0], [10.0, 10.0]
    (_, time_target) = BF.verdicts([fused, mat])
    assert time_target["measured"] == pytest.approx(1.35) and time_target["pass"] is False
    assert time_target["detail"] == "median of interleaved per-call ratios"


def test_merge_rounds_takes_the_median_round():
    rows = []
    for t, peak in ((30.0, 5), (10.0, 7), (20.0, 6)):
        r = _row("rklu_fused", t, peak, 100)
        r.update(time_ms_q25=t - 1, time_ms_q75=t + 1, reps=5, flops=1e9, load_avg=1.0, note="")
        rows.append(r)
    (merged,) = BF.merge_rounds(rows)
    assert merged["time_ms"] == 20.0 and merged["time_ms_rounds"] == [30.0, 10.0, 20.0]
    assert merged["peak_extra_bytes"] == 7 and merged["reps"] == 15 and merged["time_ms_q25"] == 9.0


def test_dry_run_writes_the_schema(tmp_path):
    threads = torch.get_num_threads()
    try:
        report = BF.main(["--dry-run", "--out", str(tmp_path), "--methods", "materialise", "rklu_fused",
                          "rklu_fused_fkl", "matmuls_chunked"])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads(next(tmp_path.glob("bench_fused_linear_*.json")).read_text())
    assert saved["schema"] == BF.SCHEMA and saved["rows"] == report["rows"]
    assert {r["method"] for r in report["rows"]} == {"materialise", "rklu_fused", "rklu_fused_fkl",
                                                     "matmuls_chunked"}
    for r in report["rows"]:
        assert set(BF.ROW_KEYS) <= r.keys() and r["status"] == "ok", r
        if r["method"] != "matmuls_chunked":
            assert r["loss_rel_err"] < 1e-5 and r["grad_hidden_rel_err"] < 1e-5 and r["grad_weight_rel_err"] < 1e-5
    fused = next(r for r in report["rows"] if r["method"] == "rklu_fused")
    # (at these sizes the resident-memory probe's page granularity is as large as the bound: not compared here)
    assert fused["peak_extra_bytes"] >= 0 and fused["bound_bytes"] > 0 and fused["chunk_rows"] == 48
    assert list(tmp_path.glob("bench_fused_linear_*.md")) and list(tmp_path.glob("bench_fused_linear_*.png"))
