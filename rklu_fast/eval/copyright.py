"""Copyright-style evaluation (the paper's Harry Potter setting, on any text).

- **Forgetting**: the forget text is cut into 512-token chunks (``rklu_fast.data.chunks.chunk_text``, as for
  training); the model continues the first ``prefix_tokens`` = 200 tokens of each chunk greedily for
  ``new_tokens`` = 200 tokens (stopping early at EOS), and the continuation is scored against the chunk's true next
  tokens (up to 200, decoded): BLEU = ``sacrebleu.sentence_bleu`` (default 13a tokenisation, exponential
  smoothing) averaged over chunks, plus ``sacrebleu.corpus_bleu``; ROUGE-L = rouge-score's ``rougeL`` (sentence-level
  LCS, Porter stemmer), F1 as the headline value, recall alongside. Chunks shorter than prefix + 1 tokens are skipped.
- **Utility**: perplexity on WikiText-2 test (``wiki.test.raw``): the first ``n_segments`` = 200 lines that are not
  headings (`` = Title = ``) and have at least ``min_words`` = 50 words, in file order, each tokenised with BOS and
  cut to ``max_tokens`` = 512 tokens; PPL = exp(total NLL / total scored tokens). No sliding window.
- The paper's six-task average accuracy (PIQA, HellaSwag, ARC-E/C, COPA, Winograd, MathQA) needs those datasets,
  which are not available offline here; it is not computed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import sacrebleu

from rklu_fast.data.chunks import chunk_text
from rklu_fast.eval.generate import generate
from rklu_fast.eval.nll import sequence_nll
from rklu_fast.eval.rouge import rouge_scores


def continuation_scores(model, tokenizer, text: str, *, chunk_length: int = 512, prefix_tokens: int = 200,
                        new_tokens: int = 200, max_chunks: int | None = None, batch_size: int = 8) -> dict:
    """BLEU and ROUGE-L of greedy continuations of each chunk's prefix against its true continuation."""
    if prefix_tokens < 1 or new_tokens < 1:
        raise ValueError(f"prefix_tokens/new_tokens: must be ≥ 1, got {prefix_tokens}/{new_tokens}")
    bos = 1 if tokenizer.bos_token_id is not None else 0
    if chunk_length < bos + prefix_tokens + 1:
        raise ValueError(f"chunk_length: {chunk_length} leaves no continuation after a {prefix_tokens}-token prefix")
    chunks = [c["input_ids"] for c in chunk_text(tokenizer, text, chunk_length)]
    chunks = [c for c in chunks if len(c) > bos + prefix_tokens][:max_chunks]
    if not chunks:
        raise ValueError(f"text: no chunk is longer than the {prefix_tokens}-token prefix")
    prompts = [c[:bos + prefix_tokens] for c in chunks]
    references = [tokenizer.decode(c[bos + prefix_tokens:bos + prefix_tokens + new_tokens], skip_special_tokens=True)
                  for c in chunks]
    outputs = [g[0] for g in generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=new_tokens)]
    bleu = [sacrebleu.sentence_bleu(o, [r]).score for o, r in zip(outputs, references)]
    rouge = [rouge_scores(r, o) for o, r in zip(outputs, references)]
    return {"bleu": float(np.mean(bleu)), "corpus_bleu": sacrebleu.corpus_bleu(outputs, [references]).score,
            "rougeL_f1": float(np.mean([r["rougeL_f1"] for r in rouge])),
            "rougeL_recall": float(np.mean([r["rougeL_recall"] for r in rouge])),
            "chunks": len(chunks), "prefix_tokens": prefix_tokens, "new_tokens": new_tokens,
            "examples": [{"reference": r, "generation": o} for r, o in zip(references[:3], outputs[:3])]}


def wikitext_segments(path: str | Path, n_segments: int = 200, min_words: int = 50) -> list[str]:
    """The selection documented above: first ``n_segments`` non-heading lines with ≥ ``min_words`` words."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no WikiText file at {str(path)!r}")
    segments = []
    with path.open(encoding="utf-8") as f:  # text mode turns the file's CRLF into \n
        for line in f:
            line = line.strip()
            if line.startswith("=") and line.endswith("="):
                continue
            if len(line.split()) >= min_words:
                segments.append(line)
                if len(segments) == n_segments:
                    break
    if len(segments) < n_segments:
        raise ValueError(f"path: only {len(segments)} segments of ≥ {min_words} words in {path}, "
                         f"{n_segments} requested")
    return segments


def perplexity(model, tokenizer, segments: list[str], *, max_tokens: int = 512, batch_size: int = 8) -> float:
    """exp(total NLL / total scored tokens) of the segments, each with BOS and cut to ``max_tokens``."""
    if not segments:
        raise ValueError("segments: empty")
    examples = []
    for s in segments:
        ids = tokenizer(s, add_special_tokens=True, max_length=max_tokens, truncation=True)["input_ids"]
        examples.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * len(ids)})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sums, counts = sequence_nll(model, examples, pad_id, batch_size=batch_size)
    return float(np.exp(sums.sum() / counts.sum()))
