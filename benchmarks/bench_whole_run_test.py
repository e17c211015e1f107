"""The whole-run benchmark's dry run (tiny model, CPU): it runs the pipeline's own stages end to end and reports
stage times, real tokens counted from the loop's data order, and model FLOPs that follow from them."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rklu_fast.data import default_data_dir


@pytest.mark.skipif(default_data_dir("tofu") is None, reason="TOFU files not found (../shared/data/tofu)")
def test_dry_run_reports_every_stage(tmp_path):
    script = Path(__file__).resolve().parent / "whole_run.py"
    subprocess.run([sys.executable, str(script), "--dry-run", "--out", str(tmp_path), "--run-dir",
                    str(tmp_path / "run")], check=True, capture_output=True, text=True, timeout=600)
    report = json.loads(next(tmp_path.glob("whole_run_dry-run_*.json")).read_text())
    assert [r["stage"] for r in report["stages"]] == ["augment", "unlearn"]
    assert (tmp_path / "run" / "unlearned" / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "unlearned" / "checkpoints").exists()  # no epoch checkpoints
    for r in report["stages"]:  # FLOPs follow from the parameter count and the counted tokens
        assert r["model_tflops"] == 6 * report["parameters"] * r["real_tokens"] / r["seconds"] / 1e12
    # augment: 40 forget examples, 1 epoch; unlearn: the same plus 40 paired retain examples
    assert report["stages"][1]["real_tokens"] > report["stages"][0]["real_tokens"]
    assert report["wall_seconds_from_process_start"] > sum(r["seconds"] for r in report["stages"])
