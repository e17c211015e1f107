"""Forget quality against model utility (the paper's Figure 3: log scale below 0.05, linear above), across runs
or per epoch of one run."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SIGNIFICANCE = 0.05   # TOFU: forget quality above 0.05 = forgetting not rejected by the KS test


def dual_scale(linear_decades: float):
    """(forward, inverse) of the y scale: log10 below 0.05, then linear up to 1 over the height of
    ``linear_decades`` decades of the log part."""
    c = np.log10(SIGNIFICANCE)

    def forward(y):
        y = np.clip(np.asarray(y, dtype=float), 1e-300, None)
        return np.where(y < SIGNIFICANCE, np.log10(y), c + linear_decades * (y - SIGNIFICANCE) / (1 - SIGNIFICANCE))

    def inverse(t):
        t = np.asarray(t, dtype=float)
        return np.where(t < c, 10.0 ** np.minimum(t, 0), SIGNIFICANCE + (t - c) * (1 - SIGNIFICANCE) / linear_decades)

    return forward, inverse


def _check_points(runs: dict[str, list[dict]]) -> None:
    for name, points in runs.items():
        for p in points:
            if "model_utility" not in p or p.get("forget_quality") is None:
                raise ValueError(f"runs: a point of {name!r} lacks 'model_utility' or 'forget_quality'")


def _draw_fq_vs_mu(ax, runs: dict[str, list[dict]]) -> None:
    """FQ (dual scale) against MU on ``ax``: one marker per run, a line through a run's per-epoch points."""
    lowest = min([SIGNIFICANCE / 10] + [max(p["forget_quality"], 1e-300) for ps in runs.values() for p in ps])
    decades = int(np.ceil(-np.log10(lowest)))
    ax.set_yscale("function", functions=dual_scale(max(2.0, 0.4 * decades)))
    for name, points in runs.items():
        mu = [p["model_utility"] for p in points]
        fq = [max(p["forget_quality"], 1e-300) for p in points]
        line, = ax.plot(mu, fq, "-o", ms=3, alpha=0.6) if len(points) > 1 else ax.plot([], [])
        ax.scatter(mu[-1:], fq[-1:], s=50, color=line.get_color(), label=name, zorder=3)
    ax.axhline(SIGNIFICANCE, color="gray", ls=":", lw=1)
    ticks = [10.0 ** -d for d in range(decades, 1, -max(1, decades // 6))] + [SIGNIFICANCE, 0.25, 0.5, 1.0]
    ax.set_yticks(sorted(set(ticks)))
    ax.set_yticklabels([f"{t:g}" if t >= SIGNIFICANCE else f"1e-{round(-np.log10(t))}" for t in sorted(set(ticks))])
    ax.set_ylim(10.0 ** -decades, 1.05)
    ax.set_xlabel("model utility")
    ax.set_ylabel("forget quality (KS p-value; log scale below 0.05)")


def _save(fig, path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    _pyplot().close(fig)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fq_vs_mu(runs: dict[str, list[dict] | dict], path: str | Path, title: str | None = None) -> Path:
    """Scatter (and per-epoch curves) of runs: name → one ``{"model_utility", "forget_quality"}`` point or a list
    of them in epoch order (drawn as a line ending in a larger marker). Saves a PNG/PDF at ``path``."""
    if not runs:
        raise ValueError("runs: nothing to plot")
    runs = {name: [p] if isinstance(p, dict) else list(p) for name, p in runs.items()}
    _check_points(runs)
    fig, ax = _pyplot().subplots(figsize=(6, 4.5))
    _draw_fq_vs_mu(ax, runs)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_epochs(points: list[dict], path: str | Path, name: str = "run") -> Path:
    """Per-epoch curves of one run (``eval_epochs.json`` points): forget quality against model utility (dual
    scale, as the paper's Figure 3) when every point has it, and model utility / forget-split values per epoch."""
    if not points:
        raise ValueError("points: nothing to plot")
    with_fq = all(p.get("forget_quality") is not None for p in points)
    fig, axes = _pyplot().subplots(1, 2 if with_fq else 1, figsize=(11 if with_fq else 6, 4.5), squeeze=False)
    if with_fq:
        _draw_fq_vs_mu(axes[0, 0], {name: points})
        for p in points:
            axes[0, 0].annotate(f"{p['epoch']:g}", (p["model_utility"], max(p["forget_quality"], 1e-300)),
                                fontsize=7, xytext=(3, 3), textcoords="offset points")
        axes[0, 0].set_title("forget quality vs model utility (labels: epoch)")
    ax = axes[0, -1]
    epochs = [p["epoch"] for p in points]
    for key in ("model_utility", "forget_truth_ratio", "forget_prob", "forget_rougeL"):
        ax.plot(epochs, [p[key] for p in points], "-o", ms=3, label=key)
    ax.set_xlabel("epoch")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(name if with_fq else f"{name} (forget quality unavailable: no retain-model reference)",
                 fontsize=9)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)
