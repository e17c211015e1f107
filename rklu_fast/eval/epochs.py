"""TOFU metrics during training: one point per epoch boundary in ``eval_epochs.json``, and their curve plot.

The training loop knows nothing of evaluation: it calls a hook ``(epoch, model)`` at every epoch boundary (see
``rklu_fast.train.loop.train``); :class:`EpochEvaluation` is such a hook, connected by the pipeline
(``eval.every_epoch``). Forget quality needs the retain model's forget-split truth ratios: ``reference`` is that
model (the run's oracle), evaluated once on the forget split; without one, points carry ``forget_quality: null``
and model utility, forget-split values and the nine parts.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from rklu_fast.eval.aggregate import aggregate
from rklu_fast.eval.report import epochs_markdown
from rklu_fast.eval.tofu import TofuEvaluator
from rklu_fast.jsonio import write_json

POINTS_FILE = "eval_epochs.json"
PLOT_FILE = "eval_epochs.png"
TABLE_FILE = "eval_epochs.md"


class EpochEvaluation:
    """Hook ``(epoch, model)``: TOFU evaluation of ``model`` appended as a point to ``out_dir/eval_epochs.json``.

    A point holds ``epoch``, ``model_utility``, ``forget_quality`` (null without a reference), the forget-split
    values, the nine utility parts, ``eval_seconds`` and ``train_seconds`` (wall time since the previous point's
    evaluation ended: one epoch of training). Resuming keeps the points up to the resumed epoch, so the file always
    describes one uninterrupted run. Evaluation options are those of :class:`TofuEvaluator`.
    """

    def __init__(self, out_dir: str | Path, tokenizer, template, *, reference=None, **options):
        self.path = Path(out_dir) / POINTS_FILE
        self.evaluator = TofuEvaluator(tokenizer, template, **options)
        self.reference_log = None
        if reference is not None:  # the retain model's forget split, once: what forget quality compares with
            forget_only = TofuEvaluator(tokenizer, template, **{**options, "splits": ["forget"]})
            self.reference_log, _ = forget_only(reference)
        self.points = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else []
        self._last_end: float | None = None

    def __call__(self, epoch: float, model) -> None:
        self.points = [p for p in self.points if p["epoch"] <= epoch]  # a resumed run redoes later epochs
        if any(p["epoch"] == epoch for p in self.points):              # evaluated before the interruption
            self._last_end = time.perf_counter()
            return
        t0 = time.perf_counter()
        train_seconds = None if self._last_end is None else t0 - self._last_end
        log, seconds = self.evaluator(model)
        result = aggregate(log, self.reference_log)
        eval_seconds = time.perf_counter() - t0
        self.points.append({"epoch": epoch, "model_utility": result["model_utility"],
                            "forget_quality": result.get("forget_quality"),
                            **{k: result[k] for k in ("forget_truth_ratio", "forget_prob", "forget_rougeL")},
                            "parts": result["parts"], "eval_seconds": eval_seconds, "train_seconds": train_seconds,
                            "seconds_per_split": seconds})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, self.points)
        self._last_end = time.perf_counter()

    def finish(self, name: str = "unlearned") -> Path | None:
        """Write the per-epoch curve and a Markdown table next to the points; returns the plot's path (None
        without points)."""
        if not self.points:
            return None
        from rklu_fast.eval.plots import plot_epochs

        self.path.with_name(TABLE_FILE).write_text(epochs_markdown(name, self.points), encoding="utf-8")
        return plot_epochs(self.points, self.path.with_name(PLOT_FILE), name=name)
