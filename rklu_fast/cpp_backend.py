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
    # setup.py compiles the x86-64 kernel for AVX2 + FMA; loading it on an older CPU would crash the process.
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        return "this CPU lacks AVX2, which the compiled CPU kernel needs"
    return None


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
