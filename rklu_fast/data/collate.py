"""Batching: pad encoded examples (``encode_qa`` / ``chunk_text`` output) to one tensor batch."""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def pad_rows(rows: list[list[int]], value: int) -> torch.Tensor:
    """Right-pad lists of ints with ``value`` into one [len(rows), longest] long tensor."""
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` with ``pad_token_id``, ``labels`` with -100 and ``attention_mask`` with 0."""
    if not examples:
        raise ValueError("examples: empty batch")
    if pad_token_id is None:
        raise ValueError("pad_token_id: the tokenizer has no pad token (set tokenizer.pad_token)")
    return {key: pad_rows([e[key] for e in examples], value)
            for key, value in (("input_ids", pad_token_id), ("labels", IGNORE_INDEX), ("attention_mask", 0))}


def count_answer_tokens(labels: torch.Tensor) -> int:
    """Valid next-token targets of a causal-LM batch: labels[:, 1:] that are not ignored."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
