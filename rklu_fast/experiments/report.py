"""The mini-TOFU report: JSON (everything measured), Markdown tables like the paper's Tables 3 and 8, a Figure-3-style
plot (forget quality against utility, one point per method, the original and the oracle marked) and per-epoch
curves.  Forget quality's axis is logarithmic below 0.05 and linear above, as in the paper's figure."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from rklu_fast.experiments.selection import FQ_THRESHOLD, best_grid_point
from rklu_fast.jsonio import finite, write_json

_LINEAR_SHARE = 0.3  # the linear part [0.05, 1] takes this share of the forget-quality axis


def groups(jobs: list[dict]) -> dict[str, list[dict]]:
    """Jobs by what they compare (method spec plus any label such as a teacher form), over lrs and seeds."""
    out = defaultdict(list)
    for j in jobs:
        out[j.get("label") or j["spec"]].append(j)
    return dict(out)


def method_points(jobs: list[dict]) -> dict[str, dict]:
    """Per group: the reported run (the best grid point by ``selection.best_grid_point``, seed 0 first)."""
    points = {}
    for name, runs in groups(jobs).items():
        seeds = sorted({r["seed"] for r in runs})
        first = [r for r in runs if r["seed"] == seeds[0]]
        points[name] = best_grid_point(first)
    return points


def seed_summary(jobs: list[dict]) -> dict[str, dict]:
    """Per label run with several seeds at one learning rate: geometric mean of forget quality at e*, arithmetic
    mean of utility at e* and of the best utility above FQ 0.05 (None where a seed has none), with min–max."""
    out = {}
    for label, runs in groups(jobs).items():
        by_lr = defaultdict(list)
        for r in runs:
            by_lr[r["lr"]].append(r)
        seeded = {lr: same for lr, same in by_lr.items() if len({r["seed"] for r in same}) >= 2}
        for lr, same in seeded.items():
            fq = [max(r["selected"]["forget_quality"], 1e-300) for r in same]
            ut = [r["selected"].get("utility") or 0.0 for r in same]
            above = [(r.get("best_utility_above_0.05") or {}).get("utility") for r in same]
            key = label if len(seeded) == 1 else f"{label} (lr {lr:g})"  # a label seeded at several lrs
            out[key] = {"lr": lr, "seeds": sorted(r["seed"] for r in same),
                        "fq_geomean": math.exp(sum(math.log(x) for x in fq) / len(fq)),
                        "fq_min": min(fq), "fq_max": max(fq),
                        "utility_mean": sum(ut) / len(ut), "utility_min": min(ut), "utility_max": max(ut),
                        "best_utility_above_mean": None if None in above else sum(above) / len(above)}
    return out


def _fmt(value, spec=".3f") -> str:
    if value is None:
        return "–"
    if spec == ".3f" and isinstance(value, float) and (0 < abs(value) < 1e-3):
        return f"{value:.2e}"
    return format(value, spec)


def _diverged(job: dict) -> str:
    """A mark for a run whose loss or gradient went non-finite: its figures are those of the epochs it reached."""
    if not job.get("diverged"):
        return ""
    return f" (diverged after epoch {job['epochs'][-1]['epoch']:g})"


def markdown(data: dict) -> str:
    ref, jobs = data["reference"], data["jobs"]
    m = data["machine"]
    split = data.get("forget_split", "forget10")
    lines = [f"# mini-TOFU: every method on {split} from one original ({data['experiment']['name']})", "",
             f"Command: `{data['command']}`  ", f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}  ",
             f"Date: {jobs[0]['date'] if jobs else '–'}", "",
             "Forget quality (FQ) = KS-test p-value of forget truth ratios against the oracle (retain90 model) on "
             f"TOFU's first 300 {split} questions (FQ-400: all of them, up to experiment.forget_rows; more questions "
             "make the test stricter). "
             "Utility = harmonic mean of the retain set's probability, ROUGE-L and truth ratio (first "
             f"{data['experiment']['retain_rows']} retain_perturbed rows); a model trained from scratch knows no "
             "real authors or world facts, so TOFU's 9-value model utility is not reported. Leak = fill-in-the-blank "
             f"top-5 rate on the first {data['experiment']['leak_rows']} forget questions. e* = the first epoch "
             "reaching the run's maximum FQ (the paper's rule); per method the learning rate whose e* has the "
             "highest FQ is shown.", "",
             "## Reference models", "", "| model | FQ | FQ-400 | forget prob | forget ROUGE-L | retain prob | "
             "retain ROUGE-L | retain truth ratio | utility | leak |", "|---|---|---|---|---|---|---|---|---|---|"]
    for role in ("original", "oracle"):
        r = ref[role]
        lines.append(f"| {role} | {_fmt(r['forget_quality'])} | {_fmt(r['forget_quality_all'])} | "
                     f"{_fmt(r['forget_prob'])} | {_fmt(r.get('forget_rougeL'))} | {_fmt(r['retain_prob'])} | "
                     f"{_fmt(r.get('retain_rougeL'))} | {_fmt(r['retain_truth_ratio'])} | {_fmt(r.get('utility'))} | "
                     f"{_fmt(r.get('leak_rate'))} |")
    lines += ["", "## Methods at e* (Tables 3 and 8)", "",
              "| method | lr | e* | FQ | FQ-400 | forget ROUGE-L | forget prob | retain prob | utility | leak | "
              f"best utility with FQ > {FQ_THRESHOLD} (epoch) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in method_points(jobs).items():
        s, b = run["selected"], run.get("best_utility_above_0.05")
        best = f"{_fmt(b['utility'])} ({b['epoch']:g})" if b else "none"
        lines.append(f"| {name}{_diverged(run)} | {_fmt(run['lr'], 'g')} | {_fmt(s['epoch'], 'g')} | "
                     f"{_fmt(s['forget_quality'])} | "
                     f"{_fmt(s.get('forget_quality_all'))} | {_fmt(s.get('forget_rougeL'))} | "
                     f"{_fmt(s['forget_prob'])} | {_fmt(s['retain_prob'])} | {_fmt(s.get('utility'))} | "
                     f"{_fmt(s.get('leak_rate'))} | {best} |")
    lines += ["", "## Every grid point (e* and the last epoch)", "",
              "| method | lr | seed | e* | FQ at e* | utility at e* | last epoch FQ | last epoch utility | "
              "seconds/epoch |", "|---|---|---|---|---|---|---|---|---|"]
    for j in sorted(jobs, key=lambda j: (j.get("label") or j["spec"], j["lr"] or 0, j["seed"])):
        s, last = j["selected"], j["epochs"][-1]
        secs = [p["train_seconds"] + p["eval_seconds"] for p in j["epochs"] if p.get("train_seconds")]
        lines.append(f"| {j.get('label') or j['spec']}{_diverged(j)} | {_fmt(j['lr'], 'g')} | {j['seed']} | "
                     f"{_fmt(s['epoch'], 'g')} | {_fmt(s['forget_quality'])} | {_fmt(s.get('utility'))} | "
                     f"{_fmt(last['forget_quality'])} | {_fmt(last.get('utility'))} | "
                     f"{_fmt(sum(secs) / len(secs), '.0f') if secs else '–'} |")
    diag = data.get("teacher_diagnostics")
    if diag:
        lines += ["", "## The teacher on the forget answers (per form and α)", "",
                  f"Positions: {diag['positions']}; mean logit drift of the augmented model mean(l_aug − l_o): "
                  f"{diag['mean_logit_drift']:.3f}; gold-token probability under the original: "
                  f"{diag['gold_prob_original']:.3f}.", "",
                  "| form | vocab share penalised | α | teacher top-1 = original's | teacher entropy | gold prob under "
                  "teacher |", "|---|---|---|---|---|---|"]
        for form, d in diag["forms"].items():
            for a, v in d["alpha"].items():
                lines.append(f"| {form} | {d['penalised_share']:.3f} | {a} | {v['top1_agreement']:.3f} | "
                             f"{v['entropy']:.3f} | {v['gold_prob_teacher']:.3f} |")
    seeds = seed_summary(jobs)
    if seeds:
        u0 = ref["original"].get("utility") or 0.0
        lines += ["", "## Seeds (geometric mean of FQ, mean utility; min–max)", "",
                  f"Goal: FQ > {FQ_THRESHOLD} with utility ≥ 0.85 × the original's ({0.85 * u0:.3f}).", "",
                  "| configuration | lr | seeds | FQ (geo mean) | FQ min–max | utility at e* (mean) | min–max | "
                  "mean best utility with FQ > 0.05 | goal met |", "|---|---|---|---|---|---|---|---|---|"]
        for label, v in seeds.items():
            met = v["fq_geomean"] > FQ_THRESHOLD and v["utility_mean"] >= 0.85 * u0
            lines.append(f"| {label} | {_fmt(v['lr'], 'g')} | {','.join(map(str, v['seeds']))} | "
                         f"{_fmt(v['fq_geomean'])} | {_fmt(v['fq_min'])}–{_fmt(v['fq_max'])} | "
                         f"{_fmt(v['utility_mean'])} | {_fmt(v['utility_min'])}–{_fmt(v['utility_max'])} | "
                         f"{_fmt(v['best_utility_above_mean'])} | {'yes' if met else 'no'} |")
    return "\n".join(lines) + "\n"


def _fq_axis(ax, low: float) -> None:
    """Logarithmic from ``low`` to 0.05, linear from 0.05 to 1 (the paper's Figure 3; the evaluator's
    ``dual_scale``), the linear part taking ``_LINEAR_SHARE`` of the axis whatever the smallest forget quality
    shown; decade ticks on the log part."""
    from rklu_fast.eval.plots import dual_scale

    lo, lo_min = math.log10(FQ_THRESHOLD), math.log10(low)
    forward, inverse = dual_scale((lo - lo_min) * _LINEAR_SHARE / (1 - _LINEAR_SHARE))  # in log-part units
    ax.set_xscale("function", functions=(forward, inverse))
    ax.set_xlim(low, 1.0)
    step = max(1, math.ceil((lo - lo_min) / 6))  # about six decade ticks
    top = math.floor(lo) - 1  # no decade tick next to the 0.05 one
    decades = [10.0 ** e for e in range(math.ceil(lo_min), top + 1) if (top - e) % step == 0]
    ticks = decades + [FQ_THRESHOLD, 0.25, 0.5, 0.75, 1.0]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=7)
    ax.axvline(FQ_THRESHOLD, color="grey", lw=0.8, ls="--")


def comparison(jobs: list[dict]) -> list[dict]:
    """The jobs of the comparison itself (``experiment.methods``), not of a plan."""
    return [j for j in jobs if j.get("plan", "methods") == "methods"]


def plot(data: dict, path: Path, every_plan: bool = False, title: str = "each method at e*") -> None:
    """Forget quality against utility, one point per label (of the comparison's jobs, or of every job)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = data["jobs"] if every_plan else comparison(data["jobs"])
    if not jobs:
        return
    ref, points = data["reference"], method_points(jobs)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    fqs = [p["selected"]["forget_quality"] for p in points.values()] + [ref[r]["forget_quality"] for r in ref]
    for i, (name, run) in enumerate(points.items()):
        s = run["selected"]
        if s.get("utility") is None:
            continue
        ax.scatter(s["forget_quality"], s["utility"], s=36)
        ax.annotate(name, (s["forget_quality"], s["utility"]), fontsize=7, textcoords="offset points",
                    xytext=(3, 3 if i % 2 == 0 else -10))  # alternate sides: neighbours' labels do not overlap
    for role, marker in (("original", "*"), ("oracle", "P")):
        r = ref[role]
        ax.scatter(r["forget_quality"], r["utility"], marker=marker, s=140, color="black", zorder=3)
        ax.annotate(role, (r["forget_quality"], r["utility"]), fontsize=8, xytext=(4, -10), textcoords="offset points")
    _fq_axis(ax, 10.0 ** math.floor(math.log10(min(max(min(fqs), 1e-300), 1e-3))))
    ax.set_xlabel("forget quality (KS p-value vs the oracle; log below 0.05, linear above)")
    ax.set_ylabel("utility (retain prob, ROUGE-L, truth ratio: harmonic mean)")
    ax.set_title(f"mini-TOFU, {data.get('forget_split', 'forget10')}: {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_curves(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = comparison(data["jobs"])
    points = {k: v for k, v in method_points(jobs).items() if v["trains"]} if jobs else {}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for name, run in points.items():
        ep = [p["epoch"] for p in run["epochs"]]
        axes[0].plot(ep, [max(p["forget_quality"], 1e-300) for p in run["epochs"]], marker=".", label=name)
        axes[1].plot(ep, [p["forget_prob"] for p in run["epochs"]], marker=".", label=name)
        axes[2].plot(ep, [p["retain_prob"] for p in run["epochs"]], marker=".", label=name)
    axes[0].set_yscale("log")
    axes[0].axhline(FQ_THRESHOLD, color="grey", lw=0.8, ls="--")
    for ax, title in zip(axes, ("forget quality", "forget-answer probability", "retain probability")):
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=10)
    if points:
        axes[2].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(stem: Path, data: dict) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    data = finite(data)
    data["seed_summary"] = seed_summary(data["jobs"])
    write_json(f"{stem}.json", data)
    Path(f"{stem}.md").write_text(markdown(data), encoding="utf-8")
    if data["jobs"]:
        plot(data, Path(f"{stem}.png"))
        plot_curves(data, Path(f"{stem}_curves.png"))
        if len(comparison(data["jobs"])) < len(data["jobs"]):
            plot(data, Path(f"{stem}_frontier.png"), every_plan=True, title="every configuration at e* (the frontier)")
