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


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str] | list[list[int]], *, batch_size: int = 16,
             max_length: int | None = None, max_new_tokens: int | None = None, num_beams: int = 1,
             num_return_sequences: int = 1, add_special_tokens: bool = True) -> list[list[str]]:
    """Continuations (prompt cut off, special tokens skipped) of each prompt: ``num_return_sequences`` strings each.

    Greedy unless ``num_beams > 1`` (beam search; the returned beams are best first). ``prompts`` are strings or
    lists of token ids. ``max_length`` bounds the padded prompt plus the continuation (TOFU's rule);
    ``max_new_tokens`` bounds the continuation alone; give one of them.
    """
    if (max_length is None) == (max_new_tokens is None):
        raise ValueError("max_length/max_new_tokens: give exactly one of them")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive int, got {batch_size!r}")
    if not prompts:
        raise ValueError("prompts: nothing to generate from")
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences: at most num_beams={num_beams}, got {num_return_sequences}")
    device = next(model.parameters()).device
    out: list[list[str]] = []
    with left_padding(tokenizer) as tok:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            if isinstance(chunk[0], str):
                enc = tok(chunk, add_special_tokens=add_special_tokens, padding=True, return_tensors="pt")
            else:
                enc = tok.pad({"input_ids": [list(c) for c in chunk]}, padding=True, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            lengths = {"max_length": max_length} if max_length is not None else {"max_new_tokens": max_new_tokens}
            seqs = model.generate(**enc, **lengths, do_sample=False, num_beams=num_beams,
                                  num_return_sequences=num_return_sequences, use_cache=True,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                  temperature=None, top_p=None, top_k=None)
            texts = tok.batch_decode(seqs[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out += [texts[i:i + num_return_sequences] for i in range(0, len(texts), num_return_sequences)]
    return out
