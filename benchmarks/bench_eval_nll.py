"""TOFU evaluation's loss pass with and without shared prefixes (``rklu_fast.eval.nll``).

    python benchmarks/bench_eval_nll.py                         # CPU, a 45M-parameter Llama, forget01, 10 rows
    python benchmarks/bench_eval_nll.py --hidden 64 --layers 2  # the tiny config's scale (overhead-bound)
    python benchmarks/bench_eval_nll.py --device cuda --hidden 2048 --layers 24 --ds-size 300

The examples are those of TOFU's four tasks (``TofuEvaluator``: every row's answer, base answer and perturbed
answers, distinct pairs once), tokenised with a BPE trained on the TOFU text; the model is a random Llama of the
given width and depth (speed does not depend on the weights' values). Each mode runs ``--repeats`` times after a
warm-up; the report gives the median seconds, the padded tokens each mode feeds the model and the largest relative
difference of the per-example mean losses. Results: ``bench_eval_nll_<device>_<date>.{json,md}`` in ``--out``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # rklu_fast from this checkout when not installed
from rklu_fast.data import get_template, load_tofu  # noqa: E402
from rklu_fast.data.tokenizer import train_bpe_tokenizer  # noqa: E402
from rklu_fast.eval.nll import _prefix_groups, _shared_batches, sequence_nll  # noqa: E402
from rklu_fast.eval.tofu import TofuEvaluator  # noqa: E402

SCHEMA = "rklu_fast.bench_eval_nll/1"
RESULTS = Path(__file__).resolve().parent / "results"


def padded_tokens(examples: list[dict], batch_size: int, share: bool) -> int:
    """Token positions (padding included) each mode feeds the model: its real work on a compute-bound device."""
    if not share:
        lengths = sorted(len(e["input_ids"]) for e in examples)
        return sum(max(lengths[s:s + batch_size]) * len(lengths[s:s + batch_size])
                   for s in range(0, len(lengths), batch_size))
    total = 0
    for prefixes, idx, owner in _shared_batches(examples, _prefix_groups(examples), batch_size):
        total += max(map(len, prefixes)) * len(prefixes)
        total += max(len(examples[i]["input_ids"]) - len(prefixes[g]) for i, g in zip(idx, owner)) * len(idx)
    return total


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary trained on the TOFU text")
    ap.add_argument("--forget-split", default="forget01")
    ap.add_argument("--ds-size", type=int, default=10, help="rows per TOFU task (TOFU: 300)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--source", default=None, help="TOFU folder or hub id (default: ../shared/data/tofu)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    texts = [r["question"] + " " + r["answer"] for r in load_tofu("full", args.source)]
    tok = train_bpe_tokenizer(texts, args.vocab)
    evaluator = TofuEvaluator(tok, get_template("llama2"), forget_split=args.forget_split, source=args.source,
                              ds_size=args.ds_size, max_new_tokens=1)
    examples = [e for p in evaluator.tasks for e in p.examples]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=int(2.6875 * args.hidden),
                      num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 1),
                      max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).to(args.device, getattr(torch, args.dtype)).eval()

    rows, values = [], {}
    for share in (False, True):
        sequence_nll(model, examples, tok.pad_token_id, batch_size=args.batch_size, share_prefix=share)  # warm-up
        times = []
        for _ in range(args.repeats):
            sync(args.device)
            t0 = time.perf_counter()
            sums, counts = sequence_nll(model, examples, tok.pad_token_id, batch_size=args.batch_size,
                                        share_prefix=share)
            sync(args.device)
            times.append(time.perf_counter() - t0)
        values[share] = sums / counts
        rows.append({"share_prefix": share, "seconds_median": statistics.median(times), "seconds": times,
                     "padded_tokens": padded_tokens(examples, args.batch_size, share)})
    whole, shared = rows
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()}, {args.threads} threads"
    report = {
        "schema": SCHEMA, "date": dt.date.today().isoformat(), "device": device_name, "torch": torch.__version__,
        "model": {"hidden": args.hidden, "layers": args.layers, "vocab": len(tok), "dtype": args.dtype,
                  "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)},
        "examples": len(examples), "ds_size": args.ds_size, "forget_split": args.forget_split,
        "batch_size": args.batch_size, "rows": rows,
        "speedup": whole["seconds_median"] / shared["seconds_median"],
        "token_ratio": shared["padded_tokens"] / whole["padded_tokens"],
        "max_rel_diff_mean_loss": float(np.max(np.abs(values[True] - values[False]) / np.abs(values[False]))),
    }
    slug = "cuda" if args.device.startswith("cuda") else f"cpu-{args.threads}t"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_eval_nll_{slug}_h{args.hidden}l{args.layers}_{report['date']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    stem.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return report


def markdown(r: dict) -> str:
    m = r["model"]
    lines = [f"# TOFU loss pass, shared prefixes ({r['date']}, {r['device']}, torch {r['torch']})", "",
             f"Random Llama {m['params_M']}M parameters (hidden {m['hidden']}, {m['layers']} layers, vocab "
             f"{m['vocab']}, {m['dtype']}); {r['examples']} examples = TOFU's four tasks, {r['ds_size']} rows each "
             f"({r['forget_split']}), batch {r['batch_size']}.", "",
             "| mode | median s | padded tokens |", "|---|---:|---:|"]
    for row in r["rows"]:
        mode = "shared prefixes" if row["share_prefix"] else "whole sequences"
        lines.append(f"| {mode} | {row['seconds_median']:.3f} | {row['padded_tokens']} |")
    lines += ["", f"Speed-up {r['speedup']:.2f}×, tokens {r['token_ratio']:.2f}× of whole sequences; largest "
              f"relative difference of a mean loss {r['max_rel_diff_mean_loss']:.1e}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
