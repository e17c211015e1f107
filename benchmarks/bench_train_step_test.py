"""The training-step benchmark's tiny CPU mode runs end to end and writes its full report (numbers are not
asserted beyond being measured: timing belongs to the benchmark, not to CI)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_step as B  # noqa: E402


def test_tiny_mode_writes_every_row(tmp_path):
    report = B.main(["--tiny", "--steps", "1", "--warmup", "0", "--epochs", "3", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("train_step_tiny_*.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))
    assert path.with_suffix(".md").exists()
    rows = {(r["teacher"], r["kernel"]): r for r in report["rows"]}
    assert set(rows) == {(m, k) for m in ("online", "cached") for k in ("eager", "fused")}
    for (mode, kernel), r in rows.items():
        assert r["status"] == "ok", r["reason"]
        assert r["tokens_per_s"] > 0 and r["loss_alone_ms"] > 0 and 0 < r["loss_share"]
        assert r["backend"] == "torch" if kernel == "eager" else r["backend"] in ("cpu", "torch")
        if mode == "cached":  # the cache build is charged to the amortised figure
            assert r["cache_build_s"] > 0 and 0 < r["tokens_per_s_amortised"] < r["tokens_per_s"]
        else:
            assert r["cache_build_s"] is None
    assert report["speedups"][0]["arch"] == "tiny-llama"
