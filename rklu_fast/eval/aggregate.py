"""Model utility and forget quality from per-sample evaluation logs (TOFU's definitions, ``aggregate_eval_stat.py``).

Two log formats are read into the same per-split arrays (:class:`SplitScores`):

- TOFU's ``eval_log_aggregated.json`` (what :mod:`rklu_fast.eval.tofu` writes): four sections of per-sample losses,
  the truth-ratio statistic is recomputed from ``avg_paraphrased_loss`` and ``average_perturb_loss``;
- open-unlearning's ``TOFU_EVAL.json``: per-metric ``value_by_index`` entries; its truth ratio is stored inverted
  (``score = P(perturbed) / P(paraphrased) = 1/s``), so ``s = 1 / score``.

Definitions, per sample: ``s = exp(mean_j loss(perturbed_j) − loss(paraphrased))`` (losses are mean token NLLs);
forget truth ratio ``mean(min(s, 1/s))``, retain / real authors / world facts ``mean(max(0, 1 − 1/s))``; probability
``exp(−loss(answer))``, normalised over the answer and its perturbations for real authors / world facts.
Model utility = harmonic mean of the nine {probability, ROUGE-L recall, truth ratio} × {retain, real authors, world
facts}; forget quality = KS-test p-value between the forget-split ``s`` of the model and of the retain model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from scipy.stats import hmean, ks_2samp

from rklu_fast.data.tofu import json_type, read_json_file

# Split name → TOFU's log section name.
SECTIONS = {"retain": "eval_log.json", "real_authors": "eval_real_author_wo_options.json",
            "world_facts": "eval_real_world_wo_options.json", "forget": "eval_log_forget.json"}
UTILITY_SPLITS = ("retain", "real_authors", "world_facts")
# open-unlearning metric-name prefix of each split (TOFU_EVAL.json).
_OU_PREFIX = {"retain": "retain", "real_authors": "ra", "world_facts": "wf", "forget": "forget"}


@dataclass
class SplitScores:
    """Per-sample values of one split, whichever log they came from (``None`` where a log lacks a metric)."""
    truth_stat: np.ndarray | None   # s = exp(mean_j loss(perturbed_j) - loss(paraphrased))
    prob: np.ndarray | None         # P(answer), normalised over the options for real authors / world facts
    rouge: np.ndarray | None        # ROUGE-L recall of the greedy generation
    prompts: list[str] | None       # the rendered prompts, to refuse comparing different questions

    def __len__(self) -> int:
        for v in (self.truth_stat, self.prob, self.rouge, self.prompts):
            if v is not None:
                return len(v)
        return 0


# ---- per-sample formulas -------------------------------------------------------------------------------------

def answer_probability(avg_loss) -> np.ndarray:
    """P̃ = exp(−mean token NLL of the answer, EOS included)."""
    return np.exp(-np.asarray(avg_loss, dtype=np.float64))


def normalised_probability(avg_loss, perturbed_avg_losses) -> np.ndarray:
    """P̃(a) / (P̃(a) + Σ_j P̃(perturbed_j)); ``perturbed_avg_losses`` is [n, k]."""
    p = answer_probability(avg_loss)
    return p / (p + answer_probability(perturbed_avg_losses).sum(axis=-1))


def truth_ratio_stat(paraphrased_avg_loss, perturbed_avg_losses) -> np.ndarray:
    """s = exp(mean_j loss(perturbed_j) − loss(paraphrased)), per sample; ``perturbed_avg_losses`` is [n, k]."""
    pert = np.asarray(perturbed_avg_losses, dtype=np.float64)
    return np.exp(pert.mean(axis=-1) - np.asarray(paraphrased_avg_loss, dtype=np.float64))


def truth_ratio_score(s, forget: bool) -> float:
    """Forget: mean(min(s, 1/s)) (1 = the model cannot tell true from false); else mean(max(0, 1 − 1/s))."""
    s = np.asarray(s, dtype=np.float64)
    return float(np.mean(np.minimum(s, 1 / s)) if forget else np.mean(np.maximum(0.0, 1 - 1 / s)))


def forget_quality(s_model, s_retain) -> float:
    """KS-test p-value between the forget-split truth-ratio statistics of the model and of the retain model."""
    return float(ks_2samp(np.asarray(s_model, np.float64), np.asarray(s_retain, np.float64)).pvalue)


def model_utility(parts: dict[str, float]) -> float:
    """Harmonic mean of the nine utility parts (0 as soon as one part is 0)."""
    vals = np.asarray(list(parts.values()), dtype=np.float64)
    if len(vals) != 9:
        raise ValueError(f"parts: model utility needs 9 values (3 metrics × 3 splits), got {len(vals)}")
    return 0.0 if np.any(vals <= 0) else float(hmean(vals))


# ---- readers -------------------------------------------------------------------------------------------------

def _values(section: dict, key: str, where: str) -> list:
    if key not in section:
        raise ValueError(f"log: section {where!r} has no {key!r} (keys: {sorted(section)})")
    by_index = section[key]
    if not by_index:
        raise ValueError(f"log: {where!r}/{key!r} is empty")
    if not isinstance(by_index, dict) or not all(str(k).isdigit() for k in by_index):
        raise ValueError(f"log: {where!r}/{key!r} must map sample indices (\"0\", \"1\", …) to values, got "
                         f"{by_index!r:.60}")
    return [by_index[k] for k in sorted(by_index, key=int)]


def scores_from_tofu_section(section: dict, split: str) -> SplitScores:
    """Per-sample values of one section of TOFU's ``eval_log_aggregated.json``."""
    where = SECTIONS[split]
    pert = np.asarray(_values(section, "average_perturb_loss", where), dtype=np.float64)
    if pert.ndim != 2:
        raise ValueError(f"log: {where!r}/'average_perturb_loss' must hold one list per sample")
    gt = np.asarray(_values(section, "avg_gt_loss", where), dtype=np.float64)
    prob = answer_probability(gt) if split in ("retain", "forget") else normalised_probability(gt, pert)
    prompts = rouge = None
    if "generated_text" in section:  # present but empty is an error (_values), absent is allowed
        texts = _values(section, "generated_text", where)
        if any(not isinstance(t, (list, tuple)) or len(t) != 3 for t in texts):
            raise ValueError(f"log: {where!r}/'generated_text' entries must be [prompt, generation, gold]")
        prompts = [t[0] for t in texts]
    if "rougeL_recall" in section:
        rouge = np.asarray(_values(section, "rougeL_recall", where), dtype=np.float64)
    s = truth_ratio_stat(_values(section, "avg_paraphrased_loss", where), pert)
    sizes = {len(v) for v in (pert, gt, s, prompts, rouge) if v is not None}
    if len(sizes) != 1:
        raise ValueError(f"log: the metrics of {where!r} hold different numbers of samples {sorted(sizes)}")
    return SplitScores(truth_stat=s, prob=prob, rouge=rouge, prompts=prompts)


def _ou_values(data: dict, metric: str, field: str) -> list | None:
    entry = data.get(metric)
    if not isinstance(entry, dict) or not entry.get("value_by_index"):
        return None
    by_index = entry["value_by_index"]
    return [by_index[k].get(field) for k in sorted(by_index, key=int)]


def scores_from_open_unlearning(data: dict) -> dict[str, SplitScores]:
    """Per-sample values from open-unlearning's ``TOFU_EVAL.json`` (metric → ``value_by_index``)."""
    out = {}
    for split, p in _OU_PREFIX.items():
        tr_name = "forget_truth_ratio" if split == "forget" else f"{p}_Truth_Ratio"
        inv = _ou_values(data, tr_name, "score")
        prob_name = f"{p}_Q_A_Prob" if split in ("retain", "forget") else f"{p}_Q_A_Prob_normalised"
        prob = _ou_values(data, prob_name, "prob")
        rouge = _ou_values(data, f"{p}_Q_A_ROUGE", "rougeL_recall")
        prompts = _ou_values(data, f"{p}_Q_A_ROUGE", "input")
        if inv is None and prob is None and rouge is None:
            continue
        out[split] = SplitScores(
            truth_stat=None if inv is None else 1.0 / np.asarray(inv, dtype=np.float64),  # stored inverted
            prob=None if prob is None else np.asarray(prob, dtype=np.float64),
            rouge=None if rouge is None else np.asarray(rouge, dtype=np.float64),
            prompts=prompts if prompts and all(isinstance(x, str) for x in prompts) else None)
    if not out:
        raise ValueError("log: no TOFU metric found in this open-unlearning file (expected e.g. 'forget_truth_ratio')")
    return out


def load_scores(log, what: str = "log") -> dict[str, SplitScores]:
    """Per-split scores of a log: a path or an already loaded dict, TOFU or open-unlearning format.  ``what``:
    the argument's name in error messages, which also name the file."""
    if not isinstance(log, (str, os.PathLike)):
        return _scores(log)
    data = read_json_file(log, what)
    expected = "expected TOFU's eval_log_aggregated.json or open-unlearning's TOFU_EVAL.json (a JSON object)"
    if not isinstance(data, dict):
        raise TypeError(f"{what}: {log} holds a JSON {json_type(data)}; {expected}")
    try:
        return _scores(data)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{what}: {log}: {str(e).removeprefix('log: ')}") from None
    except (KeyError, AttributeError, IndexError) as e:
        raise ValueError(f"{what}: {log}: unexpected structure ({type(e).__name__}: {e}); {expected}") from None


def _scores(log) -> dict[str, SplitScores]:
    if not isinstance(log, dict):
        raise TypeError(f"log: expected a JSON object, got {type(log).__name__}")
    if any(name in log for name in SECTIONS.values()):
        for split, name in SECTIONS.items():
            if name in log and not isinstance(log[name], dict):
                raise ValueError(f"log: section {name!r} holds a JSON {json_type(log[name])}, expected an object "
                                 "of metrics")
        return {split: scores_from_tofu_section(log[name], split) for split, name in SECTIONS.items() if name in log}
    return scores_from_open_unlearning(log)


# ---- aggregation ---------------------------------------------------------------------------------------------

def utility_parts(scores: dict[str, SplitScores]) -> dict[str, float]:
    """The nine values model utility is the harmonic mean of, named like TOFU's aggregate CSV."""
    names = {"retain": "Retain", "real_authors": "Real Authors", "world_facts": "Real World"}
    parts = {}
    for split in UTILITY_SPLITS:
        if split not in scores:
            raise ValueError(f"log: has no {split!r} split ({SECTIONS[split]}); model utility needs all three of "
                             f"{list(UTILITY_SPLITS)}")
        sc = scores[split]
        for label, values in (("Prob.", sc.prob), ("ROUGE", sc.rouge), ("Truth Ratio", sc.truth_stat)):
            if values is None:
                raise ValueError(f"log: split {split!r} lacks the per-sample values for {label!r}")
        parts[f"Prob. {names[split]}"] = float(np.mean(sc.prob))
        parts[f"ROUGE {names[split]}"] = float(np.mean(sc.rouge))
        parts[f"Truth Ratio {names[split]}"] = truth_ratio_score(sc.truth_stat, forget=False)
    return parts


def check_same_questions(a: SplitScores, b: SplitScores, what: str = "forget") -> None:
    """Refuse to compare logs of different forget splits or different questions."""
    if len(a) != len(b):
        raise ValueError(f"logs: the {what} splits differ in size ({len(a)} vs {len(b)} samples): logs of "
                         "different forget splits (or ds_size) cannot be compared")
    if a.prompts is not None and b.prompts is not None:
        for i, (pa, pb) in enumerate(zip(a.prompts, b.prompts)):
            if pa != pb:
                raise ValueError(f"logs: {what} sample {i} asks different questions: {pa!r} vs {pb!r}")


def aggregate(model_log, retain_log=None) -> dict:
    """``model_utility`` (with its 9 ``parts``), forget-split values and, given the retain model's log,
    ``forget_quality``. Logs are paths or loaded dicts in TOFU or open-unlearning format."""
    scores = load_scores(model_log, "model_log")
    parts = utility_parts(scores)
    result = {"model_utility": model_utility(parts), "parts": parts}
    forget = scores.get("forget")
    if forget is not None:
        if forget.truth_stat is not None:
            result["forget_truth_ratio"] = truth_ratio_score(forget.truth_stat, forget=True)
        if forget.prob is not None:
            result["forget_prob"] = float(np.mean(forget.prob))
        if forget.rouge is not None:
            result["forget_rougeL"] = float(np.mean(forget.rouge))
        result["forget_samples"] = len(forget)
    if retain_log is not None:
        retain_forget = load_scores(retain_log, "retain_log").get("forget")
        if forget is None or forget.truth_stat is None:
            raise ValueError("model_log: has no forget-split truth ratios; forget quality needs them")
        if retain_forget is None or retain_forget.truth_stat is None:
            raise ValueError("retain_log: has no forget-split truth ratios; forget quality needs them")
        check_same_questions(forget, retain_forget)
        result["forget_quality"] = forget_quality(forget.truth_stat, retain_forget.truth_stat)
    return result
