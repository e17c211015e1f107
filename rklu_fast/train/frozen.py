"""What the frozen models give the methods, behind one object: ``Frozen``.

A method declares what it needs (``Method.needs``) and the unlearn stage builds only that:

- ``teacher(batch)``: the unlearning teacher's inputs for a forget micro-batch (``TeacherRows``), from live models
  (``teacher.OnlineTeacher``) or a one-pass cache (``teacher_cache.CachedTeacher``);
- ``original_logits(batch)``: the frozen original's logits (the ``KL`` retain term);
- ``reference_logprob(batch)``: the frozen original's summed answer log-likelihood of each sequence (NPO, IdkDPO),
  computed once per sequence before training (``ReferenceLogProbs``) and looked up by the sequence's ``key``.

Methods never branch on where these come from.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from rklu_fast.data.collate import collate, to_device


class TeacherRows(NamedTuple):
    """The teacher's inputs for a batch, ready for ``reverse_kl_loss(logits[:, :-1], original, augmented, ...,
    teacher_rows=rows)``: ``rows="all"``: ``[B, T-1, V]`` (already shifted); ``"valid"``: one row per counted
    target, in row-major order.  ``augmented`` is None when ``original`` already holds the combined teacher."""
    original: torch.Tensor
    augmented: torch.Tensor | None
    rows: str


class Frozen:
    """The frozen quantities of one unlearn stage (any of them may be absent: asking for one raises)."""

    def __init__(self, teacher=None, original: torch.nn.Module | None = None, reference=None):
        self._teacher, self.original, self.reference = teacher, original, reference
        if original is not None:
            original.eval().requires_grad_(False)

    def models(self) -> list[torch.nn.Module]:
        """The frozen models training runs forwards through (the KL term's original, an online teacher's two;
        a cached teacher holds none), each once."""
        found = [self.original, getattr(self._teacher, "original", None), getattr(self._teacher, "augmented", None)]
        unique = {id(m): m for m in found if isinstance(m, torch.nn.Module)}
        return list(unique.values())

    def teacher(self, batch: dict) -> TeacherRows:
        if self._teacher is None:
            raise ValueError("teacher: this stage built no unlearning teacher (the method does not declare it)")
        return self._teacher.rows(batch)

    @torch.no_grad()
    def original_logits(self, batch: dict) -> torch.Tensor:
        if self.original is None:
            raise ValueError("original: this stage kept no frozen original model (only the KL retain term needs it)")
        return self.original(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def reference_logprob(self, batch: dict) -> torch.Tensor:
        if self.reference is None:
            raise ValueError("reference: this stage computed no reference log-likelihoods (NPO and IdkDPO need them)")
        return self.reference.lookup(batch)


class ReferenceLogProbs:
    """Summed answer log-likelihood under a frozen model of each sequence the run will train on, by ``key``.

    Built once before training over every sequence the method's views will produce (a pure function of seed,
    epoch and example), in fixed length-sorted batches: the values do not depend on the training batches, so a
    resumed run computes exactly the same numbers, and training needs no host sync to look them up.
    """

    def __init__(self, values: torch.Tensor, slots: dict):
        self.values, self.slots = values, slots

    @classmethod
    @torch.no_grad()
    def build(cls, model: torch.nn.Module, sequences: dict, *, pad_token_id: int, device, batch_size: int = 8,
              autocast=contextlib.nullcontext) -> "ReferenceLogProbs":
        """``sequences``: key → encoded example; ``model`` runs under ``autocast`` (as the training forward)."""
        from rklu_fast.train.methods.base import sequence_logprob

        keys = sorted(sequences, key=lambda k: (len(sequences[k]["input_ids"]), str(k)))
        values = torch.empty(len(keys), dtype=torch.float32, device=device)
        was_training = model.training
        model.eval()
        for start in range(0, len(keys), batch_size):
            chunk = keys[start:start + batch_size]
            batch = to_device(collate([sequences[k] for k in chunk], pad_token_id), device)
            with autocast():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            values[start:start + len(chunk)] = sequence_logprob(logits, batch["labels"])[0]
        model.train(was_training)
        return cls(values, {k: i for i, k in enumerate(keys)})

    def lookup(self, batch: dict) -> torch.Tensor:
        try:
            slots = [self.slots[k] for k in batch["key"]]
        except KeyError as e:
            raise ValueError(f"reference: no value for sequence {e.args[0]!r}; the reference log-likelihoods "
                             "were built for other sequences") from None
        index = torch.tensor(slots, dtype=torch.long).to(self.values.device, non_blocking=True)
        return self.values[index]
