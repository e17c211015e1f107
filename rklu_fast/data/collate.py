"""Batching: pad encoded examples (``encode_qa`` / ``chunk_text`` output) to one tensor batch, and the one rule for
which label positions are training targets.

Causal shift: position t predicts token t+1, so the targets of a batch are ``labels[:, 1:]`` and the logits that
score them are ``logits[:, :-1]``; a target counts unless it is ``IGNORE_INDEX`` (question tokens, padding).
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100
TENSOR_KEYS = ("input_ids", "labels", "attention_mask")


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., T-1]``: which next-token targets of ``labels`` ``[..., T]`` count (the causal shift applied)."""
    return labels[..., 1:] != IGNORE_INDEX


def num_targets(example: dict) -> int:
    """Counted next-token targets of one encoded (unpadded) example: ``target_mask`` of its labels, summed."""
    return sum(1 for t in example["labels"][1:] if t != IGNORE_INDEX)


def count_targets(examples: list[dict]) -> int:
    """Counted targets of encoded examples: the normaliser of a step when given the whole step's examples (equals
    ``target_mask(batch["labels"]).sum()`` over their padded batches, since padding is ignored)."""
    return sum(num_targets(e) for e in examples)


def pad_rows(rows: list[list[int]], value: int) -> torch.Tensor:
    """Right-pad lists of ints with ``value`` into one [len(rows), longest] long tensor."""
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def collate(examples: list[dict], pad_token_id: int) -> dict:
    """Right-pad ``input_ids`` with ``pad_token_id``, ``labels`` with -100 and ``attention_mask`` with 0.

    Examples that carry ``index`` (their position in the encoded set) keep it as a host ``[B]`` long tensor, and a
    ``key`` (what a cached per-sequence value is filed under) as a list: caches are indexed directly, without a
    device-to-host copy.
    """
    if not examples:
        raise ValueError("examples: empty batch")
    if pad_token_id is None:
        raise ValueError("pad_token_id: the tokenizer has no pad token (set tokenizer.pad_token)")
    batch: dict = {key: pad_rows([e[key] for e in examples], value)
                   for key, value in (("input_ids", pad_token_id), ("labels", IGNORE_INDEX), ("attention_mask", 0))}
    if all("index" in e for e in examples):
        batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
    if all("key" in e for e in examples):
        batch["key"] = [e["key"] for e in examples]
    return batch


def to_device(batch: dict, device) -> dict:
    """The batch with its model inputs on ``device``; ``index`` and ``key`` stay on the host."""
    return {k: v.to(device, non_blocking=True) if k in TENSOR_KEYS else v for k, v in batch.items()}
