"""Which point of an unlearning curve is reported: the paper's rule, applied the same way to every method.

- ``selected_epoch``: e* = the smallest epoch in 1..E at which forget quality reaches its maximum over 1..E
  (epoch 0, the untouched original, excluded).
- ``best_utility_above``: among epochs whose forget quality exceeds a threshold (0.05, the KS test's usual level),
  the one with the highest utility, or None when no epoch gets there.
- ``best_grid_point``: across a learning-rate grid, the run whose e* has the highest forget quality (ties: higher
  utility, then the smaller learning rate), so one point per method goes on the plot.
- ``best_configuration``: across configurations (labels, e.g. teacher forms × α), the one with the highest utility
  among epochs above forget quality 0.05; when none gets there, the one whose best grid point has the highest
  forget quality at e*.
"""
from __future__ import annotations

from rklu_fast.eval.plots import SIGNIFICANCE as FQ_THRESHOLD  # TOFU's 0.05

__all__ = ["FQ_THRESHOLD", "best_configuration", "best_grid_point", "best_utility_above", "selected_epoch"]


def selected_epoch(points: list[dict]) -> dict:
    """The point of e* among ``points`` (dicts with ``epoch`` and ``forget_quality``)."""
    trained = [p for p in points if p["epoch"] >= 1]
    if not trained:
        raise ValueError("points: no epoch ≥ 1 to select from")
    best = max(p["forget_quality"] for p in trained)
    return min((p for p in trained if p["forget_quality"] == best), key=lambda p: p["epoch"])


def best_utility_above(points: list[dict], threshold: float = FQ_THRESHOLD) -> dict | None:
    """The point with the highest ``utility`` among epochs ≥ 1 with forget quality > ``threshold`` (points without
    a utility are skipped); None if there is none."""
    above = [p for p in points if p["epoch"] >= 1 and p["forget_quality"] > threshold
             and p.get("utility") is not None]
    return max(above, key=lambda p: (p["utility"], -p["epoch"])) if above else None


def best_grid_point(runs: list[dict]) -> dict:
    """The run (dict with ``lr`` and ``selected`` = its e* point) reported for a method."""
    if not runs:
        raise ValueError("runs: empty grid")
    return max(runs, key=lambda r: (r["selected"]["forget_quality"], r["selected"].get("utility") or 0.0,
                                    -(r["lr"] or 0.0)))


def best_configuration(runs: list[dict]) -> str:
    """The label (``run["label"]``, else its ``spec``) of the best configuration among seed-0 ``runs``."""
    by_label: dict[str, list[dict]] = {}
    for r in runs:
        if r["seed"] == 0:
            by_label.setdefault(r.get("label") or r["spec"], []).append(r)
    if not by_label:
        raise ValueError("runs: no seed-0 run")

    def above(label):
        points = [r["best_utility_above_0.05"] for r in by_label[label] if r.get("best_utility_above_0.05")]
        return max((p["utility"] for p in points), default=None)

    reaching = {label: u for label in by_label if (u := above(label)) is not None}
    if reaching:
        return max(reaching, key=reaching.get)
    return max(by_label, key=lambda label: (best_grid_point(by_label[label])["selected"]["forget_quality"],
                                            best_grid_point(by_label[label])["selected"].get("utility") or 0.0))
