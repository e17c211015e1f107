"""Training-step benchmark: tokens/s and peak memory of the optimizer step ``rklu`` ships.

Each step is ``rklu_fast.train.loop.optimizer_step``, the very function the training loop calls: the RKLU
method plug-in on forget micro-batches, the RT retain term on as many retain micro-batches, gradient clipping at
1.0, the non-finite guard's one host sync, statistics (teacher entropy, answer probability) every ``--log-every``
steps, the optimizer step.  Tokens are real (unpadded) forget + retain tokens.

    python benchmarks/bench_train_step.py --tiny                 # CPU, tiny Llama, < 1 min: checks the pipeline
    python benchmarks/bench_train_step.py --device cuda          # GPU: Phi-1.5 and Llama-2-7B architectures

Models are randomly initialised from the architectures' configs (weights' values do not change speed). One row per
(architecture, teacher mode, loss kernel):
- loss kernel: ``eager`` = ``backend="torch"`` (the materialising reference) vs ``fused`` = ``backend="auto"``
  (CUDA/Triton on a GPU; on a CPU the C++ kernel if built, else the reference again — the row says which);
- teacher mode: ``online`` (original + augmented models loaded and run every step) vs ``cached`` (one forward
  over the forget set into a ``TeacherCache``, in GPU memory when it fits, then the teacher models are freed).
  Cached rows also report tokens/s with the cache build time amortised over ``--epochs`` epochs.
Each row also times the loss alone (forward + backward on one micro-batch's logits) to show the kernel's share.

Llama-2-7B runs cached only, with the memory plan of docs/memory-and-scale.md (bf16 weights, BF16AdamW with Kahan
compensation, gradient checkpointing); online would need three 7B models on one GPU.  Results:
``train_step_<device>_<date>.{json,md}`` in ``--out`` (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # rklu_fast from this checkout when not installed
import rklu_fast  # noqa: E402
from rklu_fast.data.collate import collate, to_device  # noqa: E402
from rklu_fast.train.frozen import Frozen  # noqa: E402
from rklu_fast.train.loop import optimizer_step  # noqa: E402
from rklu_fast.train.lowmem import build_optimizer, parameter_groups, set_gradient_checkpointing  # noqa: E402
from rklu_fast.train.methods import make_method, make_retain_term  # noqa: E402
from rklu_fast.train.teacher import OnlineTeacher  # noqa: E402
from rklu_fast.train.teacher_cache import (CacheKey, CachedTeacher, build_forget_cache,  # noqa: E402
                                           model_logits_fn, place_cache)

SCHEMA = "rklu_fast.bench_train_step/1"
RESULTS = Path(__file__).resolve().parent / "results"
GiB = 1024 ** 3

ARCHS = {
    # name: (config class, config kwargs, memory plan, sequence length, micro-batch, batch)
    "tiny-llama": ("LlamaConfig", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128),
                   dict(dtype="float32", optimizer="adamw", checkpointing=False), 48, 4, 8),
    "phi-1.5": ("PhiConfig", dict(vocab_size=51200, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                  num_attention_heads=32, partial_rotary_factor=0.5, max_position_embeddings=2048),
                dict(dtype="bfloat16", optimizer="adamw_bf16", update="kahan", checkpointing=False), 256, 8, 32),
    "llama2-7b": ("LlamaConfig", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                      max_position_embeddings=4096, rms_norm_eps=1e-5),
                  dict(dtype="bfloat16", optimizer="adamw_bf16", update="stochastic", checkpointing=True), 512, 4, 32),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_model(arch: str, device: str, seed: int):
    import transformers
    cls_name, kwargs, plan, *_ = ARCHS[arch]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: a 7B init on the host takes minutes
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=_DTYPES[plan["dtype"]])
    return model


def make_examples(n: int, seq: int, vocab: int, seed: int) -> list[dict]:
    """TOFU-like encoded QA pairs: lengths in [seq/2, seq], the first ~30% question tokens (label -100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(seq // 2, seq + 1, (1,), generator=g))
        ids = torch.randint(1, vocab, (length,), generator=g).tolist()
        q = max(1, int(0.3 * length))
        out.append({"input_ids": ids, "labels": [-100] * q + ids[q:], "attention_mask": [1] * length})
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Run:
    """One (arch, teacher mode, loss kernel) configuration: its models, data and step function."""

    def __init__(self, arch: str, mode: str, kernel: str, device: str, n_examples: int, seed: int = 0,
                 update: str | None = None, log_every: int = 10):
        _, _, plan, self.seq, self.micro, self.batch = ARCHS[arch]
        self.plan = plan | ({"update": update} if update else {})
        self.device, self.mode, self.backend = device, mode, {"eager": "torch", "fused": "auto"}[kernel]
        vocab = ARCHS[arch][1]["vocab_size"]
        self.examples = [dict(e, index=i) for i, e in enumerate(make_examples(n_examples, self.seq, vocab, seed))]
        self.retain = [dict(e, index=i) for i, e in enumerate(make_examples(n_examples, self.seq, vocab, seed + 7))]
        self.log_every = log_every
        self.cache_build_s = None
        self.cache_bytes = None
        original, augmented = make_model(arch, device, seed), make_model(arch, device, seed + 1)
        for m in (original, augmented):
            m.eval().requires_grad_(False)
        if mode == "online":
            source = OnlineTeacher(original, augmented)
        else:
            key = CacheKey("bench-original", "bench-augmented", "bench-data", "none", self.plan["dtype"],
                           ARCHS[arch][1]["vocab_size"])
            sync(device)
            t0 = time.perf_counter()
            cache = place_cache(build_forget_cache(model_logits_fn(original, augmented), self.examples, key,
                                                   pad_token_id=0, micro_batch_size=self.micro, device=device), device)
            sync(device)
            self.cache_build_s = time.perf_counter() - t0
            self.cache_bytes = cache.nbytes()
            source = CachedTeacher(cache, self.examples)
            del original, augmented  # the point of the cache: the teacher models leave the GPU
            gc.collect()
        self.source, self.frozen = source, Frozen(teacher=source)
        self.method = make_method("rklu", alpha=8.0, backend=self.backend)
        self.retain_term = make_retain_term("RT")
        from accelerate import Accelerator
        self.accelerator = Accelerator(cpu=device == "cpu", mixed_precision="no")  # weights carry the dtype
        self.student = make_model(arch, device, seed)
        self.student.train()
        set_gradient_checkpointing(self.student, self.plan["checkpointing"])
        self.optimizer = build_optimizer(parameter_groups(self.student, 0.01), self.plan["optimizer"], lr=1e-5,
                                         update=self.plan.get("update", "kahan"))

    def step_examples(self, step: int) -> tuple[list[dict], list[dict]]:
        n = len(self.examples)
        chosen = [(step * self.batch + i) % n for i in range(self.batch)]
        return [{"forget": self.examples[i]} for i in chosen], [self.retain[i] for i in chosen]

    def teacher_rows(self, batch):
        rows = self.source.rows(batch)
        return rows.original, rows.augmented

    def loss(self, logits, batch, num_items, teacher=None):
        orig, aug = teacher if teacher is not None else self.teacher_rows(batch)
        rows = "all" if self.mode == "online" else "valid"
        return rklu_fast.reverse_kl_loss(logits[:, :-1], orig, aug, alpha=8.0, labels=batch["labels"][:, 1:],
                                         num_items_in_batch=num_items, teacher_rows=rows, backend=self.backend)

    def step(self, step: int) -> int:
        """One optimizer step as ``rklu`` runs it; returns the real (unpadded) tokens it trained on."""
        f_views, r_examples = self.step_examples(step)
        optimizer_step(self.student, self.optimizer, self.method, f_views, r_examples, self.micro, 0,
                       self.accelerator, frozen=self.frozen, retain_term=self.retain_term, max_norm=1.0,
                       want_stats=step % self.log_every == 0, step=step + 1)
        return sum(len(v["forget"]["input_ids"]) for v in f_views) + sum(len(e["input_ids"]) for e in r_examples)

    def loss_alone_ms(self, reps: int = 3) -> float:
        """Forward + backward of the loss alone on one micro-batch's student logits (the kernel's own cost)."""
        b = to_device(collate([v["forget"] for v in self.step_examples(0)[0][:self.micro]], 0), self.device)
        with torch.no_grad():
            logits = self.student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logits = logits.detach().requires_grad_(True)
        n = int((b["labels"][:, 1:] != -100).sum())
        teacher = self.teacher_rows(b)  # not timed: the teacher's forwards are not the loss
        times = []
        for _ in range(reps + 1):
            sync(self.device)
            t0 = time.perf_counter()
            torch.autograd.grad(self.loss(logits, b, n, teacher), logits)
            sync(self.device)
            times.append(time.perf_counter() - t0)
        return 1e3 * min(times[1:])


def measure(arch: str, mode: str, kernel: str, update: str | None, device: str, steps: int, warmup: int,
            epochs: int, n_examples: int) -> dict:
    row = {"arch": arch, "teacher": mode, "kernel": kernel, "update": update or ARCHS[arch][2].get("update"),
           "status": "ok", "reason": None}
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        run = Run(arch, mode, kernel, device, n_examples, update=update)
        row["backend"] = _resolved_backend(run.backend, device)
        for s in range(warmup):
            run.step(s)
        sync(device)
        t0, tokens = time.perf_counter(), 0
        for s in range(warmup, warmup + steps):
            tokens += run.step(s)
        sync(device)
        elapsed = time.perf_counter() - t0
        step_s = elapsed / steps
        row.update(steps=steps, tokens=tokens, step_s=step_s, tokens_per_s=tokens / elapsed,
                   loss_alone_ms=run.loss_alone_ms(),
                   micro_batches_per_step=run.batch // run.micro, cache_build_s=run.cache_build_s,
                   cache_gib=None if run.cache_bytes is None else run.cache_bytes / GiB)
        row["loss_share"] = row["loss_alone_ms"] * row["micro_batches_per_step"] / (1e3 * step_s)
        if run.cache_build_s is not None:  # one cache build serves all epochs
            steps_per_epoch = max(1, len(run.examples) // run.batch)
            epoch_s = steps_per_epoch * step_s
            row["tokens_per_s_amortised"] = (epochs * steps_per_epoch * tokens / steps) / \
                (run.cache_build_s + epochs * epoch_s)
        if device == "cuda":
            row["max_memory_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
            row["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
        del run
    except torch.OutOfMemoryError as e:
        row.update(status="oom", reason=str(e).splitlines()[0])
    except Exception as e:  # a row with its reason, never a silent omission
        row.update(status="error", reason=f"{type(e).__name__}: {e}")
    gc.collect()
    return row


def _resolved_backend(backend: str, device: str) -> str:
    if backend != "auto":
        return backend
    usable = {k for k, v in rklu_fast.backends().items() if v.get("usable")}
    order = ("cuda", "triton") if device == "cuda" else ("cpu",)
    return next((b for b in order if b in usable), "torch")


def plan(device: str, tiny: bool) -> list[tuple[str, str, str, str | None]]:
    """Rows: (arch, teacher mode, loss kernel, bf16 update rule or None for the arch's plan)."""
    grid = [(m, k) for m in ("online", "cached") for k in ("eager", "fused")]
    if tiny or device != "cuda":
        return [("tiny-llama", m, k, None) for m, k in grid]
    # 7B first (a fresh allocator for the memory bound); online 7B would need 3 x 12.6 GiB of weights + training.
    # The Kahan row costs 12.6 GiB more than stochastic rounding (docs/memory-and-scale.md): it shows the margin.
    return [("llama2-7b", "cached", "fused", None), ("llama2-7b", "cached", "fused", "kahan"),
            ("llama2-7b", "cached", "eager", None)] + [("phi-1.5", m, k, None) for m, k in grid]


def speedups(rows: list[dict]) -> list[dict]:
    """fused+cached vs eager+online tokens/s per architecture (target on Phi-1.5: ≥ 1.6x)."""
    out = []
    for arch in sorted({r["arch"] for r in rows}):
        get = {(r["teacher"], r["kernel"]): r for r in rows
               if r["arch"] == arch and r["status"] == "ok" and r["update"] == ARCHS[arch][2].get("update")}
        base, best = get.get(("online", "eager")), get.get(("cached", "fused"))
        if base and best:
            out.append({"arch": arch, "fused_cached_vs_eager_online": best["tokens_per_s"] / base["tokens_per_s"],
                        "target": 1.6 if arch == "phi-1.5" else None})
    return out


def markdown(report: dict) -> str:
    lines = [f"# Training-step benchmark ({report['device']['name']}, {report['date']})", "",
             "| arch | teacher | kernel (backend) | bf16 update | tokens/s | amortised tokens/s | step s | "
             "loss ms (share) | "
             "cache build s | max reserved GiB | status |", "|" + "---|" * 11]
    for r in report["rows"]:
        f = lambda k, spec=".3g": "" if r.get(k) is None else format(r[k], spec)  # noqa: E731
        share = f"{f('loss_alone_ms')} ({r['loss_share']:.0%})" if r.get("loss_share") is not None else ""
        lines.append(f"| {r['arch']} | {r['teacher']} | {r['kernel']} ({r.get('backend', '')}) | "
                     f"{r['update'] or ''} | "
                     f"{f('tokens_per_s', '.0f')} | {f('tokens_per_s_amortised', '.0f')} | {f('step_s')} | {share} | "
                     f"{f('cache_build_s')} | {f('max_memory_reserved_gib', '.1f')} | {r['status']} "
                     f"{r['reason'] or ''} |")
    for s in report["speedups"]:
        lines.append(f"\n{s['arch']}: fused + cached = {s['fused_cached_vs_eager_online']:.2f}x eager + online "
                     f"tokens/s" + (f" (target ≥ {s['target']}x)" if s["target"] else ""))
    lines.append(f"\nAmortised over {report['settings']['epochs']} epochs of the benchmark's forget set. "
                 "Command: `" + report["command"] + "`")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--tiny", action="store_true", help="tiny Llama on CPU (< 1 min): checks the pipeline")
    p.add_argument("--steps", type=int, default=None, help="measured optimizer steps per row")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--epochs", type=int, default=10, help="epochs the cache build is amortised over (TOFU: 10)")
    p.add_argument("--examples", type=int, default=None, help="forget-set size (default: 2 steps' worth)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: on a shared machine, OpenMP threads spin-waiting on busy cores "
                        "made a tiny step 30x slower here)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    device = "cpu" if args.tiny else args.device
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; use --tiny (or --device cpu)")
    steps = args.steps or (3 if device == "cuda" else 2)
    rows = []
    for arch, mode, kernel, update in plan(device, args.tiny):
        n_examples = args.examples or 2 * ARCHS[arch][5]
        rows.append(measure(arch, mode, kernel, update, device, steps, args.warmup, args.epochs, n_examples))
        r = rows[-1]
        print(f"{arch:10s} {mode:6s} {kernel:5s} {r['update'] or '':10s} {r['status']:5s} "
              f"tokens/s={r.get('tokens_per_s', 0):.0f} "
              f"reserved={r.get('max_memory_reserved_gib')} {r['reason'] or ''}", flush=True)
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    report = {"schema": SCHEMA, "date": date, "device": {"type": device, "name": name, "cpu_threads": args.threads},
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "settings": {"steps": steps, "warmup": args.warmup, "epochs": args.epochs,
                           "archs": {a: ARCHS[a][2] | {"seq": ARCHS[a][3], "micro_batch": ARCHS[a][4],
                                                       "batch": ARCHS[a][5]} for a in {r["arch"] for r in rows}}},
              "command": "python " + " ".join([Path(__file__).name] + (argv if argv is not None else sys.argv[1:])),
              "rows": rows, "speedups": speedups(rows)}
    torch.set_num_threads(threads_before)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"train_step_{'tiny' if args.tiny else device}_{date}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
