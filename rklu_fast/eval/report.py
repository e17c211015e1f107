"""Per-run reports: one JSON (everything) and one Markdown table (what a reader compares)."""
from __future__ import annotations

from pathlib import Path
from rklu_fast.jsonio import write_json


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(v)


def report_markdown(name: str, result: dict) -> str:
    """Markdown of one run's results: headline TOFU numbers, the 9 utility parts, forget-split values, seconds per
    split, and the leak / copyright sections when present."""
    lines = [f"# Evaluation: {name}", ""]
    head = [(k, result[k]) for k in ("forget_quality", "model_utility", "forget_truth_ratio", "forget_prob",
                                     "forget_rougeL", "forget_samples") if k in result]
    if head:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in head] + [""]
    if "parts" in result:
        lines += ["Model utility parts (harmonic mean of these nine):", "", "| part | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in result["parts"].items()] + [""]
    if "seconds_per_split" in result:
        lines += ["| split | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in result["seconds_per_split"].items()] + [""]
    for section in ("copyright", "perplexity"):
        if section in result:
            value = result[section]
            rows = value.items() if isinstance(value, dict) else [(section, value)]
            lines += [f"## {section}", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in rows if not isinstance(v, (list, dict))] + [""]
    if "leak_table" in result:
        lines += ["## Leak probe", "", result["leak_table"]]
    return "\n".join(lines).rstrip() + "\n"


def epochs_markdown(name: str, points: list[dict]) -> str:
    """Markdown table of per-epoch points (``eval_epochs.json``): the curve's numbers and the time each took."""
    keys = ("model_utility", "forget_quality", "forget_truth_ratio", "forget_prob", "forget_rougeL",
            "eval_seconds", "train_seconds")
    lines = [f"# Per-epoch evaluation: {name}", "", "| epoch | " + " | ".join(keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {p['epoch']:g} | " + " | ".join("–" if p.get(k) is None else _fmt(p[k]) for k in keys) + " |"
              for p in points]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, name: str, result: dict) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "report.json", out / "report.md"
    write_json(js, {"name": name, **result})
    md.write_text(report_markdown(name, result), encoding="utf-8")
    return js, md
