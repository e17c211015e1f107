"""What the mini-TOFU experiment measures of a model, built from the evaluator's own pieces (``rklu_fast.eval``:
TOFU's tokenisation, losses, truth-ratio statistic, KS test, greedy generation, ROUGE-L and the leak probe).

Per epoch, forward passes only (``Scorer.losses``):
- forget split (``<forget>_perturbed``, TOFU's first 300 rows): the truth-ratio statistic ``s`` of every
  question, the mean answer probability, and TOFU's forget truth ratio ``mean(min(s, 1/s))``;
- forget quality: the KS-test p-value between the model's ``s`` and the oracle's on those 300 questions (the
  selection rule reads it); at chosen epochs also on all rows (``Scorer.rest``: more questions make the test
  stricter, a p-value falls as the sample grows for the same shift);
- retain split (the first ``retain_rows`` rows of ``retain_perturbed``): mean answer probability and TOFU's retain
  truth ratio ``mean(max(0, 1 − 1/s))``.
At chosen epochs (``Scorer.generations``): greedy ROUGE-L recall on the forget and retain rows, and the paper's
fill-in-the-blank top-5 leak rate on the first ``leak_rows`` forget questions (beam search: not for the teacher
model, whose decoder is greedy only).

Utility of a model trained from scratch (it knows no real authors or world facts, so TOFU's 9-value model utility
would be meaningless): the harmonic mean of the retain set's probability, ROUGE-L and truth ratio.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import hmean

from rklu_fast.data import load_tofu
from rklu_fast.eval.aggregate import forget_quality, truth_ratio_score, truth_ratio_stat
from rklu_fast.eval.generate import greedy_continuations, token_budgets
from rklu_fast.eval.leak import leak_probe
from rklu_fast.eval.rouge import rouge_scores
from rklu_fast.eval.tofu import DS_SIZE, MAX_LENGTH, TofuTask, prepare_task, task_losses, task_rows


def utility(retain_prob: float, retain_rouge: float, retain_truth_ratio: float) -> float:
    """Harmonic mean of the three retain values (0 as soon as one is 0)."""
    parts = [retain_prob, retain_rouge, retain_truth_ratio]
    return 0.0 if min(parts) <= 0 else float(hmean(parts))


class Scorer:
    """The forget and retain tasks tokenised once; scores any number of models."""

    def __init__(self, tokenizer, template, *, forget_split: str = "forget10", source=None, forget_rows: int = 400,
                 retain_rows: int = 100, leak_rows: int = 100, batch_size: int = 32,
                 max_new_tokens: int | None = None):
        self.tokenizer, self.template, self.batch_size = tokenizer, template, batch_size
        self.max_new_tokens = max_new_tokens
        forget_task = TofuTask("forget", f"{forget_split}_perturbed", "paraphrased_answer", False)
        every = prepare_task(tokenizer, template, forget_task, source=source, ds_size=forget_rows)
        self.fq_rows = min(DS_SIZE, len(every.gold))
        self.forget = task_rows(every, 0, self.fq_rows)                # every epoch
        self.forget_rest = task_rows(every, self.fq_rows, len(every.gold)) if len(every.gold) > self.fq_rows \
            else None                                                   # at chosen epochs: forget quality on all rows
        self.retain = prepare_task(tokenizer, template, TofuTask("retain", "retain_perturbed", "paraphrased_answer",
                                                                  False), source=source, ds_size=retain_rows)
        self.leak_rows = load_tofu(f"{forget_split}_perturbed", source)[:leak_rows] if leak_rows else []

    def losses(self, model) -> dict:
        """Forward-only values (see the module docstring); ``forget_stat`` is the per-question ``s``."""
        was_training = model.training
        model.eval()
        try:
            f = task_losses(model, self.tokenizer, self.forget, batch_size=self.batch_size)
            r = task_losses(model, self.tokenizer, self.retain, batch_size=self.batch_size)
        finally:
            model.train(was_training)
        s_f = truth_ratio_stat(f["avg_paraphrased_loss"], f["average_perturb_loss"])
        s_r = truth_ratio_stat(r["avg_paraphrased_loss"], r["average_perturb_loss"])
        return {"forget_stat": s_f.tolist(),
                "forget_prob": float(np.exp(-f["avg_gt_loss"]).mean()),
                "forget_truth_ratio": truth_ratio_score(s_f, forget=True),
                "retain_prob": float(np.exp(-r["avg_gt_loss"]).mean()),
                "retain_truth_ratio": truth_ratio_score(s_r, forget=False)}

    def rest(self, model) -> list[float]:
        """``s`` of the forget rows past TOFU's 300 (empty when there are none): with ``losses``' statistic,
        forget quality on all rows."""
        if self.forget_rest is None:
            return []
        was_training = model.training
        model.eval()
        try:
            f = task_losses(model, self.tokenizer, self.forget_rest, batch_size=self.batch_size)
        finally:
            model.train(was_training)
        return truth_ratio_stat(f["avg_paraphrased_loss"], f["average_perturb_loss"]).tolist()

    @staticmethod
    def forget_quality(forget_stat, oracle_stat) -> float:
        """KS p-value against the oracle's statistics over the rows given (300, or all with ``rest``)."""
        return forget_quality(forget_stat, oracle_stat)

    def generations(self, model, leak: bool = True) -> dict:
        """Greedy ROUGE-L recall on forget and retain rows (TOFU's max_length rule unless ``max_new_tokens``),
        and the leak probe's fill-in-the-blank top-5 rate on the first ``leak_rows`` forget questions."""
        was_training = model.training
        model.eval()
        try:
            out = {}
            for name, task in (("forget", self.forget), ("retain", self.retain)):
                budgets = token_budgets([len(ids) for ids in task.prompt_ids], self.batch_size, MAX_LENGTH,
                                        self.max_new_tokens)
                texts = greedy_continuations(model, self.tokenizer, task.prompt_ids, budgets)
                out[f"{name}_rougeL"] = float(np.mean([rouge_scores(g, t)["rougeL_recall"]
                                                       for g, t in zip(task.gold, texts)]))
            if leak and self.leak_rows and getattr(model, "supports_beam_search", True):
                probe = leak_probe(model, self.tokenizer, self.template, self.leak_rows)
                out["leak_rate"], out["leak_probed"] = probe["leaked_fraction"], probe["probed"]
                out["direct_leak_rate"] = probe["direct_leaked_fraction"]
        finally:
            model.train(was_training)
        return out
