"""The whole RKLU run, timed from process start to unlearned weights: what a user waits for.

    python benchmarks/whole_run.py --arch llama2-7b          # a GPU: augment 10 epochs → cache → unlearn 10 epochs
    python benchmarks/whole_run.py --arch phi-1.5
    python benchmarks/whole_run.py --dry-run                 # CPU, a tiny model, one epoch each: checks the script

A randomly initialised model of the named architecture (weights' values do not change speed) is the original;
the script saves it, then runs the pipeline's own stages on TOFU forget10 (retain90 for the RT term) with the
architecture's memory plan (configs/llama2-7b-tofu.yaml's: bf16 weights, bf16 AdamW, gradient checkpointing,
cached one-tensor teacher): ``augment`` (10 epochs), then ``unlearn`` (teacher cache, 10 epochs, RT).  No epoch
checkpoints (the GPU machine has 64 GiB of disk). The tokenizer is a BPE trained here on the TOFU text.

Reported per stage: wall seconds, real (unpadded) tokens trained on, tokens/s, and model-FLOPs utilisation
``6 · parameters · real tokens / time`` against the bf16 matrix rate measured in the same process (an 8192³
product) and against the datasheet's dense bf16 rate (989 TFLOP/s for an H100/H200 SXM); peak memory.
Results: ``whole_run_<device>_<date>.{json,md}`` in ``--out``.
"""
from __future__ import annotations

import time

T_START = time.perf_counter()  # the clock starts at process start: imports and random init are the user's wait

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parents[1]))
from rklu_fast.jsonio import write_report  # noqa: E402

DATASHEET_BF16_TFLOPS = 989.0
ARCHS = {
    "llama2-7b": {"architecture": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                  "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    "phi-1.5": {"architecture": "phi", "vocab_size": 51200, "hidden_size": 2048, "intermediate_size": 8192,
                "num_hidden_layers": 24, "num_attention_heads": 32, "partial_rotary_factor": 0.5,
                "max_position_embeddings": 2048},
    "tiny": {"architecture": "llama", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
             "max_position_embeddings": 512},
}


def overrides(arch: str, run_dir: Path, dry_run: bool, tokenizer: Path) -> list[str]:
    gpu = torch.cuda.is_available() and not dry_run
    spec = json.dumps(ARCHS[arch]).replace('"', "")
    ov = [f"run_dir={run_dir}", f"model.random_init={spec}", f"model.tokenizer={tokenizer}",
          "model.train_tokenizer=null", f"finetune.original={run_dir / 'original' / 'model'}",
          "finetune.make_oracle=false", "data.forget=forget10", "data.retain=retain90", "log.tensorboard=false",
          "log.every=10", "checkpoint.every_epoch=false", "teacher.mode=cached", "teacher.store=combined",
          "unlearn.method=rklu", "unlearn.retain_term=RT", f"cpu={not gpu}",
          f"precision={'bf16' if gpu else 'no'}", "model.template=llama2" if arch != "phi-1.5" else
          "model.template=phi"]
    if gpu:  # the 7B memory plan (docs/memory-and-scale.md)
        ov += ["model.dtype=bfloat16"] + [f"{s}.{k}={v}" for s in ("augment", "unlearn") for k, v in
                                          (("optimizer", "adamw_bf16"), ("bf16_update", "stochastic"),
                                           ("gradient_checkpointing", "true"), ("micro_batch_size", 4))]
    if dry_run:  # forget01 (40 QA pairs) and 40 retain pairs: seconds on a CPU
        ov += ["data.forget=forget01", "data.retain=retain99", "data.max_retain=40", "augment.epochs=1",
               "unlearn.epochs=1", "augment.batch_size=8",
               "augment.micro_batch_size=4", "unlearn.batch_size=8", "unlearn.micro_batch_size=4",
               "model.max_length=128"]
    return ov


def matmul_tflops(device: str) -> float | None:
    """The bf16 dense matrix rate of this device, measured: an 8192³ product, median of 10 (None on a CPU)."""
    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192 ** 3 / sorted(times)[5] / 1e12


def stage_tokens(examples: list[dict], retain: list[dict] | None, batch: int, epochs: float, seed: int) -> int:
    """Real tokens one stage trains on (the loop's own data order), forget plus paired retain examples."""
    from rklu_fast.train.loop import ExampleStream, plan_steps

    total, _ = plan_steps(len(examples), epochs, batch)
    streams = [ExampleStream(examples, batch, seed)] + ([ExampleStream(retain, batch, seed + 1)] if retain else [])
    return sum(len(e["input_ids"]) for s in streams for step in range(total) for _, e in s.step(step))


def _fmt(value, spec: str, unit: str = "") -> str:
    return "–" if value is None else format(value, spec) + unit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="llama2-7b", choices=[a for a in ARCHS if a != "tiny"])
    p.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, one epoch per stage")
    p.add_argument("--run-dir", default=None, help="where the run writes (default: a temporary folder)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args()
    arch = "tiny" if args.dry_run else args.arch
    from transformers import AutoTokenizer

    from rklu_fast.config import load_config
    from rklu_fast.data import load_tofu
    from rklu_fast.data.templates import get_template
    from rklu_fast.data.tokenizer import train_bpe_tokenizer
    from rklu_fast.train.pipeline import Run

    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="rklu-whole-run-"))
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = {}
    t = time.perf_counter()
    template = get_template("phi" if arch == "phi-1.5" else "llama2")
    splits = ("forget01", "retain99") if args.dry_run else ("forget10", "retain90")
    texts = [template.full(r["question"], r["answer"]) for s in splits for r in load_tofu(s)]
    tok_dir = run_dir / "tokenizer"
    train_bpe_tokenizer(texts, vocab_size=min(ARCHS[arch]["vocab_size"], 32000)).save_pretrained(tok_dir)
    times["tokenizer"] = time.perf_counter() - t
    cfg = load_config(None, overrides(arch, run_dir, args.dry_run, tok_dir))
    run = Run(cfg)
    t = time.perf_counter()
    run.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    run.tokenizer.pad_token = run.tokenizer.pad_token or run.tokenizer.eos_token
    model = run.load_model(None).to(device)  # random init of the architecture
    n_params = sum(p.numel() for p in model.parameters())
    from rklu_fast.train import checkpoint
    checkpoint.save_model(run_dir / "original" / "model", model, run.tokenizer)
    del model
    times["init_and_save_original"] = time.perf_counter() - t
    run.preflight(("augment", "unlearn"))
    forget, retain = run.encode(run.forget_records), run.encode(run.retain_records)
    tokens = {"augment": stage_tokens(forget, None, cfg["augment"]["batch_size"], cfg["augment"]["epochs"],
                                      cfg["seed"]),
              "unlearn": stage_tokens(forget, retain, cfg["unlearn"]["batch_size"], cfg["unlearn"]["epochs"],
                                      cfg["seed"])}
    for stage in ("augment", "unlearn"):
        t = time.perf_counter()
        if not getattr(run, stage)():
            raise RuntimeError(f"{stage} stopped early")
        if device == "cuda":
            torch.cuda.synchronize()
        times[stage] = time.perf_counter() - t
    wall = time.perf_counter() - T_START
    rate = matmul_tflops(device)
    rows = []
    for stage in ("augment", "unlearn"):
        flops = 6 * n_params * tokens[stage]
        rows.append({"stage": stage, "seconds": times[stage], "real_tokens": tokens[stage],
                     "tokens_per_s": tokens[stage] / times[stage], "model_tflops": flops / times[stage] / 1e12,
                     "mfu_vs_measured": None if rate is None else flops / times[stage] / 1e12 / rate,
                     "mfu_vs_datasheet": None if device != "cuda" else
                     flops / times[stage] / 1e12 / DATASHEET_BF16_TFLOPS})
    name = torch.cuda.get_device_name().lower().replace(" ", "-") if device == "cuda" else "cpu"
    report = {"arch": arch, "device": name, "date": date.today().isoformat(), "parameters": n_params,
              "wall_seconds_from_process_start": wall, "seconds": times, "stages": rows,
              "measured_bf16_tflops": rate, "datasheet_bf16_tflops": DATASHEET_BF16_TFLOPS,
              "max_memory_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else None,
              "command": "python benchmarks/whole_run.py " + " ".join(sys.argv[1:]),
              "python": platform.python_version(), "torch": torch.__version__, "dry_run": args.dry_run}
    stem = Path(args.out) / f"whole_run_{'dry-run' if args.dry_run else name}_{report['date']}"
    lines = [f"# Whole RKLU run: {arch} on {name} ({report['date']})", "",
             f"Command: `{report['command']}`  ", f"Parameters: {n_params:,}  ",
             f"Wall time from process start to unlearned weights: **{wall:.1f} s**  ",
             f"Measured bf16 matrix rate: {_fmt(rate, '.0f', ' TFLOP/s')}; peak memory reserved: "
             f"{_fmt(report['max_memory_reserved_gib'], '.1f', ' GiB')}", "",
             "| stage | seconds | real tokens | tokens/s | model TFLOP/s | MFU (measured) | MFU (989 TFLOP/s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['seconds']:.1f} | {r['real_tokens']} | {r['tokens_per_s']:.0f} | "
                     f"{r['model_tflops']:.3g} | {_fmt(r['mfu_vs_measured'], '.1%')} | "
                     f"{_fmt(r['mfu_vs_datasheet'], '.1%')} |")
    lines += ["", "Other seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()
                                                 if k not in ("augment", "unlearn"))]
    write_report(stem, report, lines)


if __name__ == "__main__":
    main()
