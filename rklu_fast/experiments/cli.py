"""``rklu experiment …``: the experiments' command line (imports the experiment only when it runs)."""
from __future__ import annotations

import argparse
import sys


def _mini_tofu(args) -> int:
    from rklu_fast.config import ConfigError
    from rklu_fast.experiments.mini_tofu import Experiment

    try:
        exp = Experiment(args.config, args.overrides)
        if args.report_only:
            exp.write_report()
            return 0
        if args.job:
            specs = exp.job_specs(args.plan)
            found = [j for j in specs if j["id"] == args.job]
            if not found:
                raise ConfigError(f"--job: no job {args.job!r}; jobs: {[j['id'] for j in specs]}")
            exp.train_models()
            exp.run_job(found[0])
            return 0
        exp.run(jobs=args.jobs, only=args.only.split(",") if args.only else None, plan=args.plan)
    except (ConfigError, FileNotFoundError) as e:
        print(f"rklu experiment: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"rklu experiment: {e}", file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:
    p = sub.add_parser("experiment", help="experiments built on the pipeline (mini-tofu: the paper's comparison "
                                          "in miniature, docs/mini-tofu.md)")
    kinds = p.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    m = kinds.add_parser("mini-tofu", help="every method side by side on real TOFU data, a 5M model from scratch",
                         description="The paper's comparison in miniature: shared original/oracle/augmented models, "
                                     "every method of experiment.methods over the lr grid, per-epoch forget quality "
                                     "and utility, a report in experiment.out_dir (docs/mini-tofu.md).")
    m.add_argument("--config", required=True, help="e.g. configs/mini-tofu.yaml (its `experiment:` section)")
    m.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. experiment.jobs=1")
    m.add_argument("--plan", default=None, help="a plan of experiment.plans (default: experiment.methods)")
    m.add_argument("--jobs", type=int, default=None, help="jobs side by side (default: experiment.jobs)")
    m.add_argument("--only", default=None, help="comma-separated job ids or labels to run (e.g. rklu+RT)")
    m.add_argument("--job", default=None, help=argparse.SUPPRESS)  # one job, in this process (the pool's workers)
    m.add_argument("--report-only", action="store_true", help="rewrite the report from the finished jobs")
    m.set_defaults(func=_mini_tofu)
