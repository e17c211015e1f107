"""A NaN in training stops the stage loudly (exit 4, the step, method and loss term named, nothing applied, the last
checkpoint intact), and JSON outputs never hold a bare NaN."""
import json

import torch
from safetensors.torch import load_file, save_file

from rklu_fast.cli import main
from rklu_fast.jsonio import write_json
from tiny_pipeline import needs_tofu, overrides

TINY = "configs/tiny-tofu.yaml"


@needs_tofu
def test_nan_loss_stops_the_stage_with_the_step_method_and_term(tmp_path, capsys):
    ov = overrides(tmp_path / "run", **{"unlearn.epochs": 2})
    assert main(["finetune", "--config", TINY, *ov]) == 0 and main(["augment", "--config", TINY, *ov]) == 0
    weights = tmp_path / "run" / "original" / "model" / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
    save_file(tensors, weights, metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["unlearn", "--config", TINY, *ov]) == 4
    err = capsys.readouterr().err
    assert "step 1: the forget term of 'rklu' is nan" in err and "stopped before applying it" in err
    assert not (tmp_path / "run" / "unlearned" / "model").exists()
    assert not (tmp_path / "run" / "unlearned" / "checkpoints").exists()  # no step was applied or saved
    assert not (tmp_path / "run" / "summary.json").exists()


def test_json_outputs_write_nonfinite_values_as_null(tmp_path):
    path = write_json(tmp_path / "x.json", {"after": {"forget": float("nan"), "retain": 0.5}, "ok": 1.0})
    text = path.read_text()
    assert "NaN" not in text
    assert json.loads(text) == {"after": {"forget": None, "retain": 0.5, "nonfinite": True}, "ok": 1.0}
