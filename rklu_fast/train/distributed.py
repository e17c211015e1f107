"""Sharded training with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``): one code path for GPUs (NCCL)
and CPUs (gloo, what CI runs).

Why the project drives FSDP2 itself: accelerate (1.15) builds FSDP only on accelerators.  Launched on CPUs with an
FSDP config it trains with DDP instead, without a word (its state stays ``MULTI_CPU``), so CI could never run what
a GPU user's ``distributed_type: FSDP`` runs.  ``FSDP2Accelerator`` is an ``accelerate.Accelerator`` (processes,
device, autocast, reductions, barriers all stay accelerate's) whose ``prepare`` shards the model with
``fully_shard`` instead of wrapping it in DDP.  The run config selects it (``distributed.engine: fsdp2``);
``accelerate launch --config_file configs/accelerate/fsdp.yaml`` only starts the processes.

- The model is sharded per decoder layer (the classes transformers lists in ``_no_split_modules``), then at the
  root (embeddings, final norm, LM head).  LoRA adapters are sharded with the layers they sit in.  The frozen
  models a stage runs forwards through (an online teacher, the ``KL`` retain term's original) are sharded the
  same way (``shard_frozen``).
- Gradient accumulation: every micro-step but the step's last skips the reduce-scatter (``no_sync`` →
  ``set_requires_gradient_sync(False)``); each rank keeps its unsharded gradient sum until then (memory: one
  full gradient per rank between micro-steps, docs/memory-and-scale.md).
- Checkpoints (``save_checkpoint`` / ``load_checkpoint``): model and optimizer shards through
  ``torch.distributed.checkpoint`` (each rank writes its own), the step, scheduler and every rank's RNG beside
  them, in the atomic directory with a manifest that ``rklu_fast.train.checkpoint`` writes and verifies.  Only
  the exported model gathers the full state dict (``export_state_dict``).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from accelerate import Accelerator

from rklu_fast.train import checkpoint, faults

def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def decoder_layer_classes(model) -> set[type]:
    """The classes of ``model``'s decoder layers: those its transformers class lists in ``_no_split_modules``
    (``LlamaDecoderLayer``, ``PhiDecoderLayer``, …), found among its modules (peft-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not found:
        raise ValueError(f"model: {type(base).__name__} names no decoder layer class (_no_split_modules = "
                         f"{sorted(names)}); FSDP2 shards per decoder layer")
    return found


def shard(model: torch.nn.Module, mesh, reshard_after_forward: bool | None = True) -> torch.nn.Module:
    """``fully_shard`` each decoder layer of ``model``, then the root (in place; returns ``model``).
    ``reshard_after_forward``: FSDP2's (``None``: every layer but the root, whose weights backward needs first)."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):  # e.g. one model serving as the online teacher's original and the KL term's
        return model
    layers = decoder_layer_classes(model)
    for module in list(model.modules()):
        if type(module) in layers:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


class FSDP2Accelerator(Accelerator):
    """An ``Accelerator`` whose ``prepare(model, optimizer)`` shards the model with FSDP2 over all processes.

    ``reshard_after_forward``: free each decoder layer's gathered weights after its forward (gathered again in
    backward; the root's stay, backward needs them first); ``False`` keeps every layer's until backward: less
    communication, more memory.  Mixed precision is accelerate's autocast over fp32 (or ``model.dtype``) shards,
    as in one process, so both compute the same numbers.
    """

    def __init__(self, *args, reshard_after_forward: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        if self.num_processes < 2:
            raise ValueError("distributed.engine: 'fsdp2' shards the model over the launched processes, and this "
                             "is one process; launch with `accelerate launch --config_file "
                             "configs/accelerate/fsdp.yaml ...` or use distributed.engine=accelerate")
        if self.mixed_precision == "fp16":
            raise ValueError("precision: fp16 needs a loss scaler that the fsdp2 engine does not drive; use bf16 "
                             "(or no)")
        from torch.distributed.device_mesh import init_device_mesh

        self.reshard_after_forward = reshard_after_forward
        self.mesh = init_device_mesh(self.device.type, (self.num_processes,))

    def prepare(self, model, optimizer):
        """Shard ``model`` and point ``optimizer`` (built on the unsharded model, with no state yet) at the
        sharded parameters, by name.  Returns ``(model, optimizer)``, the same objects."""
        if optimizer.state:
            raise ValueError("optimizer: already holds state; under distributed.engine=fsdp2 the optimizer state "
                             "is restored after sharding, from a sharded checkpoint (a checkpoint written by a "
                             "run without fsdp2 cannot be resumed by one with it)")
        names = {id(p): n for n, p in model.named_parameters()}
        # fully_shard moves each unit to the mesh device as it shards it: never the whole model on one device
        shard(model, self.mesh, None if self.reshard_after_forward else False)
        sharded = dict(model.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        return model, optimizer

    def shard_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen model sharded like the student: each rank keeps 1/N of its weights.  It only runs forwards,
        so every layer (the root too) frees its gathered weights after its forward."""
        return shard(model, self.mesh, True)

    @contextlib.contextmanager
    def no_sync(self, model):
        """Backward without the reduce-scatter: gradients accumulate unsharded on each rank."""
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        """Clip by the norm of the whole gradient (the shards' squared norms summed over ranks); returns it as a
        plain tensor."""
        from torch.distributed.tensor import DTensor

        parameters = [p for p in parameters if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters], norm_type)
        total = norm.full_tensor() if isinstance(norm, DTensor) else norm
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)  # reduced once, above
        return total


def shard_frozen(model, accelerator):
    """``model`` sharded when ``accelerator`` shards (``FSDP2Accelerator``), else unchanged."""
    return accelerator.shard_frozen(model) if isinstance(accelerator, FSDP2Accelerator) else model


# ---------------------------------------------------------------------------------------------- checkpoints
def _state_options(model, **kwargs):
    """LoRA: only the trainable adapter is saved (the frozen base is the original's, loaded again)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=hasattr(model, "peft_config"), **kwargs)


def save_checkpoint(path: str | Path, model, tokenizer, *, step: int, optimizer, scheduler, accelerator,
                    role: str | None = None) -> None:
    """Collective (every rank calls it): a sharded epoch checkpoint at ``path``, atomic.

    Layout: ``dcp/`` (model and optimizer, ``torch.distributed.checkpoint``: one file per rank and ``.metadata``),
    ``training_state.pt`` (step, scheduler, every rank's RNG), the model's config (``config.json``, or a LoRA
    adapter's ``adapter_config.json``) and the tokenizer, then ``manifest.json``, written last: the marker that
    the checkpoint is complete.  Rank 0 makes the temporary directory, every rank writes its shard into it, rank
    0 writes the rest, fsyncs and renames it into place.  A failed write raises ``CheckpointWriteError`` on every
    rank and leaves the earlier checkpoints as they were.
    """
    import torch.distributed.checkpoint as dcp
    from accelerate.utils import broadcast_object_list, gather_object
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path, main = Path(path), accelerator.is_main_process
    model_state, optim_state = get_state_dict(model, optimizer, options=_state_options(model))
    rngs = gather_object([checkpoint.rng_state()])
    failure, made, writing = None, None, contextlib.ExitStack()
    if main:
        try:
            made = writing.enter_context(checkpoint.atomic_directory(path))
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            failure = f"{type(e).__name__}: {e}"
    tmp = broadcast_object_list([str(made) if made is not None else None])[0]  # every rank: where to write
    if tmp is not None:
        tmp = Path(tmp)
        try:
            with writing:  # rank 0: leaving it fsyncs and renames the directory, an exception discards it
                dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp / checkpoint.SHARDED_DIR)
                if main:
                    torch.save({"step": step, "scheduler": scheduler.state_dict(), "rng": rngs[0],
                                "rng_per_rank": rngs}, tmp / checkpoint.STATE_FILE)
                    _save_configs(tmp, model, tokenizer)
                    checkpoint.write_manifest(tmp)
                    faults.at_checkpoint_write(tmp, role or path.parent.parent.name, step)
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            failure = f"{type(e).__name__}: {e}"
    failures = [f for f in gather_object([failure]) if f is not None]
    if failures:
        raise checkpoint.CheckpointWriteError(f"checkpoint {path}: writing failed ({failures[0]}); nothing of it "
                                              "was kept and the earlier checkpoints are untouched")
    if main:
        checkpoint.remove_superseded(path)
    accelerator.wait_for_everyone()


def _save_configs(directory: Path, model, tokenizer) -> None:
    """What ``save_pretrained`` writes besides the weights: the resumed stage checks its LoRA settings here."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config is not None:
        peft_config[model.active_adapter].save_pretrained(directory)
    else:
        model.config.save_pretrained(directory)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(directory)


def load_checkpoint(path: str | Path, model, optimizer, scheduler, accelerator) -> int:
    """Collective: restore a sharded checkpoint into the sharded ``model`` and its ``optimizer`` (any number of
    processes: ``torch.distributed.checkpoint`` reshards), the scheduler and this rank's RNG; returns the step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    if not is_sharded(model):
        raise ValueError(f"resume: {path} holds sharded state (written under distributed.engine=fsdp2); resume "
                         "it with that engine")
    model_state, optim_state = get_state_dict(model, optimizer, options=_state_options(model))
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path / checkpoint.SHARDED_DIR)
    lora = hasattr(model, "peft_config")  # the adapter alone was saved: the frozen base stays as loaded
    keys = set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                          options=_state_options(model, strict=not lora))
    if lora:
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        frozen |= {name for name, _ in model.named_buffers()}
        wrong = sorted(set(keys.missing_keys) - frozen) + sorted(keys.unexpected_keys)
        if wrong:
            raise ValueError(f"resume: {path} does not match this LoRA student (missing or unexpected: "
                             f"{wrong[:5]}); resume with the lora settings it was written with")
    training = checkpoint.load_training_state(path)
    scheduler.load_state_dict(training["scheduler"])
    rngs = training["rng_per_rank"]
    checkpoint.set_rng_state(rngs[accelerator.process_index] if len(rngs) == accelerator.num_processes
                             else training["rng"])
    return training["step"]


def export_state_dict(model) -> dict | None:
    """Collective: the full (unsharded) state dict of a sharded model on the main process's CPU, for
    ``save_pretrained``; ``None`` on the other ranks and for an unsharded model (it saves itself)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_state_options(model, full_state_dict=True, cpu_offload=True))
    return state if torch.distributed.get_rank() == 0 else None
