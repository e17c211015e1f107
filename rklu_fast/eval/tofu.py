"""TOFU evaluation of a model: per-sample losses, generations and ROUGE, written as TOFU's ``eval_log_aggregated.json``.

Faithful to TOFU's ``evaluate_util.py`` (config ``eval_everything.yaml``):
- four tasks: retain (``retain_perturbed``), real authors, world facts, forget (``forgetXX_perturbed``), each cut to
  its first ``ds_size`` = 300 rows;
- losses: the answer tokens of ``template.full(question, answer)`` plus one EOS (``encode_qa``, ``max_length`` 200),
  summed per sample and divided by their count (``avg_*_loss``);
- generation: greedy from ``template.prompt(question)`` with left padding, ``max_length`` 200 tokens for prompt plus
  continuation, in batches in dataset order (each row's budget follows its TOFU batch; the model runs bigger
  chunks, see :func:`rklu_fast.eval.generate.generate`); ROUGE against the gold answer (:mod:`rklu_fast.eval.rouge`);
- the truth ratio's "paraphrased" answer is ``paraphrased_answer`` for retain / forget and the answer itself for
  real authors / world facts (whose probabilities are then also normalised, ``normalized_gt_loss``).
Losses are computed in float32 from the model's logits, in batches sorted by length (less padding; each sample's
loss does not depend on its batch); identical (question, answer) pairs (real authors' and world facts' answer is also
their "paraphrased" answer) are scored once. :class:`TofuEvaluator` loads and tokenises the splits once and then
evaluates any number of models (evaluation after every epoch).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rklu_fast.data import Template, encode_qa, load_tofu
from rklu_fast.eval.aggregate import SECTIONS
from rklu_fast.eval.generate import greedy_continuations, token_budgets
from rklu_fast.eval.nll import sequence_nll
from rklu_fast.eval.rouge import rouge_scores
from rklu_fast.jsonio import write_json

DS_SIZE = 300          # TOFU's ds_size: every split is cut to its first 300 rows
MAX_LENGTH = 200       # TOFU's generation.max_length, also the tokenisation length of the loss inputs
FORGET_SPLITS = ("forget01", "forget05", "forget10")
GEN_CHUNK = 64         # prompts per model.generate call (lengths still follow TOFU's batches)


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


def encode_pairs(tokenizer, template: Template, questions: list[str], answers: list[str], *,
                 max_length: int = MAX_LENGTH) -> tuple[list[dict], np.ndarray]:
    """``encode_qa`` of each distinct (question, answer) pair, and for every given pair the index of its encoding."""
    if len(questions) != len(answers):
        raise ValueError(f"questions/answers: {len(questions)} questions but {len(answers)} answers")
    index: dict[tuple[str, str], int] = {}
    where = np.array([index.setdefault(pair, len(index)) for pair in zip(questions, answers)], dtype=np.int64)
    examples = [encode_qa(tokenizer, template, q, a, max_length=max_length) for q, a in index]
    return examples, where


def _pair_losses(model, tokenizer, examples: list[dict], where: np.ndarray, *, batch_size: int, max_length: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sums, counts = sequence_nll(model, examples, pad_id, batch_size=batch_size)
    sums, counts = sums[where], counts[where]
    empty = np.argwhere(counts == 0)  # ``where`` is per pair or per row (× answers): name the sample
    if len(empty):
        raise ValueError(f"questions: sample {int(empty[0][0])} has no answer token within max_length={max_length}")
    return sums, counts


def answer_losses(model, tokenizer, template: Template, questions: list[str], answers: list[str], *,
                  batch_size: int = 16, max_length: int = MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL (nats) and number of answer tokens (EOS included) of each (question, answer) pair."""
    examples, where = encode_pairs(tokenizer, template, questions, answers, max_length=max_length)
    return _pair_losses(model, tokenizer, examples, where, batch_size=batch_size, max_length=max_length)


def _perturbed_list(row: dict, i: int, split: str) -> list[str]:
    pert = row.get("perturbed_answer")
    if pert is None:
        raise ValueError(f"split: row {i} of {split!r} has no 'perturbed_answer' (is it a *_perturbed split?)")
    return [pert] if isinstance(pert, str) else list(pert)


@dataclass
class PreparedTask:
    """One task's rows, tokenised once: everything about it that does not depend on the model."""
    task: TofuTask
    gold: list[str]
    prompts: list[str]
    prompt_ids: list[list[int]]
    examples: list[dict]     # encoded distinct (question, answer) pairs
    where: np.ndarray        # [n, 2 + k]: encoding of each row's answer, base answer and k perturbed answers
    max_length: int
    seconds: float = 0.0     # time spent loading and tokenising


def task_rows(prepared: PreparedTask, start: int, stop: int) -> PreparedTask:
    """The rows ``[start, stop)`` of a prepared task (its encodings shared, not re-tokenised)."""
    where = prepared.where[start:stop]
    used = np.unique(where)
    remap = np.full(len(prepared.examples), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return PreparedTask(prepared.task, prepared.gold[start:stop], prepared.prompts[start:stop],
                        prepared.prompt_ids[start:stop], [prepared.examples[i] for i in used], remap[where],
                        prepared.max_length)


def prepare_task(tokenizer, template: Template, task: TofuTask, *, source=None, ds_size: int = DS_SIZE,
                 max_length: int = MAX_LENGTH) -> PreparedTask:
    """Load ``task``'s first ``ds_size`` rows and tokenise its QA pairs and prompts."""
    t0 = time.perf_counter()
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
    # Answer, base answer and the k perturbed answers of every row, scored in one length-sorted pass.
    pairs = [(q, a) for q, r, p in zip(questions, rows, perturbed) for a in (r["answer"], r[task.base_key], *p)]
    examples, where = encode_pairs(tokenizer, template, [q for q, _ in pairs], [a for _, a in pairs],
                                   max_length=max_length)
    where = where.reshape(len(rows), 2 + k)
    prompts = [template.prompt(q) for q in questions]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    return PreparedTask(task, gold, prompts, prompt_ids, examples, where, max_length, time.perf_counter() - t0)


def task_losses(model, tokenizer, prepared: PreparedTask, *, batch_size: int = 16) -> dict:
    """The loss-based per-sample values of one task (everything but generations and ROUGE), as arrays."""
    p = prepared
    sums, counts = _pair_losses(model, tokenizer, p.examples, p.where, batch_size=batch_size,
                                max_length=p.max_length)
    gt_sum, gt_n, para_sum, para_n = sums[:, 0], counts[:, 0], sums[:, 1], counts[:, 1]
    pert_sum, pert_n = sums[:, 2:], counts[:, 2:]
    avg_gt, avg_para, avg_pert = gt_sum / gt_n, para_sum / para_n, pert_sum / pert_n
    values = {"avg_gt_loss": avg_gt, "gt_loss": gt_sum, "num_token_gt": gt_n,
              "average_perturb_loss": avg_pert, "avg_paraphrased_loss": avg_para,
              "truth_ratio": np.exp(avg_para - avg_pert.mean(-1)),  # TOFU logs this inverse of s
              "paraphrased_loss": para_sum, "perturb_loss": pert_sum,
              "num_token_paraphrased": para_n, "num_token_perturb": pert_n}
    if p.task.normalise:
        p_all = np.concatenate([np.exp(-avg_gt)[:, None], np.exp(-avg_pert)], axis=1)
        values["normalized_gt_loss"] = -np.log(np.exp(-avg_gt) / p_all.sum(1))
    return values


def task_log(prepared: PreparedTask, losses: dict, generations: list[str]) -> dict:
    """One section of TOFU's log, in TOFU's key order: metric name → {sample index (str): value}."""
    rouge = [rouge_scores(a, g) for a, g in zip(prepared.gold, generations)]
    head = ("avg_gt_loss", "gt_loss", "num_token_gt")  # TOFU logs these before the generations, the rest after
    per_sample = {
        **{k: losses[k] for k in head},
        "generated_text": [list(t) for t in zip(prepared.prompts, generations, prepared.gold)],
        "rouge1_recall": [r["rouge1_recall"] for r in rouge], "rougeL_recall": [r["rougeL_recall"] for r in rouge],
        **{k: v for k, v in losses.items() if k not in head},
    }
    return {name: {str(i): v for i, v in enumerate(values.tolist() if isinstance(values, np.ndarray) else values)}
            for name, values in per_sample.items()}


class TofuEvaluator:
    """TOFU's tasks loaded and tokenised once; calling it evaluates a model: (log in ``eval_log_aggregated.json``
    layout, seconds per split and for ``"generation"``). ``splits`` picks tasks by name (default: all four);
    ``max_new_tokens`` replaces TOFU's max_length-200 rule (for quick looks); ``gen_chunk``: prompts per
    ``model.generate`` call (memory).

    Losses are computed task by task; the greedy generations of all tasks run together (sorted by length, in chunks
    of ``gen_chunk``, each row cut at the budget TOFU's rule gives it within its own task's batches), since a small
    batch costs as many sequential decoding steps as a big one.
    """

    def __init__(self, tokenizer, template: Template, *, forget_split: str = "forget10", source=None,
                 ds_size: int = DS_SIZE, batch_size: int = 16, max_new_tokens: int | None = None,
                 splits: list[str] | None = None, gen_chunk: int = GEN_CHUNK):
        if not isinstance(ds_size, int) or ds_size < 1:
            raise ValueError(f"ds_size: must be a positive int, got {ds_size!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: must be a positive int, got {batch_size!r}")
        tasks = tofu_tasks(forget_split)
        if splits is not None:
            unknown = sorted(set(splits) - {t.split for t in tasks})
            if unknown:
                raise ValueError(f"splits: unknown {unknown}; choose from {[t.split for t in tasks]}")
            tasks = [t for t in tasks if t.split in splits]
        self.tokenizer, self.forget_split, self.ds_size = tokenizer, forget_split, ds_size
        self.batch_size, self.gen_chunk = batch_size, gen_chunk
        self.tasks = [prepare_task(tokenizer, template, t, source=source, ds_size=ds_size) for t in tasks]
        self.budgets = [token_budgets([len(ids) for ids in p.prompt_ids], batch_size, p.max_length, max_new_tokens)
                        for p in self.tasks]

    def __call__(self, model) -> tuple[dict, dict]:
        was_training = model.training
        model.eval()
        seconds, losses = {}, []
        try:
            for p in self.tasks:
                t0 = time.perf_counter()
                losses.append(task_losses(model, self.tokenizer, p, batch_size=self.batch_size))
                seconds[p.task.split] = time.perf_counter() - t0
            t0 = time.perf_counter()
            texts = greedy_continuations(model, self.tokenizer, [ids for p in self.tasks for ids in p.prompt_ids],
                                         [b for budgets in self.budgets for b in budgets], chunk_size=self.gen_chunk)
            seconds["generation"] = time.perf_counter() - t0
        finally:
            model.train(was_training)
        log, start = {}, 0
        for p, task_values in zip(self.tasks, losses):
            t0 = time.perf_counter()
            log[p.task.section] = task_log(p, task_values, texts[start:start + len(p.prompts)])
            seconds[p.task.split] += time.perf_counter() - t0
            start += len(p.prompts)
        return log, seconds


def evaluate_tofu(model, tokenizer, template: Template, *, forget_split: str = "forget10", source=None,
                  ds_size: int = DS_SIZE, batch_size: int = 16, max_new_tokens: int | None = None,
                  out_dir: str | Path | None = None, splits: list[str] | None = None,
                  gen_chunk: int = GEN_CHUNK) -> tuple[dict, dict]:
    """Evaluate ``model`` on TOFU's four tasks: (log in ``eval_log_aggregated.json`` layout, seconds per split
    (loading and tokenising included) and for the generations of all splits). Options as :class:`TofuEvaluator`.
    With ``out_dir`` the log and ``eval_timing.json`` are written there."""
    evaluator = TofuEvaluator(tokenizer, template, forget_split=forget_split, source=source, ds_size=ds_size,
                              batch_size=batch_size, max_new_tokens=max_new_tokens, splits=splits,
                              gen_chunk=gen_chunk)
    log, seconds = evaluator(model)
    for t in evaluator.tasks:
        seconds[t.task.split] += t.seconds
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "eval_log_aggregated.json", log)
        timing = {"seconds_per_split": seconds, "forget_split": forget_split, "ds_size": ds_size}
        write_json(out / "eval_timing.json", timing)
    return log, seconds
