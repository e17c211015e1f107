"""The shared-prefix benchmark runs end to end at a tiny size and writes its report (speed is not asserted: timing
belongs to the benchmark, not to CI)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_eval_nll as B  # noqa: E402
from tiny_pipeline import needs_tofu  # noqa: E402


@needs_tofu
def test_tiny_run_writes_its_report(tmp_path):
    report = B.main(["--hidden", "64", "--layers", "1", "--vocab", "300", "--ds-size", "2", "--repeats", "1",
                     "--threads", "1", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("bench_eval_nll_cpu-1t_h64l1_*.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))
    assert path.with_suffix(".md").exists()
    whole, shared = report["rows"]
    assert shared["padded_tokens"] < whole["padded_tokens"]  # the questions run once per batch, not per answer
    assert report["max_rel_diff_mean_loss"] < 1e-5 and report["examples"] > 0
