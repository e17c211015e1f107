"""Sweep the GPU kernels' launch choices in one call and check every variant against float64.

For the GPU-validation issue: one run times
  * the CUDA forward (csrc/rklu_cuda.cu; variants of it are compared across commits, see benchmarks/NOTES.md), and
  * the Triton forward over (BLOCK cap, num_warps, L2 hints) (``rklu_fast.triton_kl.GPU_LAUNCH``)
at N rows × V in bf16, gradient-writing and forward-only, and prints/writes each variant's median time, % of the
measured copy bandwidth over the byte floor, and its error against a float64 reference on a subset of rows.

    python benchmarks/tune_kernels.py --out results/          # on a GPU machine
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import methods as M  # noqa: E402

REF_ROWS = 64


def copy_gbps() -> float:
    """Device-to-device copy bandwidth (read + write counted), the ceiling for memory-bound kernels."""
    import triton.testing
    x = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * x.numel() / ms / 1e6


def reference(student, original, augmented, alpha, grad_scale):
    """float64 loss and grad_scale·gradient of the first REF_ROWS rows, by autograd through the benchmark's oracle."""
    s = student[:REF_ROWS].double().requires_grad_(True)
    kl = M.row_kl(s, original[:REF_ROWS], augmented[:REF_ROWS], alpha, torch.float64)
    (grad_scale * kl.sum()).backward()
    return kl.detach(), s.grad


def rel_err(x, ref):
    return float((x.double() - ref).norm() / ref.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--v", type=int, nargs="+", default=[32000, 51200])
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    import triton
    import triton.testing

    from rklu_fast import cpp_backend, triton_kl

    dev = torch.cuda.get_device_properties(0)
    bw = copy_gbps()
    alpha, scale = 8.0, 0.5
    results = []
    for v in args.v:
        g = torch.Generator(device="cuda").manual_seed(v)
        student, original, augmented = (3 * torch.randn(args.n, v, device="cuda", generator=g).to(torch.bfloat16)
                                        for _ in range(3))
        rows = torch.arange(args.n, device="cuda")
        gs = torch.tensor(scale, device="cuda")
        ref_kl, ref_grad = reference(student, original, augmented, alpha, scale)
        variants = [("cuda", "cuda", {})]
        variants.append(("triton default", "triton", {"block": None, "warps": None, "l2_hints": True}))
        for block, warps in itertools.product((2048, 4096), (8, 16)):
            variants.append((f"triton b{block} w{warps} l2", "triton",
                             {"block": block, "warps": warps, "l2_hints": True}))
        for (name, backend, knobs), compute_grad in itertools.product(variants, (True, False)):
            if backend == "cuda":
                fn = cpp_backend.kl_fwd
            else:
                triton_kl.GPU_LAUNCH.update(knobs)
                fn = triton_kl.kl_fwd
            # (F821: pyflakes sees the `del student, ...` below; the lambda only runs before it)
            call = lambda: fn(student, original, augmented, rows, gs, alpha, 1.0, True, compute_grad)  # noqa: E731, F821
            row = {"variant": name, "backend": backend, **knobs, "n": args.n, "v": v, "grad": compute_grad}
            try:
                loss, grad = call()
                torch.cuda.synchronize()
                row["loss_rel_err"] = rel_err(loss[:REF_ROWS], ref_kl)
                if compute_grad:
                    row["grad_rel_err"] = rel_err(grad[:REF_ROWS], ref_grad)
                del loss, grad
                ms = triton.testing.do_bench(call, warmup=25, rep=150, return_mode="median")
                floor = args.n * v * 2 * (4 if compute_grad else 3)
                row.update(ms=ms, pct_copy_bw=100 * floor / ms / 1e6 / bw)
            except Exception as e:  # noqa: BLE001 - a variant that fails is a result
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            results.append(row)
            print(f"V={v:6d} grad={int(compute_grad)} {name:28s} "
                  + (f"{row['ms']:7.3f} ms {row['pct_copy_bw']:5.1f}% copy bw  loss err {row['loss_rel_err']:.1e}"
                     + (f" grad err {row['grad_rel_err']:.1e}" if compute_grad else "") if "ms" in row
                     else row.get("error", "?")), flush=True)
        del student, original, augmented
        torch.cuda.empty_cache()
    out = {"schema": "rklu_fast.tune_kernels/1", "device": dev.name, "sms": dev.multi_processor_count,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "triton": triton.__version__, "copy_gbps": bw, "rows": results}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tune_kernels_{dev.name.lower().replace(' ', '-')}_{datetime.date.today()}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"copy bandwidth {bw:.0f} GB/s; wrote {path}")
    for v, grad in itertools.product(args.v, (True, False)):
        ok = [r for r in results if r["v"] == v and r["grad"] == grad and "ms" in r]
        for backend in ("cuda", "triton"):
            best = min((r for r in ok if r["backend"] == backend), key=lambda r: r["ms"], default=None)
            if best:
                print(f"best V={v} grad={int(grad)} {backend}: {best['variant']} {best['ms']:.3f} ms "
                      f"{best['pct_copy_bw']:.1f}%")


if __name__ == "__main__":
    main()
