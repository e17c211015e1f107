"""Checkpoint integrity on the tiny pipeline: a damaged latest checkpoint (truncated, flipped bytes, missing file,
missing manifest) is reported by file name and the run resumes from the previous intact one, to the same weights
as an uninterrupted run; nothing intact left, or no training state, is refused; a failed write of any checkpoint
file (injected with RKLU_FAULT_AT: a full disk, or a kill mid-write) leaves the earlier checkpoints intact.

Runs: 16 finetune examples (forget + retain slices, no oracle) and 8 forget examples, batch 4, 3 epochs each:
finetune has 12 steps (epoch checkpoints after steps 4 and 8), augment and unlearn 6 (after steps 2 and 4)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import load_file

from rklu_fast.cli import main
from rklu_fast.train import checkpoint
from tiny_pipeline import needs_tofu, overrides

pytestmark = needs_tofu
TINY = "configs/tiny-tofu.yaml"
ROLE_OF = {"finetune": "original", "augment": "augmented", "unlearn": "unlearned"}
REPO = Path(__file__).resolve().parents[1]


def ov(run_dir, **extra):
    return overrides(run_dir, "llama", **{"finetune.epochs": 3, "augment.epochs": 3, "unlearn.epochs": 3,
                                          "finetune.make_oracle": "false", **extra})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce bit for bit."""
    d = tmp_path_factory.mktemp("reference") / "run"
    assert main(["run", "--config", TINY, *ov(d)]) == 0
    return d


def assert_same_stage(run_dir, reference, role):
    a = load_file(reference / role / "model" / "model.safetensors")
    b = load_file(run_dir / role / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (role, k)
    losses = [[(r["step"], r["loss"]) for r in map(json.loads, (d / role / "log.jsonl").read_text().splitlines())]
              for d in (reference, run_dir)]
    assert losses[0] == losses[1]  # every step once, with the same loss


def killed_finetune(run_dir, after, **extra):
    assert main(["finetune", "--config", TINY, "--stop-after-steps", str(after), *ov(run_dir, **extra)]) == 3
    return run_dir / "original" / "checkpoints"


def truncate(path):
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return f"{path.name} has {size // 2} bytes, manifest.json says {size}"


def flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return f"{path.name} does not match its checksum"


def delete(path):
    path.unlink()
    return f"{path.name} is missing"


# ---------------------------------------------------------------------------------------------- manifest unit tests
def test_manifest_records_sizes_and_checksums_an_independent_hash_agrees_with(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_CHUNK", 7)  # many chunk boundaries, odd tail
    files = {"a.bin": os.urandom(1000), "sub/b.json": b"{}", "empty": b""}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    checkpoint.write_manifest(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())["files"]
    assert manifest == {name: {"size": len(data), "xxh3_64": xxhash.xxh3_64_hexdigest(data)}
                        for name, data in files.items()}
    assert checkpoint.verify(tmp_path, required=()) is None
    assert "training_state.pt is missing" in checkpoint.verify(tmp_path)
    (tmp_path / "a.bin").write_bytes(files["a.bin"][:-1] + bytes([files["a.bin"][-1] ^ 1]))  # one bit, same size
    assert checkpoint.verify(tmp_path, required=(), checksums=False) is None  # sizes alone cannot see it
    assert checkpoint.verify(tmp_path, required=()).startswith("a.bin does not match its checksum")


def test_lora_adapter_save_is_atomic_with_a_manifest(tmp_path, monkeypatch):
    """``lora.save_adapter``: the adapter's files at the top of the folder with a verifying manifest; a write that
    fails midway leaves the adapter saved before untouched."""
    pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    from rklu_fast.train import lora

    torch.manual_seed(0)
    model = lora.add_adapter(LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2)), "student", lora.lora_config(r=2, init_lora_weights=False))
    lora.save_adapter(tmp_path / "adapter", model)
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= \
        {p.name for p in (tmp_path / "adapter").iterdir()}
    assert checkpoint.verify(tmp_path / "adapter", required=("adapter_model.safetensors",)) is None
    before = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}

    def torn(directory, **kwargs):  # writes half of the weights, then the disk is full
        (Path(directory) / "student").mkdir(exist_ok=True)
        (Path(directory) / "student" / "adapter_model.safetensors").write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(model, "save_pretrained", torn)
    with pytest.raises(OSError, match="No space left"):
        lora.save_adapter(tmp_path / "adapter", model)
    assert {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp dir left


# ---------------------------------------------------------------------------------------------- damaged checkpoints
@pytest.mark.parametrize("name,damage", [("model.safetensors", truncate), ("model.safetensors", flip),
                                         ("training_state.pt", flip), ("training_state.pt", delete),
                                         ("tokenizer.json", truncate), ("manifest.json", delete)],
                         ids=lambda x: getattr(x, "__name__", x))
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, reference, name, damage):
    ckpts = killed_finetune(tmp_path / "run", 10)
    assert [p.name for p in checkpoint.epoch_checkpoints(ckpts)] == ["epoch-1", "epoch-2"]
    problem = damage(ckpts / "epoch-2" / name)
    capsys.readouterr()
    assert main(["finetune", "--config", TINY, "--resume", *ov(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if "epoch-2" in x]
    assert len(line) == 1 and problem in line[0] and line[0].endswith("resuming from epoch-1"), err
    assert_same_stage(tmp_path / "run", reference, "original")


def test_no_intact_checkpoint_left_is_refused_with_the_remedy(tmp_path, capsys):
    ckpts = killed_finetune(tmp_path / "run", 10)
    truncate(ckpts / "epoch-2" / "model.safetensors")
    flip(ckpts / "epoch-1" / "training_state.pt")
    capsys.readouterr()
    assert main(["finetune", "--config", TINY, "--resume", *ov(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint to resume from" in err and "epoch-2: model.safetensors has" in err
    assert "epoch-1: training_state.pt does not match its checksum" in err and f"Delete {ckpts}" in err
    assert not (tmp_path / "run" / "original" / "model").exists()


def test_missing_training_state_is_refused_not_a_silent_restart(tmp_path, capsys):
    ckpts = killed_finetune(tmp_path / "run", 6, **{"checkpoint.keep_last": 1})
    (ckpts / "epoch-1" / "training_state.pt").unlink()
    capsys.readouterr()
    # without --resume: the stage was interrupted (a checkpoint without its state is still a checkpoint)
    assert main(["finetune", "--config", TINY, *ov(tmp_path / "run", **{"checkpoint.keep_last": 1})]) == 2
    assert "interrupted at epoch-1; continue it with --resume" in capsys.readouterr().err
    assert main(["finetune", "--config", TINY, "--resume", *ov(tmp_path / "run", **{"checkpoint.keep_last": 1})]) == 2
    err = capsys.readouterr().err
    assert "epoch-1: training_state.pt is missing (the optimizer, scheduler and step cannot be restored)" in err
    assert len((tmp_path / "run" / "original" / "log.jsonl").read_text().splitlines()) == 6  # nothing retrained
    assert not (tmp_path / "run" / "original" / "model").exists()


def test_keep_last_keeps_that_many_intact_checkpoints(tmp_path):
    ckpts = killed_finetune(tmp_path / "run", 13, **{"finetune.epochs": 4})  # 16 steps: checkpoints at 4, 8, 12
    assert [p.name for p in checkpoint.epoch_checkpoints(ckpts)] == ["epoch-2", "epoch-3"]  # the default, 2
    assert all(checkpoint.verify(p) is None for p in checkpoint.epoch_checkpoints(ckpts))


# ---------------------------------------------------------------------------------------------- failed writes
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "training_state.pt",
                                  "manifest.json"])
def test_failed_write_of_any_checkpoint_file_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch,
                                                                           reference, name):
    """A full disk while writing epoch-2 (after step 8), with keep_last 1: epoch-1 must survive, the run stops
    with a clear error, and the resumed run ends where the uninterrupted one did."""
    args = ["finetune", "--config", TINY, *ov(tmp_path / "run", **{"checkpoint.keep_last": 1})]
    monkeypatch.setenv("RKLU_FAULT_AT", f"original:8:{name}")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "checkpoint" in err and "epoch-2: writing failed (OSError: [Errno 28] No space left on device" in err
    assert "the earlier checkpoints (epoch-1) are untouched" in err and "--resume" in err
    ckpts = tmp_path / "run" / "original" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch-1"]  # no half-written epoch-2, no temp dir
    assert checkpoint.verify(ckpts / "epoch-1") is None
    monkeypatch.delenv("RKLU_FAULT_AT")
    assert main([*args[:3], "--resume", *args[3:]]) == 0
    assert_same_stage(tmp_path / "run", reference, "original")


def test_failed_final_model_write_leaves_nothing_half_written(tmp_path):
    class Model:  # writes half its weights, then the disk is full
        def save_pretrained(self, directory):
            (Path(directory) / "model.safetensors").write_bytes(b"\0" * 100)
            raise OSError(28, "No space left on device")
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"model .*/model: writing failed \(OSError: \[Errno "
                                                              r"28\] No space left on device\); nothing of it"):
        checkpoint.save_model(tmp_path / "model", Model())
    assert list(tmp_path.iterdir()) == []


def test_kill_mid_write_leaves_the_previous_checkpoint(tmp_path, reference):
    """A real kill (the process exits at once, no cleanup) with model.safetensors half written."""
    args = ["finetune", "--config", TINY, *ov(tmp_path / "run")]
    env = {**os.environ, "RKLU_FAULT_AT": "original:8:model.safetensors:kill",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "rklu_fast.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 137, proc.stderr[-2000:]
    ckpts = tmp_path / "run" / "original" / "checkpoints"
    left = sorted(p.name for p in ckpts.iterdir())
    assert left[0].startswith(".epoch-2.tmp-") and left[1:] == ["epoch-1"], left
    assert checkpoint.verify(ckpts / "epoch-1") is None
    assert main([*args[:3], "--resume", *args[3:]]) == 0
    assert_same_stage(tmp_path / "run", reference, "original")
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]  # the torn temp dir is cleaned up


def test_fault_spec_is_checked():
    from rklu_fast.train import faults

    os.environ["RKLU_FAULT_AT"] = "original:eight:model.safetensors"
    try:
        with pytest.raises(ValueError, match="RKLU_FAULT_AT: expected <role>:<step>:<file>"):
            faults.at_checkpoint_write(".", "original", 8)
    finally:
        del os.environ["RKLU_FAULT_AT"]


# ---------------------------------------------------------------------------------------------- kills in every stage
@pytest.mark.parametrize("stage,after", [("finetune", 3), ("finetune", 4), ("finetune", 10),
                                         ("augment", 1), ("augment", 2), ("augment", 5),
                                         ("unlearn", 1), ("unlearn", 2), ("unlearn", 5)])
def test_run_killed_in_any_stage_resumes_bit_identically(tmp_path, reference, stage, after):
    """Killed (``--stop-after-steps``) at three points of each stage: before its first checkpoint, exactly at one,
    and after two (resumed from the latest); the resumed stage ends with the reference's weights and losses.
    The earlier stages come from the reference run (a copy of its run_dir), so each case trains one stage."""
    role, d = ROLE_OF[stage], tmp_path / "run"
    shutil.copytree(reference, d)
    for later in list(ROLE_OF.values())[list(ROLE_OF).index(stage):]:
        shutil.rmtree(d / later)
    (d / "config.yaml").unlink()  # it names the reference's run_dir
    assert main([stage, "--config", TINY, "--stop-after-steps", str(after), *ov(d)]) == 3
    steps_per_epoch = 4 if stage == "finetune" else 2
    assert [p.name for p in checkpoint.epoch_checkpoints(d / role / "checkpoints")] == \
        [f"epoch-{k}" for k in range(1, after // steps_per_epoch + 1)][-2:]
    assert main([stage, "--config", TINY, "--resume", *ov(d)]) == 0
    assert_same_stage(d, reference, role)
