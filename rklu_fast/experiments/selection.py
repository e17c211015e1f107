"""Which point of an unlearning curve is reported: the paper's rule, applied the same way to every method.

- ``selected_epoch``: e* = the smallest epoch in 1..E at which forget quality reaches its maximum over 1..E
  (epoch 0, the untouched original, excluded).
- ``best_utility_above``: among epochs whose forget quality exceeds a threshold (0.05, the KS test's usual level),
  the one with the highest utility, or None when no epoch gets there.
- ``best_grid_point``: across a learning-rate grid, the run whose e* has the highest forget quality (ties: higher
  utility, then the smaller learning rate), so one point per method goes on the plot.
"""
from __future__ import annotations

FQ_THRESHOLD = 0.05


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
