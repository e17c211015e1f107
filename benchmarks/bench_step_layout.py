"""CPU step time of the shipped optimizer step, before and after the data-layout changes: a two-tensor teacher cache
with micro-batches in drawing order ("before") against the one-tensor cache (``teacher.store=combined``) with
length-grouped micro-batches ("after").  Real TOFU lengths (forget10 / retain90 tokenised by a BPE trained on the
TOFU text), the mini-TOFU architecture (5.3M parameters, vocab 4096), batch 32 in micro-batches of ``--micro``,
RKLU + RT, clipping, one host sync per step (``loop.optimizer_step``); the variants alternate step by step so
machine load falls on both alike.

    python benchmarks/bench_step_layout.py --steps 12 --micro 8
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from rklu_fast.data import encode_qa, get_template, load_tofu
from rklu_fast.jsonio import write_report


def main() -> None:
    from accelerate import Accelerator
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rklu_fast.data.tokenizer import train_bpe_tokenizer
    from rklu_fast.train.frozen import Frozen
    from rklu_fast.train.loop import ExampleStream, optimizer_step
    from rklu_fast.train.lowmem import build_optimizer, parameter_groups
    from rklu_fast.train.methods import make_method, make_retain_term
    from rklu_fast.train.teacher_cache import CacheKey, CachedTeacher, build_forget_cache, model_logits_fn

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12, help="measured steps per variant (after one warm-up step)")
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    template = get_template("llama2")
    forget_r, retain_r = load_tofu("forget10"), load_tofu("retain90")
    folder = Path(tempfile.mkdtemp())
    train_bpe_tokenizer([template.full(r["question"], r["answer"]) for r in forget_r + retain_r], 4096
                        ).save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.pad_token or tok.eos_token
    enc = [[dict(encode_qa(tok, template, r["question"], r["answer"], 256), index=i) for i, r in enumerate(rs)]
           for rs in (forget_r, retain_r)]
    forget, retain = enc
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)

    def model(seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)

    original, augmented = model(1).eval(), model(2).eval()
    key = CacheKey("o", "a", "d", "t", "float32", len(tok))
    logits_fn = model_logits_fn(original, augmented)
    caches = {"pair": build_forget_cache(logits_fn, forget, key, pad_token_id=tok.pad_token_id, micro_batch_size=16),
              "combined": build_forget_cache(logits_fn, forget, dataclasses.replace(key, store="combined", alpha=8.0),
                                             pad_token_id=tok.pad_token_id, micro_batch_size=16)}
    variants = {"before (pair cache, drawing order)": ("pair", False),
                "after (combined cache, length-grouped)": ("combined", True)}
    acc = Accelerator(cpu=True, mixed_precision="no")
    runs = {}
    for name, (store, grouped) in variants.items():
        student = model(0).train()
        opt = build_optimizer(parameter_groups(student, 0.01), "adamw", lr=1e-4)
        runs[name] = (student, opt, Frozen(teacher=CachedTeacher(caches[store], forget)), grouped)
    method, rt = make_method("rklu", alpha=8.0), make_retain_term("RT")
    fs, rs = ExampleStream(forget, 32, 0), ExampleStream(retain, 32, 1)
    times: dict[str, list[float]] = {n: [] for n in runs}
    fed = {n: 0 for n in runs}
    for step in range(args.steps + 1):
        views = [{"forget": e} for _, e in fs.step(step)]
        r_ex = [e for _, e in rs.step(step)]
        for name, (student, opt, frozen, grouped) in runs.items():
            t0 = time.perf_counter()
            optimizer_step(student, opt, method, views, r_ex, args.micro, tok.pad_token_id, acc, frozen=frozen,
                           retain_term=rt, max_norm=1.0, step=step + 1, group_by_length=grouped)
            if step:  # the first step warms up
                times[name].append(time.perf_counter() - t0)
                order = (lambda x: sorted(x, key=lambda e: len(e["input_ids"]))) if grouped else list
                for items in ([v["forget"] for v in views], r_ex):
                    items = order(items)
                    fed[name] += sum(len(items[i:i + args.micro]) * max(len(e["input_ids"]) for e in
                                                                        items[i:i + args.micro])
                                     for i in range(0, len(items), args.micro))
    rows = [{"variant": n, "cache_bytes": caches[runs[n][3] and "combined" or "pair"].nbytes(),
             "median_step_s": statistics.median(t), "min_step_s": min(t), "max_step_s": max(t),
             "tokens_fed_per_step": fed[n] / args.steps} for n, t in times.items()]
    report = {"command": f"python benchmarks/bench_step_layout.py --steps {args.steps} --micro {args.micro} "
                         f"--threads {args.threads}", "date": date.today().isoformat(),
              "machine": platform.processor() or platform.machine(), "rows": rows}
    stem = Path(args.out) / f"bench_step_layout_cpu_{report['date']}"
    lines = [f"# CPU step time, before/after the one-tensor cache and length grouping ({report['date']})", "",
             f"Command: `{report['command']}` (mini-TOFU architecture, forget10/retain90 lengths, batch 32)", "",
             "| variant | teacher cache | median step | min–max | tokens fed per step |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['cache_bytes'] / 2**20:.0f} MiB | {r['median_step_s']:.2f} s | "
              f"{r['min_step_s']:.2f}–{r['max_step_s']:.2f} s | {r['tokens_fed_per_step']:.0f} |" for r in rows]
    write_report(stem, report, lines)


if __name__ == "__main__":
    main()
