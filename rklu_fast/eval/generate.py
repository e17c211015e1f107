"""Batched generation with left padding and the KV cache, shared by the TOFU, leak and copyright evaluations."""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def left_padding(tokenizer):
    """Pad on the left (so every row's last prompt token sits at the same position) with EOS when the tokenizer
    has no pad token, as TOFU does; the tokenizer's settings are restored afterwards."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


def token_budgets(prompt_lengths: list[int], batch_size: int, max_length: int | None,
                  max_new_tokens: int | None) -> list[int]:
    """New tokens each prompt may get. ``max_length`` is TOFU's rule: it bounds the *padded* prompt plus the
    continuation, so a prompt's budget is ``max_length`` minus the longest prompt of its batch of ``batch_size``
    (in the given order); ``max_new_tokens`` is the same budget for every prompt."""
    if max_new_tokens is not None:
        return [max_new_tokens] * len(prompt_lengths)
    budgets = []
    for start in range(0, len(prompt_lengths), batch_size):
        batch = prompt_lengths[start:start + batch_size]
        budgets += [max(0, max_length - max(batch))] * len(batch)
    return budgets


@torch.inference_mode()
def greedy_continuations(model, tokenizer, prompt_ids: list[list[int]], budgets: list[int], *,
                         chunk_size: int = 64) -> list[str]:
    """Greedy continuation of each tokenised prompt, cut at its own budget of new tokens (and at EOS), decoded
    with special tokens skipped.

    Runs ``chunk_size`` prompts per ``model.generate`` call, sorted by length, left-padded, with a static KV cache.
    A greedy row's first n tokens do not depend on how many follow or on its batch-mates, so one big chunk gives the
    same texts as many small batches with far fewer sequential decoding steps.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: must be a positive int, got {chunk_size!r}")
    if len(budgets) != len(prompt_ids):
        raise ValueError(f"budgets: {len(budgets)} budgets for {len(prompt_ids)} prompts")
    device = next(model.parameters()).device
    out = [""] * len(prompt_ids)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    with left_padding(tokenizer) as tok:
        for start in range(0, len(order), chunk_size):
            rows = order[start:start + chunk_size]
            n = max(budgets[i] for i in rows)
            if n <= 0:  # prompts already as long as max_length: empty continuations
                continue
            enc = tok.pad({"input_ids": [list(prompt_ids[i]) for i in rows]}, padding=True, return_tensors="pt")
            width = enc["input_ids"].shape[1]
            seqs = model.generate(input_ids=enc["input_ids"].to(device),
                                  attention_mask=enc["attention_mask"].to(device), max_new_tokens=n,
                                  do_sample=False, use_cache=True, cache_implementation="static",
                                  disable_compile=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                  temperature=None, top_p=None, top_k=None)[:, width:].tolist()
            texts = tok.batch_decode([seq[:budgets[i]] for seq, i in zip(seqs, rows)], skip_special_tokens=True)
            for i, text in zip(rows, texts):
                out[i] = text
    return out


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str] | list[list[int]], *, batch_size: int = 16,
             max_length: int | None = None, max_new_tokens: int | None = None, num_beams: int = 1,
             num_return_sequences: int = 1, add_special_tokens: bool = True,
             chunk_size: int | None = None) -> list[list[str]]:
    """Continuations (prompt cut off, special tokens skipped) of each prompt: ``num_return_sequences`` strings each.

    Greedy unless ``num_beams > 1`` (beam search; the returned beams are best first). ``prompts`` are strings or
    lists of token ids. ``max_length`` bounds the padded prompt plus the continuation of each batch of
    ``batch_size`` prompts (TOFU's rule); ``max_new_tokens`` bounds the continuation alone; give one of them.
    Greedy decoding runs ``chunk_size`` prompts (default ``batch_size``) at once with each row's own budget
    (:func:`token_budgets`, :func:`greedy_continuations`): the same texts as batches of ``batch_size``.
    Beam search runs the batches of ``batch_size`` as they are.
    """
    if (max_length is None) == (max_new_tokens is None):
        raise ValueError("max_length/max_new_tokens: give exactly one of them")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive int, got {batch_size!r}")
    if not prompts:
        raise ValueError("prompts: nothing to generate from")
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences: at most num_beams={num_beams}, got {num_return_sequences}")
    ids = [list(p) for p in prompts] if not isinstance(prompts[0], str) else \
        tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    if num_beams == 1:
        budgets = token_budgets([len(p) for p in ids], batch_size, max_length, max_new_tokens)
        return [[t] for t in greedy_continuations(model, tokenizer, ids, budgets,
                                                  chunk_size=chunk_size or batch_size)]
    device = next(model.parameters()).device
    lengths = {"max_length": max_length} if max_length is not None else {"max_new_tokens": max_new_tokens}
    out: list[list[str]] = []
    with left_padding(tokenizer) as tok:
        for start in range(0, len(ids), batch_size):
            enc = tok.pad({"input_ids": ids[start:start + batch_size]}, padding=True, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            seqs = model.generate(**enc, **lengths, do_sample=False, num_beams=num_beams,
                                  num_return_sequences=num_return_sequences, use_cache=True,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                  temperature=None, top_p=None, top_k=None)
            texts = tok.batch_decode(seqs[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out += [texts[i:i + num_return_sequences] for i in range(0, len(texts), num_return_sequences)]
    return out
