"""Plain text → fixed-length token chunks (the paper's Harry Potter setting: 512-token chunks, every token in the
loss, no question part)."""
from __future__ import annotations


def chunk_text(tokenizer, text: str, chunk_length: int = 512) -> list[dict]:
    """Cut ``text`` into examples of ``chunk_length`` tokens (the last one may be shorter, at least 2 tokens).

    The text is tokenised once without special tokens; each chunk then starts with BOS when the tokenizer has one
    (counted in ``chunk_length``; its label is ignored since nothing predicts it).
    """
    if not isinstance(chunk_length, int) or chunk_length < 2:
        raise ValueError(f"chunk_length: must be an int ≥ 2, got {chunk_length!r}")
    if not text.strip():
        raise ValueError("text: is empty")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = chunk_length - len(bos)
    chunks = []
    for start in range(0, len(ids), body):
        piece = ids[start:start + body]
        if len(piece) + len(bos) < 2:
            break
        input_ids = bos + piece
        labels = [-100] * len(bos) + piece
        chunks.append({"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)})
    return chunks
