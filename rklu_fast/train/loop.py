"""The one training loop: AdamW, gradient accumulation, linear warm-up + decay, epoch checkpoints, exact resume.

Read top to bottom, like nanoGPT's ``train.py``.  What differs between stages is passed in: the ``method`` (a loss
plug-in, see ``methods.py``), an optional ``retain_term``, and the ``teacher`` source the two of them read.

One optimizer step consumes ``batch_size`` forget examples (and as many retain examples), split into micro-batches
of ``micro_batch_size``.  Every loss term is a sum over the step's valid answer tokens divided by their count
(``num_items``), so accumulation reproduces the big batch exactly.  Under DDP every rank draws the same global
step batch (a function of seed and step), keeps its fixed slice, and normalises by the whole step's counts.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from transformers import get_linear_schedule_with_warmup

from rklu_fast.data.collate import collate, count_answer_tokens
from rklu_fast.progress import progress
from rklu_fast.train import checkpoint
from rklu_fast.train.lowmem import build_optimizer, set_gradient_checkpointing
from rklu_fast.train.metrics import answer_probability_per_example
from rklu_fast.train.sampling import loss_scale, num_answer_tokens, rank_slice


class ExampleStream:
    """Examples in a fresh seeded shuffle per epoch.  Step ``s`` reads positions ``[s·k, (s+1)·k)`` of the endless
    concatenation of epochs, so the data position is a pure function of the step: resuming needs only the step."""

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

    def step(self, step: int) -> list[dict]:
        n = len(self.examples)
        return [self.examples[self._order(pos // n)[pos % n]]
                for pos in range(step * self.per_step, (step + 1) * self.per_step)]


def plan_steps(num_examples: int, epochs: float, batch_size: int, warmup_epochs: float = 1.0) -> tuple[int, int]:
    """(total optimizer steps, warm-up steps): ⌊epochs·|D|/batch⌋ (at least 1), warm-up over ``warmup_epochs``
    epochs of that plan (at least 1 step, as TOFU's ``max(1, max_steps // num_epochs)``)."""
    total = max(1, math.floor(epochs * num_examples / batch_size))
    return total, max(1, math.floor(total * warmup_epochs / epochs))


def _micro_batches(examples, size, pad_id, device):
    for start in range(0, len(examples), size):
        yield {k: v.to(device) for k, v in collate(examples[start:start + size], pad_id).items()}


def _forward(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def accumulate_gradients(model, method, forget_examples: list[dict], micro_batch_size: int, pad_token_id: int,
                         accelerator, *, teacher=None, retain_examples: list[dict] | None = None, retain_term=None,
                         retain_weight: float = 1.0, num_items: tuple[int, int] | None = None) -> dict:
    """Forward/backward over the micro-batches of one optimizer step; gradients accumulate in ``.grad``.

    Each forget micro-batch is paired with a retain micro-batch.  Returns the step's summed loss terms, the mean
    forget-answer probability, the methods' stats averaged over micro-batches, and the token count.
    ``num_items``: (forget, retain) valid-token counts of the whole step when these examples are one rank's
    share (multi-process, see ``sampling.py``); the losses are then scaled for DDP's gradient average.
    """
    retain_examples = retain_examples if retain_term is not None else []
    f_batches = list(_micro_batches(forget_examples, micro_batch_size, pad_token_id, accelerator.device))
    r_batches = list(_micro_batches(retain_examples, micro_batch_size, pad_token_id, accelerator.device))
    n_forget = sum(count_answer_tokens(b["labels"]) for b in f_batches)
    n_retain = sum(count_answer_tokens(b["labels"]) for b in r_batches)
    if num_items is not None:  # multi-process (issue 7): normalise by the whole step's counts
        n_forget, n_retain = num_items
    scale = loss_scale(accelerator.num_processes)
    sums = {"forget_loss": 0.0, "forget_prob": 0.0, "tokens": 0}
    extra: dict[str, list[float]] = {}
    for i, f_batch in enumerate(f_batches):
        with accelerator.autocast():
            logits = _forward(model, f_batch)
            loss, stats = method.loss(logits, f_batch, teacher, n_forget)
        accelerator.backward(scale * loss)
        sums["forget_loss"] += loss.item()
        sums["forget_prob"] += answer_probability_per_example(logits.detach(), f_batch["labels"]).sum().item()
        sums["tokens"] += int(f_batch["attention_mask"].sum())
        for k, v in stats.items():
            extra.setdefault(k, []).append(v)
        del logits, loss  # free the forget graph before the retain forward
        if retain_term is not None:
            r_batch = r_batches[i]
            with accelerator.autocast():
                r_loss, _ = retain_term.loss(_forward(model, r_batch), r_batch, teacher, n_retain)
            accelerator.backward(scale * retain_weight * r_loss)
            sums["retain_loss"] = sums.get("retain_loss", 0.0) + r_loss.item()
            sums["tokens"] += int(r_batch["attention_mask"].sum())
    sums["forget_prob"] /= len(forget_examples)
    sums.update({k: sum(v) / len(v) for k, v in extra.items()})
    return sums


def train(model, tokenizer, method, forget_examples: list[dict], stage: dict, out_dir: str | Path, accelerator, *,
          teacher=None, retain_examples: list[dict] | None = None, retain_term=None, retain_weight: float = 1.0,
          seed: int = 0, resume_from: str | Path | None = None, stop_after_steps: int | None = None,
          log_every: int = 1, tensorboard: bool = True, keep_last: int = 1, desc: str = "train",
          on_epoch=None) -> bool:
    """Train ``model`` in place for one stage; epoch checkpoints go to ``out_dir/checkpoints``.

    ``stage``: the stage's config (epochs, lr, weight_decay, batch_size, micro_batch_size, warmup_epochs,
    max_grad_norm).  ``resume_from``: a checkpoint whose weights ``model`` already holds; the optimizer,
    scheduler, RNG and step are restored from it.  ``stop_after_steps``: return after that many steps of this
    stage (a simulated kill, for tests).  ``on_epoch(epoch, model)``: called on the main process at every epoch
    boundary: before the first step (epoch 0, or the epoch resumed from), after each completed epoch, and after a
    fractional last epoch (e.g. per-epoch evaluation, connected by the pipeline); it may switch the model to eval
    mode and use the RNGs, both are restored.  Returns True when the stage ran to its last step.
    """
    out_dir, pad_id = Path(out_dir), tokenizer.pad_token_id
    ckpt_dir = out_dir / "checkpoints"
    batch, micro = stage["batch_size"], stage["micro_batch_size"]
    total, warmup = plan_steps(len(forget_examples), stage["epochs"], batch, stage["warmup_epochs"])
    steps_per_epoch = len(forget_examples) / batch
    forget = ExampleStream(forget_examples, batch, seed)
    retain = ExampleStream(retain_examples, batch, seed + 1) if retain_term is not None else None

    # Memory options (issue 7, docs/memory-and-scale.md): optimizer choice, gradient checkpointing; LoRA
    # students train only their adapter, so only trainable parameters go to the optimizer.
    set_gradient_checkpointing(model, stage.get("gradient_checkpointing", False))
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], stage.get("optimizer", "adamw"),
                                lr=stage["lr"], weight_decay=stage["weight_decay"],
                                update=stage.get("bf16_update", "kahan"), seed=seed)
    # Multi-process (issue 7, sampling.py): every rank draws the step's global batch and keeps its slice.
    world, rank = accelerator.num_processes, accelerator.process_index
    if batch % (world * micro):
        raise ValueError(f"batch_size: {batch} must be divisible by processes x micro_batch_size = "
                         f"{world} x {micro}")
    # The scheduler counts global optimizer steps, so it stays outside accelerate.prepare (which would step it
    # once per process under DDP).
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
    start = 0
    if resume_from is not None:
        state = checkpoint.load_training_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        start = state["step"]
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    log = _Log(out_dir, start, tensorboard, enabled=accelerator.is_main_process)  # one writer per run

    def epoch_boundary(done: int) -> None:
        if on_epoch is not None and accelerator.is_main_process:
            rng = checkpoint.rng_state()  # the hook must not change what training draws next (exact resume)
            on_epoch(round(done / steps_per_epoch, 4), accelerator.unwrap_model(model))
            checkpoint.set_rng_state(rng)
            model.train()
        accelerator.wait_for_everyone()

    epoch_boundary(start)

    bar = progress(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True,
                   disable=not accelerator.is_main_process)
    for step in range(start, total):
        t0 = time.perf_counter()
        f_examples = forget.step(step)
        r_examples = retain.step(step) if retain is not None else []
        sums = accumulate_gradients(model, method, rank_slice(f_examples, rank, world), micro, pad_id, accelerator,
                                    teacher=teacher, retain_examples=rank_slice(r_examples, rank, world),
                                    retain_term=retain_term, retain_weight=retain_weight,
                                    num_items=(num_answer_tokens(f_examples), num_answer_tokens(r_examples)))
        if world > 1:  # log the whole step: sums over ranks; per-rank means become means over ranks
            keys = sorted(sums)
            totals = accelerator.reduce(torch.tensor([float(sums[k]) for k in keys], device=accelerator.device),
                                        "sum").tolist()
            sums = {k: v if k in ("forget_loss", "retain_loss", "tokens") else v / world
                    for k, v in zip(keys, totals)}
        grad_norm = None
        if stage["max_grad_norm"] is not None:
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), stage["max_grad_norm"]))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1

        tokens = sums.pop("tokens")
        record = {"step": done, "epoch": round(done / steps_per_epoch, 4), "lr": lr,
                  "loss": sums["forget_loss"] + retain_weight * sums.get("retain_loss", 0.0), **sums,
                  "tokens_per_s": tokens / (time.perf_counter() - t0), "grad_norm": grad_norm}
        if done % log_every == 0 or done == total:
            log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", p_forget=f"{record['forget_prob']:.3f}")

        epoch = done * batch // len(forget_examples)  # completed epochs (integer arithmetic: exact boundaries)
        if done < total and epoch > step * batch // len(forget_examples) and accelerator.is_main_process:
            checkpoint.save_checkpoint(ckpt_dir / f"epoch-{epoch}", accelerator.unwrap_model(model), tokenizer,
                                       step=done, optimizer=optimizer, scheduler=scheduler)
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
        self.file.write(json.dumps(record) + "\n")
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
