"""The one training loop: AdamW, gradient accumulation, linear warm-up + decay, epoch checkpoints, exact resume.

Read top to bottom, like nanoGPT's ``train.py``.  What differs between stages and methods is passed in: the
``method`` (a loss plug-in, ``rklu_fast.train.methods``), an optional ``retain_term``, and the ``frozen`` object
they read teacher logits, reference log-likelihoods or the original's logits from (``rklu_fast.train.frozen``).

One optimizer step consumes ``batch_size`` forget examples (and as many retain examples), split into micro-batches
of ``micro_batch_size``.  A method may train each example on other sequences than the example itself (its
``views``: IDK a refusal, IdkDPO a refusal and the gold answer).  Every loss term is normalised by the whole
step's counts (``StepCounts``), so accumulation reproduces the big batch exactly.  Under DDP or FSDP2
(``distributed.py``) every rank draws the same global step batch (a function of seed and step), keeps its fixed
slice, normalises by the whole step's counts, and gradients are synchronised once per step (``no_sync`` on every
backward but the last).  A sharded (FSDP2) model writes sharded checkpoints, every rank its part.

The hot path has one host sync per optimizer step: the step's losses and gradient norm are read together, to
stop the stage on a non-finite value before the optimizer applies it (``NonFiniteError``); statistics that need
a full-vocabulary softmax are computed only on logging steps.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from transformers import get_linear_schedule_with_warmup

from rklu_fast.data.collate import collate, count_targets, to_device
from rklu_fast.progress import progress
from rklu_fast.train import checkpoint, distributed
from rklu_fast.train.lowmem import build_optimizer, parameter_groups, set_gradient_checkpointing
from rklu_fast.train.methods.base import StepCounts
from rklu_fast.train.sampling import loss_scale, rank_slice
from rklu_fast.train.student import Student
from rklu_fast.jsonio import dumps


class NonFiniteError(RuntimeError):
    """A NaN or inf loss term or gradient norm: the stage stops before the optimizer applies it."""


class ExampleStream:
    """Examples in a fresh seeded shuffle per epoch.  Step ``s`` reads positions ``[s·k, (s+1)·k)`` of the endless
    concatenation of epochs, so the data position is a pure function of the step: resuming needs only the step.
    ``step(s)`` gives ``(epoch, example)`` pairs: a method may draw per (seed, epoch, example) (IDK's refusals)."""

    def __init__(self, examples: list[dict], per_step: int, seed: int):
        if not examples:
            raise ValueError("examples: empty training set")
        self.examples, self.per_step, self.seed = examples, per_step, seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.examples), generator=g).tolist()}
        return self._orders[epoch]

    def step(self, step: int) -> list[tuple[int, dict]]:
        n = len(self.examples)
        return [(pos // n, self.examples[self._order(pos // n)[pos % n]])
                for pos in range(step * self.per_step, (step + 1) * self.per_step)]


def plan_steps(num_examples: int, epochs: float, batch_size: int, warmup_epochs: float = 1.0) -> tuple[int, int]:
    """(total optimizer steps, warm-up steps): ⌊epochs·|D|/batch⌋ (at least 1), warm-up over ``warmup_epochs``
    epochs of that plan (at least 1 step, as TOFU's ``max(1, max_steps // num_epochs)``)."""
    total = max(1, math.floor(epochs * num_examples / batch_size))
    return total, max(1, math.floor(total * warmup_epochs / epochs))


def epochs_touched(num_examples: int, epochs: float, batch_size: int) -> int:
    """How many epochs (0, 1, …) the plan's steps draw from (the last may be partial)."""
    total, _ = plan_steps(num_examples, epochs, batch_size)
    return math.ceil(total * batch_size / num_examples)


def step_counts(forget_views: list[dict[str, dict]], retain_examples: list[dict], micro_batch_size: int,
                world: int = 1, group_by_length: bool = True) -> StepCounts:
    """The normalisers of one whole step (every process computes them from the whole step's examples).
    ``retain_positions`` counts the padded positions of the retain micro-batches the ``world`` processes form
    from their shares (the KL term over all positions depends on padding, as TOFU's does), grouped by length as
    ``accumulate_gradients`` groups them."""
    names = forget_views[0].keys() if forget_views else ()
    order = length_grouped if group_by_length else list
    positions = sum(len(chunk) * max(len(e["input_ids"]) for e in chunk)
                    for r in range(world) if retain_examples
                    for chunk in _chunks(order(rank_slice(retain_examples, r, world)), micro_batch_size))
    return StepCounts(tokens={name: count_targets([v[name] for v in forget_views]) for name in names},
                      sequences=len(forget_views), retain_tokens=count_targets(retain_examples),
                      retain_positions=positions)


def _chunks(items: list, size: int):
    return [items[i:i + size] for i in range(0, len(items), size)]


def length_grouped(items: list) -> list:
    """The items of one step (examples, or dicts of views) sorted by length, so that each micro-batch pads to a
    similar length: the step's sum and its normalisers do not depend on how it is split into micro-batches, only
    the padded tokens do (stable sort: a pure function of the step's items)."""
    def length(item):
        views = item.values() if "input_ids" not in item else (item,)
        return max(len(v["input_ids"]) for v in views)
    return sorted(items, key=length)


def accumulate_gradients(model, method, forget_views: list[dict[str, dict]], micro_batch_size: int,
                         pad_token_id: int, accelerator, *, frozen=None, retain_examples: list[dict] | None = None,
                         retain_term=None, retain_weight: float = 1.0, forget_weight: float = 1.0,
                         counts: StepCounts | None = None, want_stats: bool = False,
                         group_by_length: bool = True, fused_linear: bool = False) -> dict[str, torch.Tensor]:
    """Forward/backward over the micro-batches of one optimizer step; gradients accumulate in ``.grad``.

    ``forget_views``: per forget example, its views (``method.views``); each forget micro-batch is paired with a
    retain micro-batch.  ``counts``: the whole step's normalisers when these examples are one rank's share
    (default: computed from them).  Returns device tensors (no host sync): the step's summed ``forget_loss`` and
    ``retain_loss`` (each before its weight), and with ``want_stats`` the method's statistics summed over the
    forget sequences.
    """
    retain_examples = retain_examples if retain_term is not None else []
    if counts is None:
        counts = step_counts(forget_views, retain_examples, micro_batch_size, group_by_length=group_by_length)
    device = accelerator.device
    scale = loss_scale(accelerator.num_processes)

    student = Student(model, fused=fused_linear)

    order = length_grouped if group_by_length else list  # grouping changes only the padding (benchmarks)
    f_chunks = _chunks(order(forget_views), micro_batch_size)
    r_chunks = _chunks(order(retain_examples), micro_batch_size)
    sums = {"forget_loss": torch.zeros((), device=device)}
    if retain_term is not None:
        sums["retain_loss"] = torch.zeros((), device=device)
    for i, chunk in enumerate(f_chunks):
        last = i == len(f_chunks) - 1
        batch = {name: to_device(collate([v[name] for v in chunk], pad_token_id), device) for name in chunk[0]}
        # one gradient synchronisation per step (DDP): every backward but the step's last skips it
        with _sync_if(accelerator, model, last and retain_term is None):
            with accelerator.autocast():
                loss, stats = method.loss(student, batch, frozen, counts, want_stats)
            accelerator.backward(scale * forget_weight * loss)
        sums["forget_loss"] += loss.detach()
        for key, value in stats.items():
            sums[key] = sums.get(key, 0) + value.detach()
        del loss, stats, batch  # free the forget graph before the retain forward
        if retain_term is not None:
            r_batch = to_device(collate(r_chunks[i], pad_token_id), device)
            with _sync_if(accelerator, model, last):
                with accelerator.autocast():
                    r_loss = retain_term.loss(student, r_batch, frozen, counts)
                accelerator.backward(scale * retain_weight * r_loss)
            sums["retain_loss"] += r_loss.detach()
    return sums


def optimizer_step(model, optimizer, method, forget_views: list[dict[str, dict]], retain_examples: list[dict],
                   micro_batch_size: int, pad_token_id: int, accelerator, *, frozen=None, retain_term=None,
                   retain_weight: float = 1.0, forget_weight: float = 1.0, max_norm: float = math.inf,
                   want_stats: bool = False, step: int = 0, params=None, group_by_length: bool = True,
                   fused_linear: bool = False) -> dict[str, float]:
    """One optimizer step of the whole step's examples (every rank passes the same, keeps its share): gradients,
    clipping, the non-finite guard, ``optimizer.step()``.  Returns the step's summed loss terms, gradient norm and
    (with ``want_stats``) the method's statistics summed over forget sequences, read with the step's one host
    sync (summed over ranks when ``want_stats``).  The scheduler is the caller's."""
    world, rank = accelerator.num_processes, accelerator.process_index
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    counts = step_counts(forget_views, retain_examples, micro_batch_size, world, group_by_length)
    sums = accumulate_gradients(model, method, rank_slice(forget_views, rank, world), micro_batch_size,
                                pad_token_id, accelerator, frozen=frozen,
                                retain_examples=rank_slice(retain_examples, rank, world), retain_term=retain_term,
                                retain_weight=retain_weight, forget_weight=forget_weight, counts=counts,
                                want_stats=want_stats, group_by_length=group_by_length, fused_linear=fused_linear)
    grad_norm = accelerator.clip_grad_norm_(params, max_norm)
    keys = sorted(sums)
    values = torch.stack([sums[k].float() for k in keys] + [torch.as_tensor(grad_norm).float()])
    if world > 1 and want_stats:  # the whole step: losses and statistics summed over ranks
        values = accelerator.reduce(values, "sum") / torch.tensor([1.0] * len(keys) + [world], device=values.device)
    named = dict(zip(keys + ["grad_norm"], values.tolist()))  # the step's one host sync
    _check_finite(named, step, method.name, retain_term, fp16=accelerator.scaler is not None)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return named


def _sync_if(accelerator, model, sync: bool):
    return contextlib.nullcontext() if sync else accelerator.no_sync(model)


def train(model, tokenizer, method, forget_examples: list[dict], stage: dict, out_dir: str | Path, accelerator, *,
          frozen=None, retain_examples: list[dict] | None = None, retain_term=None, retain_weight: float = 1.0,
          forget_weight: float = 1.0, seed: int = 0, resume_from: str | Path | None = None,
          stop_after_steps: int | None = None, log_every: int = 1, tensorboard: bool = True, keep_last: int = 1,
          save_checkpoints: bool = True, fused_linear: bool = False,
          desc: str = "train", on_epoch=None) -> bool:
    """Train ``model`` in place for one stage; epoch checkpoints go to ``out_dir/checkpoints``.

    ``stage``: the stage's config (epochs, lr, weight_decay, batch_size, micro_batch_size, warmup_epochs,
    max_grad_norm).  ``resume_from``: a checkpoint whose weights ``model`` already holds; the optimizer,
    scheduler, RNG and step are restored from it.  ``stop_after_steps``: return after that many steps of this
    stage (a simulated kill, for tests).  ``on_epoch(epoch, model)``: called on the main process at every epoch
    boundary: before the first step (epoch 0, or the epoch resumed from), after each completed epoch (``epoch`` the
    number of completed epochs, at the step that completes it), and after a fractional last epoch (e.g.
    per-epoch evaluation, connected by the pipeline); it may switch the model to eval mode and use the RNGs, both
    are restored.  Returns True when the stage ran to its last step; raises
    ``NonFiniteError`` (before the optimizer step, so the last checkpoint stays good) on a NaN/inf loss or
    gradient norm.
    """
    out_dir, pad_id = Path(out_dir), tokenizer.pad_token_id
    ckpt_dir = out_dir / "checkpoints"
    batch, micro = stage["batch_size"], stage["micro_batch_size"]
    total, warmup = plan_steps(len(forget_examples), stage["epochs"], batch, stage["warmup_epochs"])
    steps_per_epoch = len(forget_examples) / batch
    forget = ExampleStream(forget_examples, batch, seed)
    retain = ExampleStream(retain_examples, batch, seed + 1) if retain_term is not None else None

    # Memory options (docs/memory-and-scale.md): optimizer choice, gradient checkpointing; LoRA students train only
    # their adapter, so only trainable parameters go to the optimizer (no weight decay on biases and norms).
    set_gradient_checkpointing(model, stage.get("gradient_checkpointing", False))
    optimizer = build_optimizer(parameter_groups(model, stage["weight_decay"]), stage.get("optimizer", "adamw"),
                                lr=stage["lr"], weight_decay=stage["weight_decay"],
                                update=stage.get("bf16_update", "kahan"), seed=seed)
    # Multi-process (sampling.py): every rank draws the step's global batch and keeps its slice.
    world = accelerator.num_processes
    if batch % (world * micro):
        raise ValueError(f"batch_size: {batch} must be divisible by processes x micro_batch_size = "
                         f"{world} x {micro}")
    # The scheduler counts global optimizer steps, so it stays outside accelerate.prepare (which would step it
    # once per process under DDP).
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
    start = 0
    sharded_resume = resume_from is not None and checkpoint.is_sharded(resume_from)
    if resume_from is not None and not sharded_resume:
        state = checkpoint.load_training_state(resume_from)
        saved, now = len(state["optimizer"]["param_groups"]), len(optimizer.param_groups)
        if saved != now:  # e.g. written before biases and norms got their own group without weight decay
            raise ValueError(f"resume: {resume_from} holds {saved} optimizer parameter group(s), this run builds "
                             f"{now}: it was written by another version of rklu_fast; start the stage again "
                             "without --resume")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        start = state["step"]
    model, optimizer = accelerator.prepare(model, optimizer)
    if sharded_resume:  # FSDP2: weights, optimizer, scheduler and RNG restored into the shards
        start = distributed.load_checkpoint(resume_from, model, optimizer, scheduler, accelerator)
    if on_epoch is not None and distributed.is_sharded(model):
        raise ValueError("on_epoch: the epoch hook runs on the main process alone, which cannot run a sharded model "
                         "(distributed.engine=fsdp2); evaluate the saved model instead")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    max_norm = stage["max_grad_norm"] if stage["max_grad_norm"] is not None else math.inf
    log = _Log(out_dir, start, tensorboard, enabled=accelerator.is_main_process)  # one writer per run

    def epoch_boundary(done: int) -> None:
        if on_epoch is not None and accelerator.is_main_process:
            rng = checkpoint.rng_state()  # the hook must not change what training draws next (exact resume)
            on_epoch(epoch_label(done), accelerator.unwrap_model(model))
            checkpoint.set_rng_state(rng)
            model.train()
        accelerator.wait_for_everyone()

    def epoch_label(done: int) -> float:
        """Completed epochs at an epoch boundary (an int, also when steps straddle epochs), else the fraction."""
        whole = done * batch // len(forget_examples)
        crossed = done == 0 or whole > (done - 1) * batch // len(forget_examples)
        return whole if crossed else round(done / steps_per_epoch, 4)

    epoch_boundary(start)

    bar = progress(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True,
                   disable=not accelerator.is_main_process)
    for step in range(start, total):
        t0 = time.perf_counter()
        done = step + 1
        logging_step = done % log_every == 0 or done == total
        f_views = [method.views(example, epoch) for epoch, example in forget.step(step)]
        r_examples = [example for _, example in retain.step(step)] if retain is not None else []
        lr = scheduler.get_last_lr()[0]
        named = optimizer_step(model, optimizer, method, f_views, r_examples, micro, pad_id, accelerator,
                               frozen=frozen, retain_term=retain_term, retain_weight=retain_weight,
                               forget_weight=forget_weight, max_norm=max_norm, want_stats=logging_step, step=done,
                               params=trainable, fused_linear=fused_linear)
        scheduler.step()

        if logging_step:
            per_sequence = {k: v / len(f_views) for k, v in named.items()
                            if k not in ("forget_loss", "retain_loss", "grad_norm")}
            tokens = sum(len(e["input_ids"]) for v in f_views for e in v.values()) + \
                sum(len(e["input_ids"]) for e in r_examples)
            record = {"step": done, "epoch": round(done / steps_per_epoch, 4), "lr": lr,
                      "loss": forget_weight * named["forget_loss"] + retain_weight * named.get("retain_loss", 0.0),
                      "forget_loss": named["forget_loss"],
                      **({"retain_loss": named["retain_loss"]} if "retain_loss" in named else {}),
                      **per_sequence, "tokens_per_s": tokens / (time.perf_counter() - t0),
                      "grad_norm": named["grad_norm"]}
            log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        bar.update(1)

        epoch = done * batch // len(forget_examples)  # completed epochs (integer arithmetic: exact boundaries)
        if save_checkpoints and done < total and epoch > step * batch // len(forget_examples):
            if distributed.is_sharded(model):  # every rank writes its shards
                distributed.save_checkpoint(ckpt_dir / f"epoch-{epoch}", model, tokenizer, step=done,
                                            optimizer=optimizer, scheduler=scheduler, accelerator=accelerator)
            else:  # one writer; a failure stops every rank (the others would wait for it forever)
                failure = None
                if accelerator.is_main_process:
                    try:
                        checkpoint.save_checkpoint(ckpt_dir / f"epoch-{epoch}", accelerator.unwrap_model(model),
                                                   tokenizer, step=done, optimizer=optimizer, scheduler=scheduler)
                    except checkpoint.CheckpointWriteError as e:
                        failure = e
                checkpoint.raise_on_every_rank(failure, accelerator)
            if accelerator.is_main_process:
                checkpoint.prune_checkpoints(ckpt_dir, keep_last)
        accelerator.wait_for_everyone()
        if epoch > step * batch // len(forget_examples) or done == total:
            epoch_boundary(done)
        if stop_after_steps is not None and done - start >= stop_after_steps and done < total:
            bar.close()
            log.close()
            return False
    bar.close()
    log.close()
    return True


def _check_finite(values: dict[str, float], step: int, method: str, retain_term, fp16: bool) -> None:
    """Stop on a NaN/inf loss term or gradient norm (fp16's loss scaler skips inf-gradient steps by design)."""
    for key in ("forget_loss", "retain_loss", "grad_norm"):
        value = values.get(key, 0.0)
        if math.isfinite(value) or (key == "grad_norm" and fp16):
            continue
        term = {"forget_loss": f"the forget term of {method!r}",
                "retain_loss": f"the retain term {getattr(retain_term, 'name', '')!r}",
                "grad_norm": "the gradient norm"}[key]
        raise NonFiniteError(f"step {step}: {term} is {value} (method {method!r}); the stage stopped before "
                             "applying it (the epoch checkpoints written so far are intact). Lower the learning "
                             "rate, check the data, or check the checkpoint the stage started from")


class _Log:
    """``log.jsonl`` + TensorBoard under ``out_dir``; on resume, records after the resumed step are dropped (those
    steps are about to be redone)."""

    def __init__(self, out_dir: Path, start: int, tensorboard: bool, enabled: bool = True):
        self.enabled = enabled  # False on ranks > 0 of a multi-process run
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "log.jsonl"
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= start] \
            if path.exists() else []
        path.write_text("".join(line + "\n" for line in kept))
        self.file = path.open("a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

            self.tb = SummaryWriter(out_dir / "tensorboard", purge_step=start + 1 if start else None)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and value is not None:
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
