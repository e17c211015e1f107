"""Shared helpers of the multi-process tests (test_ddp.py, test_fsdp.py): ``launch`` runs a function in N CPU
processes joined by gloo, ``models_dir`` holds a tiny original and augmented model (2 decoder layers) with the
BPE of tiny_pipeline, ``unlearn`` runs ``rklu unlearn`` on them, ``reference`` is the one-process run each
multi-process run is compared with.

Processes are forked, not spawned: a spawned process spends ~20 s of a shared 2-core machine importing torch and
transformers again, a forked one starts with them imported.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from tiny_pipeline import N_FORGET, overrides, tokenizer_dir

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-tofu.yaml"
LORA = {"r": 8, "alpha": 16}
BATCH, MICRO, EPOCHS = 4, 1, 3  # 2 steps per epoch of the 8 forget examples; 2 micro-steps per rank and step
STEPS = EPOCHS * N_FORGET // BATCH
LAYERS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, fn, args) -> None:
    from accelerate.state import AcceleratorState, GradientState

    # a fresh process as far as accelerate knows (the parent may have made an Accelerator in an earlier test)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    os.environ.update(CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")  # CPU ranks on a GPU machine too
    torch.set_num_threads(1)  # two processes on a small machine: no OpenMP oversubscription
    try:
        fn(rank, world, *args)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        raise


def launch(fn, world: int, *args, timeout: float = 300.0) -> list[int]:
    """``fn(rank, world, *args)`` in ``world`` forked processes (environment of ``torchrun``: rank, world size,
    rendezvous); returns their exit codes.  When one fails (an exception, or killed), the others are killed,
    as a launcher does: a rank waiting in a collective would wait forever."""
    models_dir()  # the inputs every process reads are made once, before the fork (else each made its own)
    ctx = mp.start_processes(_child, args=(world, free_port(), fn, args), nprocs=world, join=False,
                             start_method="fork")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} processes of {fn.__name__} still running after {timeout} s")
    except ProcessException:  # a rank failed (its traceback is printed): the exit codes say which
        pass
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()
    return [p.exitcode for p in ctx.processes]


@functools.lru_cache(maxsize=None)
def models_dir() -> Path:
    """``original/`` (a random tiny Llama, 2 decoder layers) and ``augmented/`` (the original with every weight
    moved by noise of 1/5 its std: a teacher whose logits differ clearly), in save_pretrained form."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = Path(tempfile.mkdtemp(prefix="rklu-gloo-models-"))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(d / "original")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std().clamp_min(1e-3) / 5)
    model.save_pretrained(d / "augmented")
    from rklu_fast.train import lora

    adapted = lora.add_adapter(LlamaForCausalLM.from_pretrained(d / "original"), lora.AUGMENTED,
                               lora.lora_config(**LORA))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) / 4)
    adapted.peft_config[lora.AUGMENTED].base_model_name_or_path = str(d / "original")
    lora.save_adapter(d / "augmented-adapter", adapted, lora.AUGMENTED)
    return d


def unlearn_args(run_dir, **extra) -> list[str]:
    """``rklu unlearn`` arguments of a tiny run from the models above (cached teacher, RT retain term)."""
    m = models_dir()
    settings = {"finetune.original": m / "original", "augment.model": m / "augmented",
                "teacher.mode": "cached", "unlearn.epochs": EPOCHS, "unlearn.batch_size": BATCH,
                "unlearn.micro_batch_size": MICRO, "unlearn.lr": 3e-3, "unlearn.backend": "torch",
                "checkpoint.keep_last": 3, "eval.max_examples": 4, **extra}
    return ["unlearn", "--config", str(CONFIG), *overrides(run_dir, **settings)]


def unlearn(rank: int, world: int, run_dir, extra: dict, flags: tuple = ()) -> None:
    """``rklu unlearn`` (the CLI's main) in this process; raises on a non-zero status.  With ``lora.enabled``, the
    run's augmented model is the adapter of ``models_dir`` (LoRA mode reads it from the run dir)."""
    from rklu_fast.cli import main

    extra = run_settings(extra, run_dir)
    adapter = Path(run_dir) / "augmented" / "model"
    if str(extra.get("lora.enabled")) == "true" and not adapter.exists():
        if rank == 0:  # copied whole, then renamed: the other ranks see all of it or nothing
            shutil.copytree(models_dir() / "augmented-adapter", adapter.with_name("model.tmp"))
            os.rename(adapter.with_name("model.tmp"), adapter)
        deadline = time.monotonic() + 60
        while not adapter.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    status = main([*unlearn_args(run_dir, **extra), *flags])
    if status:
        raise SystemExit(f"rank {rank}: rklu unlearn exited with {status}")


def _references(rank: int, world: int, root: Path, runs: dict) -> None:
    for name, extra in runs.items():
        unlearn(rank, world, root / name, extra)


def run_settings(extra: dict, run_dir) -> dict:
    """``extra`` with ``{run_dir}`` in its values replaced by ``run_dir``."""
    return {k: str(v).replace("{run_dir}", str(run_dir)) for k, v in extra.items()}


# rt: cached teacher in teacher.cache_dir (under N processes rank 0 writes it, the others memory-map it), RT
# retain term; kl: online teacher (its two models run every step), the KL retain term (the
# original's logits on the retain set) and gradient checkpointing; lora: the student a LoRA adapter on the shared
# base, cached teacher, also exported merged into the base
REFERENCE_RUNS = {"rt": {"teacher.cache_dir": "{run_dir}/teacher-cache"},
                  "kl": {"unlearn.retain_term": "KL", "teacher.mode": "online",
                         "unlearn.gradient_checkpointing": "true"},
                  "lora": {"lora.enabled": "true", "lora.r": LORA["r"], "lora.alpha": LORA["alpha"],
                           "lora.merge": "true", "augment.model": "null", "unlearn.lr": 3e-2}}


@functools.lru_cache(maxsize=None)
def reference() -> Path:
    """The one-process runs (``REFERENCE_RUNS``, default engine) that the multi-process runs must reproduce."""
    root = Path(tempfile.mkdtemp(prefix="rklu-gloo-ref-"))
    codes = launch(_references, 1, root, REFERENCE_RUNS)
    assert codes == [0], f"one-process reference runs failed: exit codes {codes}"
    return root


def losses(run_dir) -> list[tuple[int, float, float]]:
    """(step, forget loss, retain loss) of every logged step of the unlearn stage."""
    with open(Path(run_dir) / "unlearned" / "log.jsonl") as f:
        return [(r["step"], r["forget_loss"], r["retain_loss"]) for r in map(json.loads, f)]


def weights(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / "unlearned" / "model" / "model.safetensors")


# ---------------------------------------------------------------------------------------------- one step's gradient
def _step_examples(n: int, seed: int, vocab: int) -> list[dict]:
    """``n`` QA-shaped examples of ragged lengths (random ids, the question masked out of the labels)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        q, a = (int(x) for x in torch.randint(2, 9, (2,), generator=g))
        ids = torch.randint(3, vocab, (q + a,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * q + ids[q:], "attention_mask": [1] * (q + a), "index": i})
    return out


def gradient_step(rank: int, world: int, engine: str, out: Path, seed: int) -> None:
    """One optimizer step's gradient accumulation through ``loop.accumulate_gradients`` (NLL forget term + RT
    retain term, 2 micro-steps per rank of 2 backwards each), twice: with the loop's synchronisation and with
    one after every backward (the loop's ``_sync_if`` replaced).  Rank 0 writes the full gradients of both, the
    gradient collectives each ran on this rank (DDP: all-reduces, counted by a comm hook, with the number of
    gradient elements each carried; FSDP2: reduce-scatters), and how many forget examples each rank computed."""
    import contextlib

    from accelerate import Accelerator
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from transformers import LlamaForCausalLM

    from rklu_fast.train import loop
    from rklu_fast.train.distributed import FSDP2Accelerator
    from rklu_fast.train.methods import make_method, make_retain_term
    from rklu_fast.train.sampling import rank_slice

    model = LlamaForCausalLM.from_pretrained(models_dir() / "original")
    vocab = model.config.vocab_size
    accelerator = FSDP2Accelerator(cpu=True) if engine == "fsdp2" else Accelerator(cpu=True)
    model, _ = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    calls: list[int] = []
    if engine == "ddp" and world > 1:
        def counting_hook(state, bucket):
            calls.append(bucket.buffer().numel())
            return allreduce_hook(state, bucket)
        model.register_comm_hook(None, counting_hook)
    elif engine == "fsdp2":
        real = torch.distributed.reduce_scatter_single

        def counting(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)
        torch.distributed.reduce_scatter_single = counting
    forget, retain = _step_examples(BATCH, seed, vocab), _step_examples(BATCH, seed + 1, vocab)
    views = [{"forget": e} for e in forget]
    counts = loop.step_counts(views, retain, MICRO, world)
    nll, rt = make_method("nll"), make_retain_term("RT")
    seen = []
    real_loss = nll.loss

    def counting_loss(student, batch, *args, **kwargs):
        seen.append(len(batch["forget"]["input_ids"]))
        return real_loss(student, batch, *args, **kwargs)
    nll.loss = counting_loss
    result = {}
    for mode in ("loop", "every_backward"):
        calls.clear()
        seen.clear()
        sync = loop._sync_if
        if mode == "every_backward":
            loop._sync_if = lambda *args: contextlib.nullcontext()
        try:
            loop.accumulate_gradients(model, nll, rank_slice(views, rank, world), MICRO, 0, accelerator,
                                      retain_examples=rank_slice(retain, rank, world), retain_term=rt, counts=counts)
        finally:
            loop._sync_if = sync
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name.removeprefix("module.")] = g.detach().clone()  # DDP's wrapper adds "module."
        model.zero_grad(set_to_none=True)
        result[mode] = {"grads": grads, "collectives": list(calls), "seen": sum(seen)}
    if rank == 0:
        torch.save(result, out)


def unlearn_with_fault(rank: int, world: int, run_dir, fault: str, extra: dict) -> None:
    """``rklu unlearn`` with ``RKLU_FAULT_AT=fault`` (e.g. an injected ENOSPC); this rank's exit status and error
    text go to ``run_dir/status-<rank>.json``."""
    import contextlib
    import io

    from rklu_fast.cli import main

    os.environ["RKLU_FAULT_AT"] = fault
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(unlearn_args(run_dir, **run_settings(extra, run_dir)))
    (Path(run_dir) / f"status-{rank}.json").write_text(json.dumps([status, err.getvalue()]))


def assert_every_rank_stopped_on_the_failed_write(run_dir) -> None:
    """What ``unlearn_with_fault`` left after an injected ENOSPC on the first checkpoint: every rank exited 1 with
    the write's error and the --resume command, and nothing of the checkpoint was kept."""
    for rank in (0, 1):
        status, err = json.loads((Path(run_dir) / f"status-{rank}.json").read_text())
        assert status == 1 and "epoch-1: writing failed (OSError" in err and "No space left" in err, (rank, err)
        assert "continue with: rklu unlearn" in err
    ckpts = Path(run_dir) / "unlearned" / "checkpoints"
    assert not ckpts.exists() or not list(ckpts.iterdir())
