"""``rklu eval …``: TOFU evaluation, log aggregation, the leak probe, copyright-style metrics, the FQ–MU plot.

``register(subparsers)`` adds the ``eval`` command to the ``rklu`` CLI; ``python -m rklu_fast.eval.cli`` runs it alone.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _guarded(command):
    """Bad input → one clear line on stderr and exit status 2, not a traceback."""
    def run(args) -> int:
        try:
            return command(args) or 0
        except (ValueError, TypeError, FileNotFoundError) as e:
            print(f"rklu eval: error: {e}", file=sys.stderr)
            return 2
    return run


def _load_model(name: str, tokenizer: str | None, device: str, dtype: str, threads: int | None = None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rklu_fast.model_refs import from_pretrained, missing_local

    tokenizer_arg = "--tokenizer" if tokenizer else "model"
    for arg, ref in (("model", name), (tokenizer_arg, tokenizer or name)):  # both before the (slow) model load
        if missing_local(ref):
            raise FileNotFoundError(f"{arg}: no such folder {ref!r}")
    if threads is not None:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"  # TOFU evaluates in bf16 on GPUs
    model = from_pretrained(AutoModelForCausalLM, "model", name, dtype=getattr(torch, dtype)).to(device)
    return model, from_pretrained(AutoTokenizer, tokenizer_arg, tokenizer or name)


def _positive_int(text: str) -> int:
    """argparse type: the option's value must be a whole number ≥ 1 (checked before any model loads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder or hub id (AutoModelForCausalLM)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: the model's)")
    p.add_argument("--template", default="llama2", help="prompt template the model was trained with: llama2, phi, "
                                                        "plain (default: llama2)")
    p.add_argument("--device", default="auto", help="cuda, cpu, cuda:1 … (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: torch's; tiny models on a shared CPU are fastest with 1)")
    p.add_argument("--out", default=None, help="output folder (default: <model>/eval_results or ./eval_results)")


def _out_dir(args, sub: str) -> Path:
    if args.out:
        return Path(args.out)
    base = Path(args.model)
    return (base / "eval_results" / sub) if base.is_dir() else Path("eval_results") / sub


def _cmd_tofu(args) -> int:
    from rklu_fast.data import get_template
    from rklu_fast.eval.aggregate import aggregate
    from rklu_fast.eval.report import write_report
    from rklu_fast.eval.tofu import evaluate_tofu

    template = get_template(args.template)
    if args.retain_log and not Path(args.retain_log).is_file():  # fail before the long evaluation, not after
        raise FileNotFoundError(f"--retain-log: no such file {args.retain_log!r}")
    if args.data and Path(args.data).exists():  # a local --data is read (and its structure checked) before the model
        from rklu_fast.data import load_tofu

        load_tofu(f"{args.forget_split}_perturbed", args.data)
    model, tokenizer = _load_model(args.model, args.tokenizer, args.device, args.dtype, args.threads)
    out = _out_dir(args, f"ds_size{args.ds_size}")
    log, seconds = evaluate_tofu(model, tokenizer, template, forget_split=args.forget_split, source=args.data,
                                 ds_size=args.ds_size, batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens, out_dir=out, gen_chunk=args.gen_chunk)
    result = {**aggregate(log, args.retain_log), "seconds_per_split": seconds, "forget_split": args.forget_split,
              "model": args.model, "template": template.name, "ds_size": args.ds_size}
    js, md = write_report(out, args.name or Path(args.model).name, result)
    print(md.read_text(encoding="utf-8"))
    print(f"log: {out / 'eval_log_aggregated.json'}\nreport: {md}, {js}")
    return 0


def _cmd_aggregate(args) -> int:
    from rklu_fast.eval.aggregate import aggregate

    result = aggregate(args.model_log, args.retain)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    for key in ("model_utility", "forget_quality", "forget_truth_ratio"):
        if key in result:
            print(f"{key}: {result[key]:.6g}")
    for part, value in result["parts"].items():
        print(f"  {part}: {value:.6g}")
    return 0


def _cmd_leak(args) -> int:
    from rklu_fast.data import get_template, load_tofu
    from rklu_fast.eval.leak import leak_probe, leak_table
    from rklu_fast.eval.report import write_report

    rows = load_tofu(args.forget_split, args.data)[:args.max_questions]
    model, tokenizer = _load_model(args.model, args.tokenizer, args.device, args.dtype, args.threads)
    probe = leak_probe(model, tokenizer, get_template(args.template), rows, k=args.k,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    table = leak_table(probe, max_rows=args.rows)
    out = _out_dir(args, "leak")
    write_report(out, args.name or Path(args.model).name, {"leak": probe, "leak_table": table})
    print(table)
    print(f"report: {out / 'report.md'}")
    return 0


def _cmd_copyright(args) -> int:
    from rklu_fast.data import default_data_dir
    from rklu_fast.data.tofu import read_text_file
    from rklu_fast.eval.copyright import continuation_scores, perplexity, wikitext_segments
    from rklu_fast.eval.report import write_report

    if args.text and not Path(args.text).is_file():  # fail before loading the model
        raise FileNotFoundError(f"--text: no such file {args.text!r}")
    wikitext = args.wikitext or (default_data_dir("wikitext") or Path("wikitext")) / "wiki.test.raw"
    if not Path(wikitext).is_file():
        raise FileNotFoundError(f"--wikitext: no such file {str(wikitext)!r} (give WikiText-2's wiki.test.raw)")
    model, tokenizer = _load_model(args.model, args.tokenizer, args.device, args.dtype, args.threads)
    result = {}
    if args.text:
        text = read_text_file(args.text, "--text")
        result["copyright"] = continuation_scores(model, tokenizer, text, max_chunks=args.max_chunks,
                                                  batch_size=args.batch_size)
    segments = wikitext_segments(wikitext, n_segments=args.segments)
    result["perplexity"] = {"wikitext_ppl": perplexity(model, tokenizer, segments, batch_size=args.batch_size),
                            "segments": len(segments)}
    out = _out_dir(args, "copyright")
    _, md = write_report(out, args.name or Path(args.model).name, result)
    print(md.read_text(encoding="utf-8"))
    return 0


def _cmd_plot(args) -> int:
    from rklu_fast.data.tofu import read_json_file
    from rklu_fast.eval.plots import plot_fq_vs_mu

    runs = {}
    for path in args.reports:
        data = read_json_file(path, "reports")
        if isinstance(data, list):  # per-epoch points of one run
            runs[Path(path).stem] = data
        else:
            runs[data.get("name", Path(path).parent.name)] = data
    print(plot_fq_vs_mu(runs, args.out, title=args.title))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` (with subcommands tofu, aggregate, leak, copyright, plot) to an argparse subparsers object."""
    ev = subparsers.add_parser("eval", help="evaluate models: TOFU forget quality / model utility, leak probe, "
                                            "copyright-style metrics, plots",
                               description="Evaluate models and logs (see docs/evaluation.md).")
    sub = ev.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND")

    p = sub.add_parser("tofu", help="TOFU evaluation of a model: logs in TOFU's layout + report")
    _model_args(p)
    p.add_argument("--forget-split", default="forget10", choices=["forget01", "forget05", "forget10"])
    p.add_argument("--data", default=None, help="TOFU folder or hub id (default: ../shared/data/tofu, else hub)")
    p.add_argument("--ds-size", type=_positive_int, default=300, help="rows per split (TOFU: 300)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="cap generations (default: TOFU's max_length 200 for prompt + answer)")
    p.add_argument("--gen-chunk", type=_positive_int, default=64,
                   help="prompts per generate call (default 64; lower it if generation runs out of memory; "
                        "generations follow TOFU's batches of --batch-size whatever it is)")
    p.add_argument("--retain-log", default=None, help="the retain model's log, to compute forget quality")
    p.add_argument("--name", default=None, help="run name in the report (default: the model folder's name)")
    p.set_defaults(func=_guarded(_cmd_tofu))

    p = sub.add_parser("aggregate", help="model utility, forget quality and the 9 parts from logs")
    p.add_argument("model_log", help="eval_log_aggregated.json (TOFU) or TOFU_EVAL.json (open-unlearning)")
    p.add_argument("--retain", default=None, help="the retain model's log on the same forget split")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.set_defaults(func=_guarded(_cmd_aggregate))

    p = sub.add_parser("leak", help="fill-in-the-blank leak probe on forget questions (paper §5)")
    _model_args(p)
    p.add_argument("--forget-split", default="forget10")
    p.add_argument("--data", default=None)
    p.add_argument("--max-questions", type=_positive_int, default=None)
    p.add_argument("--k", type=_positive_int, default=5, help="beams = returned continuations (default 5)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=16)
    p.add_argument("--rows", type=_positive_int, default=10, help="example rows in the Markdown table")
    p.add_argument("--name", default=None)
    p.set_defaults(func=_guarded(_cmd_leak))

    p = sub.add_parser("copyright", help="BLEU / ROUGE-L of continuations of a forget text; WikiText perplexity")
    _model_args(p)
    p.add_argument("--text", default=None, help="the forget text (plain text file); omit for perplexity only")
    p.add_argument("--max-chunks", type=_positive_int, default=None)
    p.add_argument("--wikitext", default=None, help="wiki.test.raw (default: ../shared/data/wikitext/)")
    p.add_argument("--segments", type=_positive_int, default=200)
    p.add_argument("--name", default=None)
    p.set_defaults(func=_guarded(_cmd_copyright))

    p = sub.add_parser("plot", help="forget quality vs model utility across runs (log scale below 0.05)")
    p.add_argument("reports", nargs="+", help="report.json files (one point each) or JSON lists of "
                                             "{model_utility, forget_quality} points (one curve each)")
    p.add_argument("--out", default="fq_vs_mu.png")
    p.add_argument("--title", default=None)
    p.set_defaults(func=_guarded(_cmd_plot))
    return ev


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rklu")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\nrklu: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
