"""FSDP2 (``distributed.engine: fsdp2``, rklu_fast/train/distributed.py) on 2 CPU processes over gloo: the code
path ``configs/accelerate/fsdp.yaml`` runs on GPUs with NCCL.  ``rklu unlearn`` computes the same optimizer steps
as one process (cached teacher with RT; online teacher with KL and gradient checkpointing, both frozen models
sharded; a LoRA student), the student is sharded per decoder layer, gradients are reduce-scattered once per
optimizer step, and a run killed while writing a checkpoint resumes bit-identically."""
import json
import shutil

import pytest
import torch

from gloo_runs import (BATCH, LAYERS, MICRO, REFERENCE_RUNS, STEPS, assert_every_rank_stopped_on_the_failed_write,
                       free_port, gradient_step, launch, losses, models_dir, reference, run_settings, unlearn,
                       unlearn_args, unlearn_with_fault)
from rklu_fast.train import checkpoint
from tiny_pipeline import N_FORGET, needs_tofu

pytestmark = needs_tofu
FSDP = {"distributed.engine": "fsdp2"}


def _fsdp_runs(rank, world, root, runs):
    """The ``REFERENCE_RUNS`` under FSDP2, recording per run what was sharded (each FSDP unit's class, each
    parameter's local and global shape), how many reduce-scatters this rank ran and how many teacher caches it
    built."""
    from rklu_fast.train import distributed
    from rklu_fast.train.teacher_cache import TeacherCache

    shard, reduce_scatter = distributed.shard, torch.distributed.reduce_scatter_single
    sharded, calls, builds = [], [], []
    build = TeacherCache.build.__func__

    def counting_build(cls, *args, **kwargs):
        builds.append(1)
        return build(cls, *args, **kwargs)
    TeacherCache.build = classmethod(counting_build)

    def recording_shard(model, *args, **kwargs):
        out = shard(model, *args, **kwargs)
        sharded.append({"units": [type(m).__name__.removeprefix("FSDP") for m in model.modules()
                                  if distributed.is_sharded(m)],
                        "shapes": {n: [list(p.to_local().shape), list(p.shape)] for n, p in model.named_parameters()}})
        return out

    def counting(*args, **kwargs):
        calls.append(1)
        return reduce_scatter(*args, **kwargs)
    distributed.shard, torch.distributed.reduce_scatter_single = recording_shard, counting
    record = {}
    for name, extra in runs.items():
        sharded.clear(), calls.clear(), builds.clear()
        unlearn(rank, world, root / name, {**extra, **FSDP})
        record[name] = {"sharded": list(sharded), "reduce_scatters": len(calls), "cache_builds": len(builds)}
    (root / f"record-{rank}.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    assert launch(_fsdp_runs, 2, root, REFERENCE_RUNS) == [0, 0]
    return root, [json.loads((root / f"record-{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("run", list(REFERENCE_RUNS))
def test_fsdp2_matches_one_process(fsdp, run):
    """Per-step forget and retain losses within 1e-5 relative of one process; the exported model (the shards
    gathered for save_pretrained; LoRA: the adapter and the merged model) within float32 accumulation-order
    noise of one process's."""
    from safetensors.torch import load_file

    root, _ = fsdp
    ref = reference() / run
    one, two = losses(ref), losses(root / run)
    assert [s for s, *_ in one] == [s for s, *_ in two] == list(range(1, STEPS + 1))
    # (the KL term is 0 until the student moves: the first step's lr is 0, warm-up)
    assert all(f > 0 for _, f, _ in one) and sum(r > 0 for *_, r in one) >= STEPS - 2
    for (step, f1, r1), (_, f2, r2) in zip(one, two):
        assert abs(f2 - f1) <= 1e-5 * abs(f1) and abs(r2 - r1) <= 1e-5 * abs(r1), (run, step, f1, f2, r1, r2)
    name = "adapter_model.safetensors" if run == "lora" else "model.safetensors"
    w1, w2 = (load_file(d / "unlearned" / "model" / name) for d in (ref, root / run))
    assert sorted(w1) == sorted(w2)
    start = load_file(models_dir() / "original" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6, msg=k)
    assert any(not torch.equal(w1[k], start[k]) for k in w1 if k in start) or run == "lora"  # it trained
    if run == "lora":  # the adapter merged into the base (from the gathered adapter, on rank 0)
        m1, m2 = (load_file(d / "unlearned" / "merged" / "model.safetensors") for d in (ref, root / run))
        assert sorted(m1) == sorted(m2) == sorted(start)
        assert any(not torch.equal(m1[k], start[k]) for k in m1)
        for k in m1:
            torch.testing.assert_close(m2[k], m1[k], rtol=1e-4, atol=1e-6, msg=k)


def test_each_rank_holds_the_cached_teacher_built_once_per_directory(fsdp):
    """Without ``teacher.cache_dir`` (LoRA run) each rank builds the cache in its memory; with it (RT run) rank 0
    writes the directory and rank 1 memory-maps it; the online-teacher run builds none."""
    _, (r0, r1) = fsdp
    assert [r["rt"]["cache_builds"] for r in (r0, r1)] == [1, 0]
    assert [r["lora"]["cache_builds"] for r in (r0, r1)] == [1, 1]
    assert [r["kl"]["cache_builds"] for r in (r0, r1)] == [0, 0]


def test_student_and_online_frozen_models_are_sharded_per_decoder_layer(fsdp):
    """Each sharded model: the root and one FSDP unit per decoder layer; every parameter split over the two
    ranks along dim 0 (rank 0 the first ⌈n/2⌉ rows, rank 1 the rest).  The
    cached-teacher run shards only the student; the online-teacher run also both frozen teacher models (the
    original, which the KL term reads too, once)."""
    _, (r0, r1) = fsdp
    expected_models = {"rt": 1, "kl": 3, "lora": 1}
    for run, n in expected_models.items():
        models = list(zip(r0[run]["sharded"], r1[run]["sharded"]))
        assert len(models) == n, run
        for a, b in models:
            root = "PeftModelForCausalLM" if run == "lora" else "LlamaForCausalLM"
            assert a["units"] == b["units"] == [root] + ["LlamaDecoderLayer"] * LAYERS, run
            assert a["shapes"].keys() == b["shapes"].keys() and len(a["shapes"]) > 0
            for param, (local0, shape) in a["shapes"].items():
                local1, _ = b["shapes"][param]
                rows = -(-shape[0] // 2)
                assert local0 == [rows, *shape[1:]] and local1 == [shape[0] - rows, *shape[1:]], (run, param)


def test_gradients_are_reduce_scattered_once_per_optimizer_step(fsdp):
    """Per optimizer step each FSDP unit with trainable parameters reduce-scatters once (2 micro-steps per rank
    of 2 backwards each would make it 4 times): the 2 layers and the root, or with LoRA the 2 layers alone
    (the root's embeddings and LM head are frozen)."""
    _, records = fsdp
    for record in records:
        assert record["rt"]["reduce_scatters"] == STEPS * (LAYERS + 1)
        assert record["kl"]["reduce_scatters"] == STEPS * (LAYERS + 1)
        assert record["lora"]["reduce_scatters"] == STEPS * LAYERS


def test_fsdp2_step_gradient_equals_one_process(tmp_path):
    """One step (2 micro-steps per rank, forget and retain backward each): the loop's synchronisation
    reduce-scatters once per unit where one per backward would do it 4 times, and the gathered gradient equals
    one process's gradient of the whole step either way."""
    seed = int(torch.seed() % 2**31)
    assert launch(gradient_step, 1, "none", tmp_path / "one.pt", seed) == [0]
    assert launch(gradient_step, 2, "fsdp2", tmp_path / "two.pt", seed) == [0, 0]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    micro_steps = BATCH // 2 // MICRO
    assert len(two["loop"]["collectives"]) == LAYERS + 1
    assert len(two["every_backward"]["collectives"]) == 2 * micro_steps * (LAYERS + 1)
    for mode in ("loop", "every_backward"):
        for name, expected in one["loop"]["grads"].items():
            torch.testing.assert_close(two[mode]["grads"][name], expected, rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"{mode}, {name}, seed {seed}: {m}")


RT = {**REFERENCE_RUNS["rt"], **FSDP}


def _resume(rank, world, run_dir, run="rt"):
    unlearn(rank, world, run_dir, {**REFERENCE_RUNS[run], **FSDP}, ("--resume",))


def _killed(rank, world, run_dir, fault, run="rt"):
    import os

    os.environ["RKLU_FAULT_AT"] = fault
    unlearn(rank, world, run_dir, {**REFERENCE_RUNS[run], **FSDP})


@pytest.mark.parametrize("run", ["rt", "lora"])
def test_killed_fsdp_run_resumes_bit_identically(fsdp, tmp_path, run):
    """Rank 0 is killed (exit 137, as by SIGKILL) while the epoch-2 checkpoint is being written, with rank 1's
    shard of it cut in half; the launcher then kills rank 1.  The half-written checkpoint never becomes
    ``epoch-2``; ``--resume`` on 2 processes continues from epoch-1 and ends bit-identical to the uninterrupted
    2-process run: the same losses at every step, the same exported weights (with LoRA the checkpoint holds the
    adapter alone, and the frozen base is the one loaded)."""
    from safetensors.torch import load_file

    root, _ = fsdp
    run_dir = tmp_path / "killed"
    step = 2 * N_FORGET // BATCH  # the step that completes epoch 2
    codes = launch(_killed, 2, run_dir, f"unlearned:{step}:{checkpoint.SHARDED_DIR}/__1_0.distcp:kill", run)
    assert codes[0] == 137 and codes[1] != 0
    ckpts = run_dir / "unlearned" / "checkpoints"
    assert [p.name for p in checkpoint.epoch_checkpoints(ckpts)] == ["epoch-1"]
    assert [p.name for p in ckpts.iterdir() if p.name.startswith(".epoch-2.tmp-")]  # what the kill left
    assert checkpoint.is_sharded(ckpts / "epoch-1") and checkpoint.verify(ckpts / "epoch-1") is None
    assert launch(_resume, 2, run_dir, run) == [0, 0]
    assert losses(run_dir) == losses(root / run)
    name = "adapter_model.safetensors" if run == "lora" else "model.safetensors"
    w1, w2 = (load_file(d / "unlearned" / "model" / name) for d in (root / run, run_dir))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not [p for p in ckpts.iterdir() if ".tmp-" in p.name]  # the leftover was cleared


def test_resume_point_skips_a_damaged_sharded_checkpoint(fsdp, tmp_path):
    """``resume_point`` verifies a sharded checkpoint against its manifest like a single-process one: a cut shard
    or a missing ``.metadata`` is reported by name and the previous checkpoint is used."""
    root, _ = fsdp
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(root / "rt" / "unlearned" / "checkpoints", ckpts)
    assert [p.name for p in checkpoint.epoch_checkpoints(ckpts)] == ["epoch-1", "epoch-2"]
    assert checkpoint.resume_point(ckpts) == ckpts / "epoch-2"
    shard = ckpts / "epoch-2" / checkpoint.SHARDED_DIR / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    reports = []
    assert checkpoint.resume_point(ckpts, report=reports.append) == ckpts / "epoch-1"
    assert reports and f"{checkpoint.SHARDED_DIR}/__0_0.distcp has" in reports[0]
    (ckpts / "epoch-1" / checkpoint.SHARDED_DIR / ".metadata").unlink()
    assert "dcp/.metadata is missing" in checkpoint.verify(ckpts / "epoch-1")


def test_fsdp2_needs_several_processes_and_accelerate_sharding_is_refused(tmp_path, capsys, monkeypatch):
    """Before any compute: fsdp2 in one process, fsdp2 with per-epoch evaluation (main process only) or an
    optimizer for whole tensors, a batch that does not split over the launched processes, and a launch whose
    accelerate config would have accelerate shard the model itself (what `accelerate launch` tells the processes
    in ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED)."""
    from rklu_fast.cli import main

    assert main([*unlearn_args(tmp_path / "one", **FSDP)]) == 2
    assert "distributed.engine: 'fsdp2' shards the model over the launched processes" in capsys.readouterr().err
    assert main([*unlearn_args(tmp_path / "eval", **FSDP, **{"eval.every_epoch": "true"})]) == 2
    assert "eval.every_epoch: per-epoch evaluation runs on the main process alone" in capsys.readouterr().err
    assert main([*unlearn_args(tmp_path / "opt", **FSDP, **{"unlearn.optimizer": "adamw_8bit"})]) == 2
    assert "unlearn.optimizer: adamw_8bit is not supported under distributed.engine=fsdp2" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # as launched: batch 4 does not split into 2 ranks x micro-batch 4
    assert main([*unlearn_args(tmp_path / "split", **{"unlearn.micro_batch_size": 4})]) == 2
    assert "unlearn.batch_size: 4 must be divisible by processes x micro_batch_size = 2 x 4" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for distributed_type FSDP
    assert main([*unlearn_args(tmp_path / "acc")]) == 2
    assert "distributed_type FSDP, which rklu does not use (accelerate builds FSDP only on GPUs" in \
        capsys.readouterr().err
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert main([*unlearn_args(tmp_path / "ds")]) == 2
    assert "distributed_type DEEPSPEED, which rklu does not use (its ZeRO-2 reduces" in capsys.readouterr().err


def test_a_sharded_checkpoint_resumes_only_under_fsdp2(fsdp, tmp_path, capsys):
    """An interrupted fsdp2 stage resumed by one process (or DDP) is refused before any compute, naming the engine
    that wrote the checkpoint: its optimizer state is sharded."""
    from rklu_fast.cli import main

    root, _ = fsdp
    run_dir = tmp_path / "run"
    shutil.copytree(root / "rt", run_dir)
    shutil.rmtree(run_dir / "unlearned" / "model")  # as if killed after its last checkpoint
    saved = run_dir / "config.yaml"
    saved.write_text(saved.read_text().replace(str(root / "rt"), str(run_dir)))
    assert main([*unlearn_args(run_dir, **run_settings(REFERENCE_RUNS["rt"], run_dir)), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "the 'unlearned' checkpoint" in err and "was written by distributed.engine=fsdp2" in err


def test_shipped_fsdp_config_launches_the_tested_engine():
    """``configs/accelerate/fsdp.yaml`` is a plain multi-GPU launch (accelerate's loader reads MULTI_GPU, so
    accelerate shards nothing and the processes reach rklu's engine), and the command in its header — the rklu
    overrides of the launch line — is a valid config selecting that engine, with the optimizers it takes."""
    import re
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    from rklu_fast.config import load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    shipped = configs / "accelerate" / "fsdp.yaml"
    assert load_config_from_file(str(shipped)).distributed_type == DistributedType.MULTI_GPU
    deepspeed = load_config_from_file(str(configs / "accelerate" / "deepspeed.yaml"))
    assert deepspeed.distributed_type == DistributedType.DEEPSPEED  # refused (test above)
    header = " ".join(line.lstrip("# ").rstrip("\\") for line in shipped.read_text().splitlines()
                      if line.startswith("#  "))
    config_file = re.search(r"--config (\S+)", header).group(1)
    overrides = [t for t in header.split() if re.fullmatch(r"[\w.]+=\S+", t)]
    config = load_config(configs.parent / config_file, overrides)
    assert config["distributed"]["engine"] == "fsdp2"
    assert {config[s]["optimizer"] for s in ("finetune", "augment", "unlearn")} == {"adamw"}


def _full_disk(rank, world, run_dir, fault):
    unlearn_with_fault(rank, world, run_dir, fault, RT)


def test_a_failed_sharded_checkpoint_write_stops_every_rank(tmp_path):
    """Rank 0's write of the first checkpoint fails (disk full, injected after rank 1's shard is written): every
    rank stops with the same error (exit 1, the --resume command), nothing of the checkpoint is kept."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert launch(_full_disk, 2, run_dir, f"unlearned:{N_FORGET // BATCH}:{checkpoint.STATE_FILE}") == [0, 0]
    assert_every_rank_stopped_on_the_failed_write(run_dir)


def test_the_shipped_fsdp_config_runs_the_engine_through_accelerate_launch(tmp_path):
    """``accelerate launch --config_file configs/accelerate/fsdp.yaml`` itself (torchrun, 2 processes; on this CPU
    machine with ``--mixed_precision no`` and the run's ``cpu: true``, so gloo) runs ``rklu unlearn`` under
    ``distributed.engine=fsdp2``: sharded checkpoints, per-step losses within 1e-5 of one process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "launched"
    models_dir()  # made here, read by both processes
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(repo / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
           "--main_process_port", str(free_port()), "-m", "rklu_fast.cli",
           *unlearn_args(run_dir, **run_settings(RT, run_dir))]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpts = run_dir / "unlearned" / "checkpoints"
    assert [p.name for p in checkpoint.epoch_checkpoints(ckpts)] == ["epoch-1", "epoch-2"]
    assert all(checkpoint.is_sharded(p) and checkpoint.verify(p) is None for p in checkpoint.epoch_checkpoints(ckpts))
    one, two = losses(reference() / "rt"), losses(run_dir)
    assert [s for s, *_ in two] == list(range(1, STEPS + 1))
    for (step, f1, r1), (_, f2, r2) in zip(one, two):
        assert abs(f2 - f1) <= 1e-5 * abs(f1) and abs(r2 - r1) <= 1e-5 * abs(r1), (step, f1, f2, r1, r2)
