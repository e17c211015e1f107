"""The C++ backends ("cpu" and "cuda"): loads the compiled extensions and exposes the contract's two functions.

`rklu_fast._C` defines the ops `torch.ops.rklu_fast.kl_fwd` / `kl_scale_grad_` with CPU and Meta kernels;
`rklu_fast._C_cuda` adds the CUDA kernels to the same ops (dispatch by device). The .so files hold no Python
module, so they are loaded with `torch.ops.load_library`. Importing this module never fails: `BUILT_CPU`,
`BUILT_CUDA` and `BUILD_ERROR` say what is there (build: docs/build.md).
"""
from __future__ import annotations

import importlib.util
import platform
from typing import Optional

import torch

BUILD_COMMAND = "pip install --no-build-isolation --no-deps -e ."


def _load(name: str) -> Optional[str]:
    """Load `rklu_fast.<name>`; None on success, else why it is not available."""
    spec = importlib.util.find_spec(f"rklu_fast.{name}")
    if spec is None or spec.origin is None:
        return f"rklu_fast.{name} is not compiled: run `{BUILD_COMMAND}` in the repository root (docs/build.md)"
    try:
        torch.ops.load_library(spec.origin)
    except OSError as err:
        return f"rklu_fast.{name} failed to load ({err}): rebuild with `{BUILD_COMMAND}` (docs/build.md)"
    return None


def _cpu_supported() -> Optional[str]:
    """None if the CPU runs the compiled kernel: setup.py builds it for AVX2 + FMA + F16C on x86-64, and loading it on
    an older CPU would crash the process with an illegal instruction."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:  # not Linux: trust the build
        return None
    missing = [] if flags is None else [x for x in ("avx2", "fma", "f16c") if x not in flags]
    return f"this CPU lacks {', '.join(missing)}, which the compiled CPU kernel needs" if missing else None


BUILD_ERROR: Optional[str] = _cpu_supported() or _load("_C")
BUILT_CPU: bool = BUILD_ERROR is None
BUILT_CUDA: bool = False
if BUILT_CPU and torch.version.cuda is not None:
    _cuda_error = _load("_C_cuda")
    BUILT_CUDA = _cuda_error is None
    if not BUILT_CUDA:
        BUILD_ERROR = _cuda_error


def kl_fwd(student: torch.Tensor, original: torch.Tensor, augmented: Optional[torch.Tensor],
           teacher_row: torch.Tensor, grad_scale: torch.Tensor, alpha: float, inv_temperature: float,
           reverse: bool, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Contract `kl_fwd` (docs/kernel-contract.md): per-row KL (fp32 `[N]`) and `grad_scale·∂loss_row/∂student`
    (the student's dtype, contiguous `[N, V]`) or an empty `[0]` tensor without `compute_grad`."""
    return torch.ops.rklu_fast.kl_fwd(student, original, augmented, teacher_row, grad_scale, float(alpha),
                                      float(inv_temperature), bool(reverse), bool(compute_grad))


def kl_scale_grad_(grad: torch.Tensor, applied: torch.Tensor, grad_output_rows: torch.Tensor) -> None:
    """Contract `kl_scale_grad_`: in place, per row r with `g[r] != applied[r]`: `grad[r] *= g[r]/applied[r]`,
    `applied[r] = g[r]` (reads nothing else when they are equal)."""
    torch.ops.rklu_fast.kl_scale_grad_(grad, applied, grad_output_rows)
