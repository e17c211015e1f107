"""Per-example summed negative log-likelihood of the labelled tokens, batched (TOFU's ``get_batch_loss``).

Examples that start with the same unscored tokens (a question scored with its answer, paraphrased answer and k
perturbed answers) share that prefix: it runs through the model once, and its KV cache is copied to every answer of
the batch, which then runs from the prefix's end. TOFU's forget split scores 7 answers per question, so this feeds
the model 0.70× the (padded) tokens of a TOFU evaluation (``benchmarks/bench_eval_nll.py``). The values are those
of whole-sequence forwards up to float rounding (the same attention over the same keys, summed in another order).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from rklu_fast.hf_compat import cache_kwarg, output_cache
from rklu_fast.data.collate import IGNORE_INDEX, collate, pad_rows, to_device


def _prefix_length(labels) -> int:
    """Tokens before the last one the first scored label needs: its logits come from the position before it, so the
    shared prefix stops one token earlier still, and the suffix pass makes every scored logit."""
    for t, label in enumerate(labels):
        if label != IGNORE_INDEX:
            return max(t - 1, 0)
    return 0


def _scored_nll(logits: torch.Tensor, labels: torch.Tensor, device) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL and count per row; ``labels`` ([B, T]) are aligned with ``logits`` ([B, T, V]) shifted by one."""
    labels = labels[:, 1:]
    scored = labels != IGNORE_INDEX
    row = scored.nonzero()[:, 0]
    nll = F.cross_entropy(logits[:, :-1][scored].float(), labels[scored], reduction="none")
    sums = torch.zeros(len(labels), dtype=torch.float64, device=device).index_add_(0, row, nll.double())
    return sums.cpu().numpy(), scored.sum(-1).cpu().numpy()


def _whole_batch(model, batch_examples: list[dict], pad_token_id: int, device):
    batch = to_device(collate(batch_examples, pad_token_id), device)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return _scored_nll(logits, batch["labels"], device)


def _shared_batch(model, prefixes: list[list[int]], batch_examples: list[dict], owner: list[int],
                  pad_token_id: int, device):
    """One batch whose example ``i`` is ``prefixes[owner[i]]`` followed by its own suffix: the prefixes run once
    (right-padded), their cache is copied to each suffix's row, and the suffixes run at their true positions with
    the prefix padding masked out."""
    n_prefix = torch.tensor([len(p) for p in prefixes], device=device)
    prefix_mask = pad_rows([[1] * len(p) for p in prefixes], 0).to(device)
    try:
        out = model(input_ids=pad_rows(prefixes, pad_token_id).to(device), attention_mask=prefix_mask, use_cache=True,
                    logits_to_keep=1)
    except TypeError:  # a model without logits_to_keep: no sharing (a real error recurs in the whole pass)
        return None
    cache = output_cache(out)
    if not hasattr(cache, "batch_select_indices"):  # a cache that cannot be copied across rows: no sharing
        return None
    owner_t = torch.tensor(owner, device=device)
    cache.batch_select_indices(owner_t)
    p = [len(prefixes[g]) for g in owner]
    suffix_ids = pad_rows([e["input_ids"][k:] for e, k in zip(batch_examples, p)], pad_token_id).to(device)
    labels = pad_rows([e["labels"][k:] for e, k in zip(batch_examples, p)], IGNORE_INDEX).to(device)
    suffix_mask = pad_rows([[1] * (len(e["input_ids"]) - k) for e, k in zip(batch_examples, p)], 0).to(device)
    positions = n_prefix[owner_t, None] + torch.arange(suffix_ids.shape[1], device=device)
    logits = model(input_ids=suffix_ids, attention_mask=torch.cat([prefix_mask[owner_t], suffix_mask], 1),
                   position_ids=positions, use_cache=True, **{cache_kwarg(model): cache}).logits
    return _scored_nll(logits, labels, device)


def _prefix_groups(examples: list[dict]) -> dict[tuple, list[int]]:
    """Example indices by unscored prefix (identical token ids)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        groups[tuple(e["input_ids"][:_prefix_length(e["labels"])])].append(i)
    return groups


def _shared_batches(examples: list[dict], groups: dict[tuple, list[int]], batch_size: int
                    ) -> list[tuple[list[list[int]], list[int], list[int]]]:
    """(prefixes, example indices, owning prefix of each) per batch: the ``groups`` of :func:`_prefix_groups` in
    order of length, packed into batches of at most ``batch_size`` examples."""
    pieces = []  # (prefix, members) with at most batch_size members each
    for prefix, members in groups.items():
        members = sorted(members, key=lambda i: len(examples[i]["input_ids"]))
        pieces += [(list(prefix), members[s:s + batch_size]) for s in range(0, len(members), batch_size)]
    pieces.sort(key=lambda pm: (len(examples[pm[1][-1]]["input_ids"]) - len(pm[0]), len(pm[0])))
    batches, current = [], ([], [], [])
    for prefix, members in pieces:
        if len(current[1]) + len(members) > batch_size:
            batches.append(current)
            current = ([], [], [])
        current[0].append(prefix)
        current[1].extend(members)
        current[2].extend([len(current[0]) - 1] * len(members))
    if current[1]:
        batches.append(current)
    return batches


@torch.inference_mode()
def sequence_nll(model, examples: list[dict], pad_token_id: int, *, batch_size: int = 16,
                 share_prefix: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL (nats, float32 logits) and number of scored tokens of each example (``encode_qa`` /
    ``chunk_text`` dicts: ``input_ids``, ``labels`` with -100 where unscored).

    Examples are batched in order of length (less padding); right padding leaves each example's values unchanged.
    Only the scored positions' logits go through the softmax. With ``share_prefix`` (and a model that takes
    ``logits_to_keep`` and ``position_ids`` and whose cache can be copied across rows, as transformers'
    ``DynamicCache``; otherwise whole sequences), examples with a common unscored prefix run it once.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive int, got {batch_size!r}")
    device = next(model.parameters()).device
    sums = np.zeros(len(examples))
    counts = np.zeros(len(examples), dtype=np.int64)
    groups = _prefix_groups(examples) if share_prefix else {}
    # sharing pays only when two examples have the same non-empty prefix (else it just adds a pass)
    if any(prefix and len(members) > 1 for prefix, members in groups.items()):
        for prefixes, idx, owner in _shared_batches(examples, groups, batch_size):
            batch = [examples[i] for i in idx]
            # (an example scored from its second token on has no prefix to share)
            values = _shared_batch(model, prefixes, batch, owner, pad_token_id, device) if all(prefixes) else None
            sums[idx], counts[idx] = values if values is not None else \
                _whole_batch(model, batch, pad_token_id, device)
        return sums, counts
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        sums[idx], counts[idx] = _whole_batch(model, [examples[i] for i in idx], pad_token_id, device)
    return sums, counts

