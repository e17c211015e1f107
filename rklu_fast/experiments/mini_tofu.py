"""``rklu experiment mini-tofu``: the paper's comparison (its Figure 3 and Tables 3/8) in miniature, on the real TOFU
files, at a size a 2-core machine trains (docs/mini-tofu.md).

1. Shared models, trained once under ``<run_dir>/models`` by the pipeline's own stages: the original (TOFU
   ``full``), the oracle (``retain90``, same recipe) and the augmented model (the original continued on the forget
   set).  The harness first prints whether the experiment can say anything: the original's forget quality must be
   far below 0.05 and it must answer its training questions.
2. Jobs: every (method, learning rate, seed) of the ``experiment`` section unlearns the forget set from the same
   original with the pipeline's ``unlearn`` stage (``<run_dir>/methods/<job>``), evaluated after every epoch with
   forward passes only (``evaluation.Scorer``); each epoch's weights are kept until the job picks its points:
   e* (the paper's rule, ``selection.py``), the last epoch, and the epochs above forget quality 0.05 (for the best
   utility there), which get greedy ROUGE-L and the leak probe.  Each job writes ``<run_dir>/results/<job>.json``:
   a rerun skips finished jobs and an interrupted job resumes from its last epoch checkpoint.  Jobs run as
   single-threaded subprocesses, ``experiment.jobs`` at a time.
3. Report: ``<out_dir>/mini_tofu_<date>.{json,md,png}`` and ``..._curves.png`` (``report.py``).
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
import yaml

from rklu_fast.config import ConfigError, load_config
from rklu_fast.experiments import report
from rklu_fast.experiments.evaluation import Scorer, utility
from rklu_fast.experiments.selection import FQ_THRESHOLD, best_utility_above, selected_epoch
from rklu_fast.jsonio import write_json

DEFAULTS = {
    # the plan run when no --plan is given; `plans` may name others. An entry is "METHOD[+RETAIN]" or a mapping
    # {spec, label, overrides: [unlearn.* = …], lrs, seeds, eval_every, lr: best} (docs/mini-tofu.md, "Plans").
    "methods": ["rklu", "rklu+RT", "rklu+KL", "fklu+RT", "ga", "ga+RT", "npo+RT", "simnpo+RT", "idk+RT", "dpo+RT",
                "ta", "teacher"],
    "plans": {},
    "lrs": [3.0e-5, 1.0e-4, 3.0e-4],   # the unlearning-lr grid every trained method gets
    "seeds": [0],
    "jobs": 2,                         # single-threaded jobs side by side
    "forget_rows": 400,                # forget quality on TOFU's first 300 and on all rows
    "retain_rows": 100,                # utility on the first 100 rows of retain_perturbed
    "leak_rows": 100,                  # leak probe on the first 100 forget questions
    "eval_batch_size": 32,
    "eval_every": 1,                   # epochs between forward-only evaluations (always the first and the last)
    "max_new_tokens": None,            # greedy budget (None: TOFU's max_length-200 rule)
    "out_dir": "benchmarks/results",
    "require_informative": True,       # refuse to run methods when the original already looks unlearned
    "name": "mini_tofu",
}
UNTRAINED = ("ta", "teacher")


def split_method(spec: str) -> tuple[str, str]:
    """``"rklu+RT"`` → ``("rklu", "RT")``; ``"ga"`` → ``("ga", "none")``."""
    method, _, retain = spec.partition("+")
    return method, retain or "none"


def job_id(spec: str, lr: float | None, seed: int) -> str:
    return spec if lr is None else f"{spec}_lr{lr:g}_seed{seed}"


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


class Experiment:
    """The experiment of one config file (``experiment`` section over ``DEFAULTS``) and CLI overrides."""

    def __init__(self, config_path: str | Path, overrides: list[str] = (), command: str | None = None):
        self.config_path, self.overrides = str(config_path), list(overrides)
        self.cfg = load_config(config_path, overrides)
        given = self.cfg["experiment"] or {}
        unknown = sorted(set(given) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"experiment: unknown keys {unknown}; valid keys: {sorted(DEFAULTS)}")
        self.exp = {**DEFAULTS, **given}
        for plan in [None, *self.exp["plans"]]:
            for entry in self.entries(plan):
                if "spec" in entry:
                    self._check_spec(entry["spec"])
        self.root = Path(self.cfg["run_dir"])
        self.models = self.root / "models"
        self.results = self.root / "results"
        self.command = command or "rklu experiment mini-tofu " + " ".join(
            shlex.quote(a) for a in ["--config", self.config_path, *self.overrides])
        self._scorer = None
        self.plan: str | None = None

    @staticmethod
    def _check_spec(spec: str) -> None:
        from rklu_fast.train.methods import METHODS, RETAIN_TERMS

        method, retain = split_method(spec)
        if method not in METHODS or retain not in RETAIN_TERMS:
            raise ConfigError(f"experiment.methods: {spec!r} is not METHOD[+RETAIN] with a method of "
                              f"{list(METHODS)} and a retain term of {list(RETAIN_TERMS)}")

    # ------------------------------------------------------------------ configs of the pieces
    def _stage_config(self, run_dir: Path, extra: list[str]) -> dict:
        return load_config(self.config_path, [*self.overrides, f"run_dir={run_dir}", "experiment=null", *extra])

    def models_config(self) -> dict:
        return self._stage_config(self.models, [])

    _ENTRY_KEYS = {"spec", "label", "overrides", "lrs", "seeds", "eval_every", "lr", "best_of"}

    def entries(self, plan: str | None = None) -> list[dict]:
        """The normalised entries of ``plan`` (None: ``experiment.methods``)."""
        if plan is not None and plan not in self.exp["plans"]:
            raise ConfigError(f"--plan: no plan {plan!r}; experiment.plans has {sorted(self.exp['plans'])}")
        raw = self.exp["methods"] if plan is None else self.exp["plans"][plan]
        out = []
        for item in raw:
            entry = {"spec": item} if isinstance(item, str) else dict(item)
            unknown = sorted(set(entry) - self._ENTRY_KEYS)
            if unknown or not ({"spec", "best_of"} & set(entry)):
                raise ConfigError(f"experiment plan entry {item!r}: needs `spec` (or `best_of`); unknown keys "
                                  f"{unknown}; valid keys {sorted(self._ENTRY_KEYS)}")
            out.append(entry)
        return out

    def job_specs(self, plan: str | None = None) -> list[dict]:
        jobs = []
        for entry in self.entries(plan):
            entry = self._resolve(entry)
            spec = entry["spec"]
            method, retain = split_method(spec)
            label = entry.get("label") or spec
            common = {"spec": spec, "label": label, "method": method, "retain": retain, "plan": plan or "methods",
                      "overrides": list(entry.get("overrides", [])), "eval_every": entry.get("eval_every")}
            if method in UNTRAINED:
                jobs.append({**common, "id": job_id(label, None, 0), "lr": None, "seed": self.cfg["seed"]})
                continue
            lrs = [entry["lr"]] if "lr" in entry else entry.get("lrs", self.exp["lrs"])
            for lr in lrs:
                for seed in entry.get("seeds", self.exp["seeds"]):
                    jobs.append({**common, "id": job_id(label, lr, seed), "lr": float(lr), "seed": int(seed)})
        unique = {}
        for j in jobs:  # `best_of` may resolve to an entry listed too: one job (one run directory) per id
            unique.setdefault(j["id"], j)
        return list(unique.values())

    def _finished_result(self, path: Path) -> dict:
        """A finished job's result; one evaluated with other settings cannot stand next to this run's."""
        result = json.loads(path.read_text())
        made_with = result.get("eval_settings")
        if made_with is not None and made_with != self.eval_settings():
            raise ConfigError(f"{path}: evaluated with {made_with}, this config says {self.eval_settings()}; move "
                              "the results folder aside (or restore those settings) before running again")
        return result

    def _finished(self) -> list[dict]:
        return [self._finished_result(p) for p in sorted(self.results.glob("*.json"))
                if p.name != "reference.json" and not p.name.startswith("teacher_")]

    def _resolve(self, entry: dict) -> dict:
        """``best_of: PLAN``: the entry of PLAN whose runs did best (``selection.best_configuration``);
        ``lr: best``: the learning rate of the label's best seed-0 grid point.  Both read finished results."""
        from rklu_fast.experiments.selection import best_configuration, best_grid_point

        if "best_of" in entry:
            candidates = {e.get("label") or e["spec"]: e for e in self.entries(entry["best_of"])
                          if "spec" in e and split_method(e["spec"])[0] not in UNTRAINED}
            runs = [r for r in self._finished() if r.get("label", r["spec"]) in candidates]
            if not runs:
                raise ConfigError(f"best_of: {entry['best_of']!r}: no finished runs of that plan yet; run "
                                  f"`--plan {entry['best_of']}` first")
            best = best_configuration(runs)
            entry = {**candidates[best], **{k: v for k, v in entry.items() if k != "best_of"}}
        if entry.get("lr") == "best":
            label = entry.get("label") or entry["spec"]
            runs = [r for r in self._finished() if r.get("label", r["spec"]) == label and r["seed"] == 0]
            if not runs:
                raise ConfigError(f"lr: best: no finished seed-0 runs of {label!r} yet; run its lr grid first")
            entry = {**entry, "lr": best_grid_point(runs)["lr"]}
        return entry

    def job_config(self, job: dict) -> dict:
        extra = [f"finetune.original={self.models / 'original' / 'model'}",
                 f"finetune.oracle={self.models / 'oracle' / 'model'}",
                 f"augment.model={self.models / 'augmented' / 'model'}",
                 f"unlearn.method={job['method']}", f"unlearn.retain_term={job['retain']}", f"seed={job['seed']}",
                 "threads=1", *job.get("overrides", [])]
        if job["lr"] is not None:
            extra.append(f"unlearn.lr={job['lr']}")
        if self.cfg["model"]["train_tokenizer"]:  # the BPE the shared models' run trained
            extra += [f"model.tokenizer={self.models / 'tokenizer'}", "model.train_tokenizer=null"]
        return self._stage_config(self.root / "methods" / job["id"], extra)

    # ------------------------------------------------------------------ step 1: shared models
    def train_models(self) -> None:
        from rklu_fast.train.pipeline import Run

        if self.cfg["threads"]:
            torch.set_num_threads(self.cfg["threads"])
        run = Run(self.models_config(), resume=True)
        run.preflight(("finetune", "augment"))  # refuses cached models made with another recipe
        if all(Path(run.model_path(role)).is_dir() for role in ("original", "oracle", "augmented")):
            print(f"[experiment] shared models: cached in {self.models}")
            return  # their config.yaml stays the one they were trained with
        run.save_run_info()
        t0 = time.perf_counter()
        if not (run.finetune() and run.augment()):
            raise RuntimeError("models: a stage stopped early")
        print(f"[experiment] shared models ready in {self.models} ({time.perf_counter() - t0:.0f} s this call)")

    def scorer(self, tokenizer, template) -> Scorer:
        if self._scorer is None:
            e = self.exp
            self._scorer = Scorer(tokenizer, template, forget_split=self.cfg["data"]["forget"],
                                  source=self.cfg["data"]["source"], forget_rows=e["forget_rows"],
                                  retain_rows=e["retain_rows"], leak_rows=e["leak_rows"],
                                  batch_size=e["eval_batch_size"], max_new_tokens=e["max_new_tokens"])
        return self._scorer

    def eval_settings(self) -> dict:
        """What the cached evaluations depend on besides the models: a cached file made with others is stale."""
        return {"forget_split": self.cfg["data"]["forget"],
                **{k: self.exp[k] for k in ("forget_rows", "retain_rows", "leak_rows", "max_new_tokens")}}

    def _cached(self, path: Path, settings: dict) -> dict | None:
        """The JSON at ``path`` without its ``settings``, or None when it is missing or was made with other
        settings (a file from before settings were recorded is taken as it is)."""
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        made_with = data.pop("settings", None)
        if made_with is not None and made_with != settings:
            print(f"[experiment] {path} was made with {made_with}, not {settings}: computing it again")
            return None
        return data

    def reference_points(self) -> dict:
        """The original's and the oracle's full evaluation (cached in ``results/reference.json``)."""
        path = self.results / "reference.json"
        cached = self._cached(path, self.eval_settings())
        if cached is not None:
            return cached
        from rklu_fast.train.pipeline import Run

        run = Run(self.models_config())
        run.preflight(())
        scorer = self.scorer(run.tokenizer, run.template)
        points = {}
        for role in ("oracle", "original"):
            model = run.load_model(run.model_path(role))
            t0 = time.perf_counter()
            values = scorer.losses(model)
            stat = values.pop("forget_stat")
            points[role] = {"stat": stat, "stat_all": stat + scorer.rest(model), **values}
            points[role].update(scorer.generations(model))
            points[role]["utility"] = utility(points[role]["retain_prob"], points[role]["retain_rougeL"],
                                              points[role]["retain_truth_ratio"])
            points[role]["eval_seconds"] = time.perf_counter() - t0
        oracle = points["oracle"]
        for role in points:
            points[role]["forget_quality"] = scorer.forget_quality(points[role]["stat"], oracle["stat"])
            points[role]["forget_quality_all"] = scorer.forget_quality(points[role]["stat_all"], oracle["stat_all"])
        write_json(path, {**points, "settings": self.eval_settings()})
        return points

    def check_informative(self, ref: dict) -> None:
        o, r = ref["original"], ref["oracle"]
        print("[experiment] is the comparison informative?\n"
              f"  forget quality of the original (KS vs oracle, {self.scorer_rows()} questions): "
              f"{o['forget_quality']:.3g}   (must be far below {FQ_THRESHOLD})\n"
              f"  forget-answer probability: original {o['forget_prob']:.3f}, oracle {r['forget_prob']:.3f}\n"
              f"  retain probability:        original {o['retain_prob']:.3f}, oracle {r['retain_prob']:.3f}\n"
              f"  utility (retain prob, ROUGE-L, truth ratio): original {o['utility']:.3f}, oracle {r['utility']:.3f}")
        if self.exp["require_informative"] and (o["forget_quality"] >= 1e-3 or o["forget_prob"] <= r["forget_prob"]):
            raise RuntimeError("the original is not distinguishable from the oracle (forget quality ≥ 1e-3 or no "
                               "higher forget probability): train it longer (finetune.epochs / lr) before comparing "
                               "unlearning methods, or set experiment.require_informative=false")

    def scorer_rows(self) -> int:
        return min(300, self.exp["forget_rows"])

    def teacher_diagnostics(self) -> dict:
        """Per teacher form and α: how the teacher treats the forget answers (``diagnostics.py``); cached."""
        path = self.results / "teacher_diagnostics.json"
        alphas = sorted({float(o.split("=", 1)[1]) for plan in self.exp["plans"] for e in self.entries(plan)
                         for o in e.get("overrides", []) if o.startswith("unlearn.alpha=")}
                        | {float(self.cfg["unlearn"]["alpha"])})
        settings = {"forget_split": self.cfg["data"]["forget"], "alphas": alphas}
        cached = self._cached(path, settings)
        if cached is not None:
            return cached
        from rklu_fast.experiments.diagnostics import teacher_diagnostics
        from rklu_fast.train.pipeline import Run

        run = Run(self.models_config())
        run.preflight(())
        original = run.load_model(run.model_path("original"))
        augmented = run.load_model(run.model_path("augmented"))
        out = teacher_diagnostics(original, augmented, run.encode(run.forget_records), run.tokenizer.pad_token_id,
                                  alphas=alphas)
        write_json(path, {**out, "settings": settings})
        return out

    # ------------------------------------------------------------------ step 2: one job
    def run_job(self, job: dict) -> dict:
        """Unlearn with one (method, lr, seed), evaluate its epochs, pick its points; writes its result file."""
        from safetensors.torch import load_file, save_file

        from rklu_fast.train.loop import NonFiniteError
        from rklu_fast.train.pipeline import Run

        out = self.results / f"{job['id']}.json"
        if out.is_file():
            return self._finished_result(out)
        ref = self.reference_points()
        cfg = self.job_config(job)
        if job["method"] not in UNTRAINED and cfg["unlearn"]["epochs"] < 1:
            raise ConfigError(f"unlearn.epochs: {cfg['unlearn']['epochs']}; the experiment selects among epochs "
                              "1, 2, …, so a trained method needs at least one epoch")
        job_dir = Path(cfg["run_dir"])
        run = Run(cfg, resume=True)
        run.preflight(("unlearn",))
        run.save_run_info()
        torch.set_num_threads(1)
        scorer = self.scorer(run.tokenizer, run.template)
        progress = job_dir / "epochs.json"
        points = json.loads(progress.read_text()) if progress.is_file() else []
        weights = job_dir / "epoch_weights"
        last_end = [time.perf_counter()]
        every, total_epochs = job.get("eval_every") or self.exp["eval_every"], cfg["unlearn"]["epochs"]

        def on_epoch(epoch, model):
            nonlocal points
            points = [p for p in points if p["epoch"] <= epoch]
            if any(p["epoch"] == epoch for p in points) or (epoch % every and epoch not in (1, total_epochs)):
                last_end[0] = time.perf_counter()
                return
            t0 = time.perf_counter()
            values = scorer.losses(model)
            stat = values.pop("forget_stat")
            point = {"epoch": epoch, "forget_quality": scorer.forget_quality(stat, ref["oracle"]["stat"]), **values,
                     "train_seconds": t0 - last_end[0] if epoch > 0 else None, "stat": stat}
            point["eval_seconds"] = time.perf_counter() - t0
            if job["method"] not in UNTRAINED:  # the weights of each evaluated epoch, until the job picks its points
                weights.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                          weights / f"epoch-{epoch:g}.safetensors")
            points.append(point)
            write_json(progress, points)
            last_end[0] = time.perf_counter()

        t_start = time.perf_counter()
        diverged, chosen = None, set()
        if job["method"] in UNTRAINED:
            run.unlearn()
            model = run.load_model(run.model_path("unlearned"))
            on_epoch(0, model)
            chosen = {0}
        else:
            try:
                finished = run.unlearn(on_epoch=on_epoch)
            except NonFiniteError as e:  # a result all the same: the epochs it reached, marked diverged
                diverged, finished = str(e), True
                print(f"[experiment] {job['id']}: diverged ({e}); reporting the epochs it reached", flush=True)
            if not finished:
                raise RuntimeError(f"job {job['id']}: the unlearn stage stopped early")
        trained = [p for p in points if p["epoch"] >= 1]
        if trained:
            e_star, last = selected_epoch(points)["epoch"], trained[-1]["epoch"]
            above = [p["epoch"] for p in trained if p["forget_quality"] > FQ_THRESHOLD]
            chosen = {e_star, last, *above}
        base = None
        for p in points:  # generations at the chosen epochs, from the kept weights
            if p["epoch"] not in chosen:
                continue
            if job["method"] in UNTRAINED:
                model = run.load_model(run.model_path("unlearned"))
            else:
                if base is None:
                    base = run.load_model(run.model_path("original"))
                base.load_state_dict(load_file(weights / f"epoch-{p['epoch']:g}.safetensors"))
                model = base
            t0 = time.perf_counter()
            leak = job["method"] in UNTRAINED or p["epoch"] in (e_star, last)
            p["forget_quality_all"] = scorer.forget_quality(p["stat"] + scorer.rest(model), ref["oracle"]["stat_all"])
            p.update(scorer.generations(model, leak=leak))
            p["utility"] = utility(p["retain_prob"], p["retain_rougeL"], p["retain_truth_ratio"])
            p["generation_seconds"] = time.perf_counter() - t0
        result = {"job": job["id"], "plan": job.get("plan"), "spec": job["spec"], "label": job["label"],
                  "overrides": job.get("overrides", []),
                  "method": job["method"], "retain_term": job["retain"],
                  "lr": job["lr"], "seed": job["seed"], "trains": job["method"] not in UNTRAINED,
                  "unlearn": {k: cfg["unlearn"][k] for k in ("alpha", "beta", "delta", "forget_weight", "epochs",
                                                              "batch_size", "retain_weight", "teacher_form")},
                  "eval_settings": self.eval_settings(), "epochs": points, "diverged": diverged,
                  "wall_seconds": time.perf_counter() - t_start,
                  "command": self.command + (f" --plan {shlex.quote(self.plan)}" if self.plan else "")
                  + f" --job {shlex.quote(job['id'])}", "machine": machine(),
                  "date": date.today().isoformat()}
        points = [{k: v for k, v in p.items() if k != "stat"} for p in points]  # the statistics stay in epochs.json
        trained = [p for p in points if p["epoch"] >= 1]
        result["epochs"] = points
        result["selected"] = selected_epoch(points) if trained else points[0]
        result["best_utility_above_0.05"] = best_utility_above(points) if trained else None
        write_json(out, result)
        for f in weights.glob("*.safetensors") if weights.is_dir() else ():  # keep only what the report cites
            if float(f.stem.removeprefix("epoch-")) not in ({result["selected"]["epoch"], points[-1]["epoch"]}):
                f.unlink()
        return result

    # ------------------------------------------------------------------ steps 2-3: all jobs, then the report
    def run(self, jobs: int | None = None, only: list[str] | None = None, plan: str | None = None) -> Path:
        self.plan = plan
        self._finished()  # refuses first when finished jobs were evaluated with other settings
        self.train_models()
        ref = self.reference_points()
        self.check_informative(ref)
        if plan is not None and any(split_method(e.get("spec", "rklu"))[0] in ("rklu", "fklu", "teacher")
                                    for e in self.entries(plan)):
            self.teacher_diagnostics()
        pending = [j for j in self.job_specs(plan) if not (self.results / f"{j['id']}.json").is_file()
                   and (only is None or j["id"] in only or j["label"] in only)]
        workers = jobs or self.exp["jobs"]
        print(f"[experiment] {len(pending)} jobs to run, {workers} at a time")
        if workers <= 1:
            for j in pending:
                self.run_job(j)
        else:
            self._run_subprocesses(pending, workers)
        return self.write_report()

    def _run_subprocesses(self, pending: list[dict], workers: int) -> None:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        running: list[tuple[dict, subprocess.Popen, float]] = []
        failed = []
        queue = list(pending)
        while queue or running:
            while queue and len(running) < workers:
                j = queue.pop(0)
                cmd = [sys.executable, "-m", "rklu_fast.cli", "experiment", "mini-tofu", "--config",
                       self.config_path, "--job", j["id"], *(["--plan", self.plan] if self.plan else []),
                       *self.overrides]
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                with open(logs / f"{j['id']}.log", "w") as log:  # the child keeps its own handle
                    running.append((j, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                                    time.perf_counter()))
                print(f"[experiment] started {j['id']} (log: {logs / (j['id'] + '.log')})", flush=True)
            time.sleep(2)
            for item in list(running):
                j, proc, t0 = item
                if proc.poll() is not None:
                    running.remove(item)
                    status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                    if proc.returncode:
                        failed.append(j["id"])
                    print(f"[experiment] {j['id']}: {status} in {time.perf_counter() - t0:.0f} s", flush=True)
        if failed:
            raise RuntimeError(f"jobs failed: {failed}; see {logs}")

    def write_report(self) -> Path:
        results = self._finished()
        ref = self.reference_points()
        diagnostics = self.results / "teacher_diagnostics.json"
        out_dir = Path(self.exp["out_dir"])
        stem = out_dir / f"{self.exp['name']}_{date.today().isoformat()}"
        data = {"command": self.command, "config": yaml.safe_load(Path(self.config_path).read_text()),
                "overrides": self.overrides, "experiment": self.exp, "machine": machine(),
                "forget_split": self.cfg["data"]["forget"],
                "reference": {k: {kk: vv for kk, vv in v.items() if kk not in ("stat", "stat_all")}
                              for k, v in ref.items()},
                "teacher_diagnostics": json.loads(diagnostics.read_text()) if diagnostics.is_file() else None,
                "jobs": results}
        report.write_all(stem, data)
        print(f"[experiment] report: {stem}.json, .md, .png, _curves.png")
        return stem
