"""TOFU evaluation of a model: per-sample losses, generations and ROUGE, written as TOFU's ``eval_log_aggregated.json``.

Faithful to TOFU's ``evaluate_util.py`` (config ``eval_everything.yaml``):
- four tasks: retain (``retain_perturbed``), real authors, world facts, forget (``forgetXX_perturbed``), each cut to
  its first ``ds_size`` = 300 rows;
- losses: the answer tokens of ``template.full(question, answer)`` plus one EOS (``encode_qa``, ``max_length`` 200),
  summed per sample and divided by their count (``avg_*_loss``);
- generation: greedy from ``template.prompt(question)`` with left padding, ``max_length`` 200 tokens for prompt plus
  continuation, in batches in dataset order; ROUGE against the gold answer (:mod:`rklu_fast.eval.rouge`);
- the truth ratio's "paraphrased" answer is ``paraphrased_answer`` for retain / forget and the answer itself for
  real authors / world facts (whose probabilities are then also normalised, ``normalized_gt_loss``).
Losses are computed in float32 from the model's logits, in batches sorted by length (less padding; each sample's
loss does not depend on its batch).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rklu_fast.data import Template, encode_qa, load_tofu
from rklu_fast.eval.aggregate import SECTIONS
from rklu_fast.eval.generate import generate
from rklu_fast.eval.nll import sequence_nll
from rklu_fast.eval.rouge import rouge_scores

DS_SIZE = 300          # TOFU's ds_size: every split is cut to its first 300 rows
MAX_LENGTH = 200       # TOFU's generation.max_length, also the tokenisation length of the loss inputs
FORGET_SPLITS = ("forget01", "forget05", "forget10")


@dataclass(frozen=True)
class TofuTask:
    split: str               # "retain", "real_authors", "world_facts" or "forget"
    data_split: str          # the TOFU file
    base_key: str            # the answer the truth ratio compares perturbed answers with
    normalise: bool          # normalised probability over answer + perturbed answers

    @property
    def section(self) -> str:
        return SECTIONS[self.split]


def tofu_tasks(forget_split: str = "forget10") -> list[TofuTask]:
    """TOFU's four evaluation tasks, in TOFU's order."""
    if forget_split not in FORGET_SPLITS:
        raise ValueError(f"forget_split: must be one of {FORGET_SPLITS}, got {forget_split!r}")
    return [TofuTask("retain", "retain_perturbed", "paraphrased_answer", False),
            TofuTask("real_authors", "real_authors_perturbed", "answer", True),
            TofuTask("world_facts", "world_facts_perturbed", "answer", True),
            TofuTask("forget", f"{forget_split}_perturbed", "paraphrased_answer", False)]


def answer_losses(model, tokenizer, template: Template, questions: list[str], answers: list[str], *,
                  batch_size: int = 16, max_length: int = MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL (nats) and number of answer tokens (EOS included) of each (question, answer) pair."""
    if len(questions) != len(answers):
        raise ValueError(f"questions/answers: {len(questions)} questions but {len(answers)} answers")
    examples = [encode_qa(tokenizer, template, q, a, max_length=max_length) for q, a in zip(questions, answers)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sums, counts = sequence_nll(model, examples, pad_id, batch_size=batch_size)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise ValueError(f"questions: sample {int(empty[0])} has no answer token within max_length={max_length}")
    return sums, counts


def _perturbed_list(row: dict, i: int, split: str) -> list[str]:
    pert = row.get("perturbed_answer")
    if pert is None:
        raise ValueError(f"split: row {i} of {split!r} has no 'perturbed_answer' (is it a *_perturbed split?)")
    return [pert] if isinstance(pert, str) else list(pert)


def evaluate_task(model, tokenizer, template: Template, task: TofuTask, *, source=None, ds_size: int = DS_SIZE,
                  batch_size: int = 16, max_length: int = MAX_LENGTH, max_new_tokens: int | None = None) -> dict:
    """One section of TOFU's log: metric name → {sample index (str): value}."""
    rows = load_tofu(task.data_split, source)[:ds_size]
    for i, r in enumerate(rows):
        if task.base_key not in r:
            raise ValueError(f"split: row {i} of {task.data_split!r} has no {task.base_key!r}")
    questions = [r["question"] for r in rows]
    gold = [r["answer"] for r in rows]
    perturbed = [_perturbed_list(r, i, task.data_split) for i, r in enumerate(rows)]
    k = len(perturbed[0])
    if any(len(p) != k for p in perturbed):
        raise ValueError(f"split: rows of {task.data_split!r} have different numbers of perturbed answers")

    # One pass over answer, base answer and the k perturbed answers of every row: fuller length-sorted batches.
    answers = gold + [r[task.base_key] for r in rows] + [a for p in perturbed for a in p]
    n = len(rows)
    sums, counts = answer_losses(model, tokenizer, template, questions * 2 + [q for q in questions for _ in range(k)],
                                 answers, batch_size=batch_size, max_length=max_length)
    gt_sum, gt_n, para_sum, para_n = sums[:n], counts[:n], sums[n:2 * n], counts[n:2 * n]
    pert_sum, pert_n = sums[2 * n:].reshape(n, k), counts[2 * n:].reshape(n, k)

    prompts = [template.prompt(q) for q in questions]
    lengths = {"max_new_tokens": max_new_tokens} if max_new_tokens is not None else {"max_length": max_length}
    generations = [g[0] for g in generate(model, tokenizer, prompts, batch_size=batch_size, **lengths)]
    rouge = [rouge_scores(a, g) for a, g in zip(gold, generations)]

    avg_gt, avg_para, avg_pert = gt_sum / gt_n, para_sum / para_n, pert_sum / pert_n
    per_sample = {
        "avg_gt_loss": avg_gt, "gt_loss": gt_sum, "num_token_gt": gt_n,
        "generated_text": [list(t) for t in zip(prompts, generations, gold)],
        "rouge1_recall": [r["rouge1_recall"] for r in rouge], "rougeL_recall": [r["rougeL_recall"] for r in rouge],
        "average_perturb_loss": avg_pert, "avg_paraphrased_loss": avg_para,
        "truth_ratio": np.exp(avg_para - avg_pert.mean(-1)),  # TOFU logs this inverse of s
        "paraphrased_loss": para_sum, "perturb_loss": pert_sum,
        "num_token_paraphrased": para_n, "num_token_perturb": pert_n,
    }
    if task.normalise:
        p_all = np.concatenate([np.exp(-avg_gt)[:, None], np.exp(-avg_pert)], axis=1)
        per_sample["normalized_gt_loss"] = -np.log(np.exp(-avg_gt) / p_all.sum(1))
    return {name: {str(i): v for i, v in enumerate(values.tolist() if isinstance(values, np.ndarray) else values)}
            for name, values in per_sample.items()}


def evaluate_tofu(model, tokenizer, template: Template, *, forget_split: str = "forget10", source=None,
                  ds_size: int = DS_SIZE, batch_size: int = 16, max_new_tokens: int | None = None,
                  out_dir: str | Path | None = None, splits: list[str] | None = None) -> tuple[dict, dict]:
    """Evaluate ``model`` on TOFU's four tasks: (log in ``eval_log_aggregated.json`` layout, seconds per split).

    ``splits`` picks tasks by name (default: all four); ``max_new_tokens`` replaces TOFU's max_length-200 rule
    (for quick looks). With ``out_dir`` the log and ``eval_timing.json`` are written there.
    """
    if not isinstance(ds_size, int) or ds_size < 1:
        raise ValueError(f"ds_size: must be a positive int, got {ds_size!r}")
    tasks = tofu_tasks(forget_split)
    if splits is not None:
        unknown = sorted(set(splits) - {t.split for t in tasks})
        if unknown:
            raise ValueError(f"splits: unknown {unknown}; choose from {[t.split for t in tasks]}")
        tasks = [t for t in tasks if t.split in splits]
    was_training = model.training
    model.eval()
    log, seconds = {}, {}
    try:
        for task in tasks:
            t0 = time.perf_counter()
            log[task.section] = evaluate_task(model, tokenizer, template, task, source=source, ds_size=ds_size,
                                              batch_size=batch_size, max_new_tokens=max_new_tokens)
            seconds[task.split] = time.perf_counter() - t0
    finally:
        model.train(was_training)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval_log_aggregated.json").write_text(json.dumps(log, indent=1), encoding="utf-8")
        timing = {"seconds_per_split": seconds, "forget_split": forget_split, "ds_size": ds_size}
        (out / "eval_timing.json").write_text(json.dumps(timing, indent=1), encoding="utf-8")
    return log, seconds
