"""ROUGE exactly as TOFU scores generations: ``rouge-score`` with the Porter stemmer, ``score(gold, generated)``.

TOFU passes the decoded generation (prompt tokens cut off, special tokens skipped) unchanged; rouge-score's own
tokenizer lower-cases and drops punctuation, so nothing else is done to either text.
"""
from __future__ import annotations

from functools import lru_cache

from rouge_score import rouge_scorer, tokenize, tokenizers
from nltk.stem.porter import PorterStemmer  # what rouge-score itself stems with


class _CachedStemmingTokenizer(tokenizers.Tokenizer):
    """rouge-score's ``DefaultTokenizer(use_stemmer=True)`` with each word's stem computed once: the pure-Python
    Porter stemmer is most of ROUGE's time, and answers repeat their words (and, across epochs, whole texts)."""

    def __init__(self):
        self.stem = lru_cache(maxsize=1 << 16)(PorterStemmer().stem)

    def tokenize(self, text: str) -> list[str]:
        return tokenize.tokenize(text, self)


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], tokenizer=_CachedStemmingTokenizer())


def rouge_scores(gold: str, generated: str) -> dict[str, float]:
    """``rouge1_recall``, ``rougeL_recall`` (TOFU's logged values) and ``rougeL_f1`` of one generation."""
    if not isinstance(gold, str) or not isinstance(generated, str):
        raise TypeError(f"gold/generated: expected strings, got {type(gold).__name__}/{type(generated).__name__}")
    if not gold.strip():
        raise ValueError("gold: empty reference text; ROUGE recall is undefined")
    s = _scorer().score(gold, generated)
    return {"rouge1_recall": s["rouge1"].recall, "rougeL_recall": s["rougeL"].recall,
            "rougeL_f1": s["rougeL"].fmeasure}
