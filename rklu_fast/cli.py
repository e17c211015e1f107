"""``rklu``: the command line.  ``rklu run --config configs/tiny-tofu.yaml`` runs the whole pipeline.

Subcommands: finetune, augment, unlearn, run (all three, then the before/after summary), and eval (from
``rklu_fast.eval.cli`` when present).  Any config key can be overridden after the options as ``key=value``
(dotted for nested keys), e.g. ``rklu run --config configs/tiny-tofu.yaml unlearn.epochs=2 run_dir=runs/x``.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from rklu_fast.config import ConfigError, load_config

_STAGES = {"finetune": ("finetune",), "augment": ("augment",), "unlearn": ("unlearn",),
           "run": ("finetune", "augment", "unlearn")}
_HELP = {
    "finetune": "make the original model (on retain ∪ forget = TOFU full) and the oracle (on retain); skipped for "
                "models given as finetune.original / finetune.oracle",
    "augment": "fine-tune the original further on the forget set (the augmented model)",
    "unlearn": "distill the student (from the original) towards the teacher l_o - alpha*relu(l_aug - l_o), then "
               "print forget/retain answer probability before and after",
    "run": "finetune → augment → unlearn → summary; finished stages are skipped, so rerunning continues a run",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rklu", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="RKLU unlearning: reverse-KL distillation from an unlearning teacher (Wang et al., 2025).",
        epilog="examples:\n"
               "  rklu run --config configs/tiny-tofu.yaml                 # whole pipeline, tiny model, CPU\n"
               "  rklu run --config configs/tiny-tofu.yaml unlearn.epochs=2 run_dir=runs/short\n"
               "  rklu unlearn --config configs/llama2-7b-tofu.yaml unlearn.method=fklu\n"
               "  rklu run --config configs/tiny-tofu-lora.yaml            # LoRA adapters on one shared base\n"
               "  rklu run --config configs/tiny-tofu.yaml lora.enabled=true lora.r=8 run_dir=runs/lora\n"
               "  rklu run --config configs/tiny-tofu.yaml --resume        # continue a killed run")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in _HELP.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", required=True, help="YAML config (see configs/); keys not set take defaults")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides, dotted for nested keys: unlearn.alpha=4 data.forget=forget01")
        p.add_argument("--resume", action="store_true",
                       help="continue interrupted stages from their last epoch checkpoint (exact: weights, "
                            "optimizer, scheduler, RNG, data position)")
        p.add_argument("--stop-after-steps", type=int, default=None, metavar="N",
                       help="stop after N optimizer steps of the first stage that trains, as if killed (testing)")
        p.set_defaults(stages=_STAGES[name])
    methods = sub.add_parser("methods", help="list the unlearning methods (unlearn.method=...) and their papers",
                             description="The unlearning methods of unlearn.method, one line each, with their paper.")
    methods.set_defaults(func=_list_methods)
    from rklu_fast.experiments.cli import register as register_experiments

    register_experiments(sub)
    try:
        from rklu_fast.eval.cli import register
    except ImportError:
        pass
    else:
        register(sub)
    return parser


def _list_methods(args) -> int:
    from rklu_fast.train.methods import describe

    for name, summary, paper in describe():
        print(f"{name:8} {summary}\n{'':8} {paper}")
    print("\nretain terms (unlearn.retain_term): RT (NLL on the retain set), KL (forward KL to the original), none")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if not hasattr(args, "stages"):  # a subcommand registered by another module handles itself
            return args.func(args) or 0
        return _run_stages(args)
    except KeyboardInterrupt:  # Ctrl-C: one line, the conventional 128 + SIGINT status, no traceback
        hint = f"; continue with: {_resume_command(args)}" if hasattr(args, "stages") else ""
        print(f"\nrklu: interrupted{hint}", file=sys.stderr)
        return 130


def _resume_command(args) -> str:
    """The command line that continues ``args``' interrupted run (its config and overrides, with --resume)."""
    return shlex.join(["rklu", args.command, "--config", args.config, "--resume", *args.overrides])


def _run_stages(args) -> int:
    from transformers.utils import logging as hf_logging

    from rklu_fast.train.checkpoint import CheckpointError, CheckpointWriteError
    from rklu_fast.train.loop import NonFiniteError
    from rklu_fast.train.pipeline import Run

    hf_logging.disable_progress_bar()  # per-file load/save bars would drown the stage progress bars
    try:
        config = load_config(args.config, args.overrides)
        run = Run(config, resume=args.resume, stop_after_steps=args.stop_after_steps)
        run.preflight(args.stages)
    except (ConfigError, FileNotFoundError, CheckpointError) as e:
        print(f"rklu: error: {e}", file=sys.stderr)
        return 2
    run.save_run_info()
    if config["threads"]:
        import torch

        torch.set_num_threads(config["threads"])
    try:
        for stage in args.stages:
            if not getattr(run, stage)():
                return 3  # stopped early (--stop-after-steps): continue with --resume
    except CheckpointWriteError as e:
        print(f"rklu: error: {e}; once the cause is fixed, continue with: {_resume_command(args)}", file=sys.stderr)
        return 1
    except NonFiniteError as e:
        print(f"rklu: error: {e}", file=sys.stderr)
        return 4
    if "unlearn" in args.stages:
        run.summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
