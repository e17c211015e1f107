"""ROUGE exactly as TOFU scores generations: ``rouge-score`` with the Porter stemmer, ``score(gold, generated)``.

TOFU passes the decoded generation (prompt tokens cut off, special tokens skipped) unchanged; rouge-score's own
tokenizer lower-cases and drops punctuation, so nothing else is done to either text.
"""
from __future__ import annotations

from functools import lru_cache

from rouge_score import rouge_scorer


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge_scores(gold: str, generated: str) -> dict[str, float]:
    """``rouge1_recall``, ``rougeL_recall`` (TOFU's logged values) and ``rougeL_f1`` of one generation."""
    if not isinstance(gold, str) or not isinstance(generated, str):
        raise TypeError(f"gold/generated: expected strings, got {type(gold).__name__}/{type(generated).__name__}")
    if not gold.strip():
        raise ValueError("gold: empty reference text; ROUGE recall is undefined")
    s = _scorer().score(gold, generated)
    return {"rouge1_recall": s["rouge1"].recall, "rougeL_recall": s["rougeL"].recall,
            "rougeL_f1": s["rougeL"].fmeasure}
