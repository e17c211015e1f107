"""{forget, retain} data for a Hugging Face ``Trainer``, in the toolkit's sampling order.

A ``Trainer`` draws examples with its own sampler (a ``RandomSampler``, a ``DistributedSampler`` under DDP) and
normalises each micro-batch on its own.  Here its data loader replays the toolkit's loop (``rklu_fast.train.loop``)
instead: optimizer step ``s`` trains on the forget examples ``ExampleStream(forget, B, seed).step(s)`` and the
retain examples ``ExampleStream(retain, B, seed + 1).step(s)``, with ``B = per-device batch × accumulation steps ×
processes``; each process keeps its contiguous slice (``sampling.rank_slice``), sorts it by length
(``loop.length_grouped``: micro-batches of similar length pad little) and cuts it into micro-batches of the
per-device batch size, forget chunk ``i`` paired with retain chunk ``i``.  So every optimizer step sees the examples
``rklu run`` gives it for the same seed and batch size, whatever the split into processes and accumulation steps.
Every micro-batch carries the whole step's normalisers (``loop.step_counts``), which every process computes from
the whole step's examples, without communication.

Trainer epochs: one Trainer epoch is ``⌈|forget| / B⌉`` optimizer steps (the Trainer needs a whole number); the
data position is a function of the optimizer step alone, so this only labels epochs (``state.epoch``, epoch-wise
saving), it does not change what is trained on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from rklu_fast.data.collate import collate
from rklu_fast.data.templates import Template, encode_qa, get_template
from rklu_fast.data.tofu import load_tofu
from rklu_fast.train.loop import ExampleStream, length_grouped, step_counts
from rklu_fast.train.methods.base import StepCounts
from rklu_fast.train.sampling import rank_slice


def _indexed(examples, name: str) -> list[dict]:
    """Encoded examples, each with its ``index`` (position in the set: caches and refusal draws key on it)."""
    examples = list(examples)
    if not examples:
        raise ValueError(f"{name}: empty set of examples")
    for i, e in enumerate(examples):
        missing = [k for k in ("input_ids", "labels", "attention_mask") if k not in e]
        if missing:
            raise ValueError(f"{name}: example {i} lacks {missing}; encode examples with "
                             "rklu_fast.data.encode_qa (or ForgetRetainDataset.from_records)")
        if e.get("index", i) != i:
            raise ValueError(f"{name}: example {i} carries index {e['index']}; indices must be positions 0..n-1")
    return [e if "index" in e else dict(e, index=i) for i, e in enumerate(examples)]


class ForgetRetainDataset(Dataset):
    """Encoded forget examples and (optionally) retain examples, in the toolkit's format (``encode_qa`` output:
    ``input_ids``, ``labels`` with the question masked, ``attention_mask``, ``index``).

    ``encode(question, answer)`` and ``questions`` (the forget questions by index) serve the refusal methods (IDK,
    IdkDPO); ``template`` fingerprints a teacher cache.  ``from_records``/``from_tofu`` set all three.  Indexing
    gives ``{"forget": example i, "retain": example i mod |retain|}`` (for inspection); training order comes from
    ``StepSampler``, not from indexing.
    """

    def __init__(self, forget, retain=None, *, encode=None, questions: list[str] | None = None,
                 template: Template | str | None = None):
        self.forget = _indexed(forget, "forget")
        self.retain = _indexed(retain, "retain") if retain is not None else None
        self.encode, self.questions = encode, questions
        self.template = get_template(template) if isinstance(template, str) else template
        if questions is not None and len(questions) != len(self.forget):
            raise ValueError(f"questions: {len(questions)} given for {len(self.forget)} forget examples")

    @classmethod
    def from_records(cls, tokenizer, template: Template | str, forget: list[dict], retain: list[dict] | None = None,
                     max_length: int = 500) -> "ForgetRetainDataset":
        """Encode ``{"question", "answer"}`` records with a toolkit template (``llama2``, ``phi``, ``plain``)."""
        template = get_template(template) if isinstance(template, str) else template

        def encode(question: str, answer: str) -> dict:
            return encode_qa(tokenizer, template, question, answer, max_length)

        def encoded(records):
            return [dict(encode(r["question"], r["answer"]), index=i) for i, r in enumerate(records)]

        return cls(encoded(forget), encoded(retain) if retain is not None else None, encode=encode,
                   questions=[r["question"] for r in forget], template=template)

    @classmethod
    def from_tofu(cls, tokenizer, template: Template | str, forget: str = "forget10", retain: str | None = "retain90",
                  source=None, max_length: int = 500) -> "ForgetRetainDataset":
        """TOFU splits (``rklu_fast.data.load_tofu``: a local folder, a JSON file or ``locuslab/TOFU``)."""
        return cls.from_records(tokenizer, template, load_tofu(forget, source),
                                load_tofu(retain, source) if retain is not None else None, max_length)

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, i: int) -> dict:
        pair = {"forget": self.forget[i]}
        if self.retain is not None:
            pair["retain"] = self.retain[i % len(self.retain)]
        return pair


@dataclass
class MicroBatch:
    """One micro-batch of unlearning inputs, kept on the host (a plain object: the Trainer's device move passes it
    by; the trainer moves the tensors itself and keeps ``index`` on the host, as the toolkit's loop does)."""
    step: int                       # the optimizer step it belongs to
    micro: int                      # its position among this process's micro-batches of that step
    counts: StepCounts              # the whole step's normalisers (all micro-batches, all processes)
    forget: dict[str, dict]         # view name -> padded batch (``collate``)
    retain: dict | None             # padded retain batch, or None without a retain term


class StepMicroBatches(Dataset):
    """Key ``(step, micro)`` → this process's ``micro``-th micro-batch of optimizer step ``step``, as ``{"step",
    "micro", "counts", "pairs"}`` with ``pairs`` a list of ``{"forget": {view: example}, "retain": example}``.

    ``method.views(example, epoch)`` gives the sequences a forget example trains on (IDK's refusal, ...), exactly
    as in the toolkit's loop; ``retain=False`` draws no retain examples (no retain term).
    """

    def __init__(self, data: ForgetRetainDataset, method, *, batch_size: int, micro_batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, retain: bool = True):
        if batch_size % (world_size * micro_batch_size):
            raise ValueError(f"batch_size: {batch_size} must be divisible by processes x micro_batch_size = "
                             f"{world_size} x {micro_batch_size}")
        if retain and data.retain is None:
            raise ValueError("train_dataset: the retain term needs retain examples; build the ForgetRetainDataset "
                             "with retain=... (or pass retain_term=None)")
        self.data, self.method, self.micro_batch_size = data, method, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.micro_per_step = batch_size // (world_size * micro_batch_size)
        self.forget = ExampleStream(data.forget, batch_size, seed)
        self.retain = ExampleStream(data.retain, batch_size, seed + 1) if retain else None
        self._step: tuple[int, list, list, StepCounts] | None = None

    def __len__(self) -> int:  # what the Trainer reports as "Num examples": the forget set
        return len(self.data)

    def _whole_step(self, step: int) -> tuple[list, list, StepCounts]:
        if self._step is None or self._step[0] != step:  # the step's micro-batches are read in a row: keep one
            views = [self.method.views(example, epoch) for epoch, example in self.forget.step(step)]
            retain = [example for _, example in self.retain.step(step)] if self.retain is not None else []
            counts = step_counts(views, retain, self.micro_batch_size, self.world_size)
            self._step = (step, length_grouped(rank_slice(views, self.rank, self.world_size)),
                          length_grouped(rank_slice(retain, self.rank, self.world_size)) if retain else [], counts)
        return self._step[1:]

    def __getitem__(self, key: tuple[int, int]) -> dict:
        step, micro = key
        if not 0 <= micro < self.micro_per_step:
            raise IndexError(f"micro: {micro} outside [0, {self.micro_per_step})")
        views, retain, counts = self._whole_step(step)
        lo, hi = micro * self.micro_batch_size, (micro + 1) * self.micro_batch_size
        pairs = [{"forget": v, **({"retain": r} if retain else {})}
                 for v, r in zip(views[lo:hi], retain[lo:hi] if retain else [None] * (hi - lo))]
        return {"step": step, "micro": micro, "counts": counts, "pairs": pairs}


class StepSampler:
    """Batch sampler of ``StepMicroBatches``: in Trainer epoch ``e`` (``set_epoch``), the keys ``[(step, micro)]``
    of optimizer steps ``[e·L, (e+1)·L)``, each step's micro-batches in order."""

    def __init__(self, steps_per_epoch: int, micro_per_step: int):
        if steps_per_epoch < 1 or micro_per_step < 1:
            raise ValueError(f"steps_per_epoch and micro_per_step must be ≥ 1, got {steps_per_epoch}, "
                             f"{micro_per_step}")
        self.steps_per_epoch, self.micro_per_step, self.epoch = steps_per_epoch, micro_per_step, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        first = self.epoch * self.steps_per_epoch
        for step in range(first, first + self.steps_per_epoch):
            for micro in range(self.micro_per_step):
                yield [(step, micro)]

    def __len__(self) -> int:
        return self.steps_per_epoch * self.micro_per_step


class ForgetRetainCollator:
    """Pads the pairs of one micro-batch into Trainer inputs.

    Top level, for the Trainer: the first forget view's ``input_ids``, ``attention_mask``, ``labels`` and
    ``shift_labels = labels[:, 1:]`` — the Trainer counts ``num_items_in_batch`` on ``shift_labels`` when present
    (transformers 5.17 and 5.24), i.e. exactly the toolkit's counted targets (``target_mask``), for any model.
    ``unlearning``: the ``MicroBatch`` the loss reads.
    """

    def __init__(self, pad_token_id: int):
        if pad_token_id is None:
            raise ValueError("pad_token_id: the tokenizer has no pad token (set tokenizer.pad_token)")
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict:
        if len(items) != 1:
            raise ValueError(f"items: one micro-batch per call (StepSampler yields one key), got {len(items)}")
        item, pad = items[0], self.pad_token_id
        pairs = item["pairs"]
        forget = {name: collate([p["forget"][name] for p in pairs], pad) for name in pairs[0]["forget"]}
        retain = collate([p["retain"] for p in pairs], pad) if "retain" in pairs[0] else None
        first = next(iter(forget.values()))
        return {"input_ids": first["input_ids"], "attention_mask": first["attention_mask"],
                "labels": first["labels"], "shift_labels": first["labels"][:, 1:],
                "unlearning": MicroBatch(item["step"], item["micro"], item["counts"], forget, retain)}


class StepLoader(DataLoader):
    """The Trainer's training data loader: ``StepMicroBatches`` read in ``StepSampler`` order.  ``set_epoch`` (the
    Trainer calls it before every epoch) selects the epoch's optimizer steps."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


def step_loader(data: ForgetRetainDataset, method, *, micro_batch_size: int, accumulation_steps: int, seed: int,
                pad_token_id: int, rank: int = 0, world_size: int = 1, retain: bool = True,
                num_workers: int = 0, pin_memory: bool = False) -> StepLoader:
    """The data loader of one process: optimizer steps of ``B = micro_batch_size × accumulation_steps ×
    world_size`` examples, Trainer epochs of ``⌈|forget| / B⌉`` steps."""
    batch_size = micro_batch_size * accumulation_steps * world_size
    steps = StepMicroBatches(data, method, batch_size=batch_size, micro_batch_size=micro_batch_size, seed=seed,
                             rank=rank, world_size=world_size, retain=retain)
    sampler = StepSampler(math.ceil(len(data) / batch_size), steps.micro_per_step)
    return StepLoader(steps, batch_sampler=sampler, collate_fn=ForgetRetainCollator(pad_token_id),
                      num_workers=num_workers, pin_memory=pin_memory and torch.cuda.is_available())
