"""Which loss backends exist, which are built and usable here, and what `backend="auto"` means.

A backend is an object with the two functions of docs/kernel-contract.md: `kl_fwd` and `kl_scale_grad_`.
"""
from __future__ import annotations

import importlib
import os
from typing import Mapping, Optional

import torch

BACKEND_NAMES = ("torch", "triton", "cpu", "cuda")
BUILD_HINT = "run `pip install --no-build-isolation --no-deps -e .` in the repository root"
# The fused kernels (triton, cpu, cuda) read these dtypes and compute in fp32; float64 needs the `torch` backend,
# which computes in float64 when any input is float64.
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cpp_module():
    """The C++ extension wrapper (issue 4), or None with the reason it is missing."""
    try:
        mod = importlib.import_module("rklu_fast.cpp_backend")
    except ImportError as err:
        return None, f"not built ({err}): {BUILD_HINT}"
    return mod, None


def _triton_module():
    try:
        return importlib.import_module("rklu_fast.triton_kl"), None
    except ImportError as err:
        return None, f"triton unavailable: {err}"


def _status(name: str) -> dict:
    """{"built": bool, "usable": bool, "reason": str (only when not usable)} for one backend on this machine."""
    if name == "torch":
        return {"built": True, "usable": True}
    if name == "triton":
        mod, reason = _triton_module()
        if mod is None:
            return {"built": False, "usable": False, "reason": reason}
        if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            return {"built": True, "usable": True}
        return {"built": True, "usable": False,
                "reason": "no CUDA device; set TRITON_INTERPRET=1 before importing rklu_fast to run the kernel "
                          "in Triton's CPU interpreter (slow; for tests)"}
    mod, reason = _cpp_module()
    if mod is None:
        return {"built": False, "usable": False, "reason": reason}
    built = bool(mod.BUILT_CPU if name == "cpu" else mod.BUILT_CUDA)
    if not built:
        why = getattr(mod, "BUILD_ERROR", None) or f"the {name} kernels were not compiled"
        return {"built": False, "usable": False, "reason": f"not built ({why}): {BUILD_HINT}"}
    if name == "cuda" and not torch.cuda.is_available():
        return {"built": True, "usable": False, "reason": "built, but no CUDA device here"}
    return {"built": True, "usable": True}


def backends() -> dict:
    """Every backend's status here, e.g. `{"torch": {"built": True, "usable": True}, "cpu": {..., "reason": ...}}`."""
    return {name: _status(name) for name in BACKEND_NAMES}


def _usable_on(name: str, device_type: str) -> Optional[str]:
    """None if `name` can run on tensors of `device_type` ("cpu", "cuda", ...), else the reason it cannot."""
    st = _status(name)
    if not st["usable"]:
        return st["reason"]
    if name == "cpu" and device_type != "cpu":
        return f"the cpu backend needs CPU tensors, got {device_type}"
    if name == "cuda" and device_type != "cuda":
        return f"the cuda backend needs CUDA tensors, got {device_type}"
    if name == "triton" and device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    if name == "triton" and device_type not in ("cpu", "cuda"):
        return f"Triton needs CUDA tensors, got {device_type}"
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve(backend: str, device: torch.device, dtypes: Optional[Mapping[str, torch.dtype]] = None) -> str:
    """The concrete backend name for `backend` (possibly "auto"), tensors on `device` and the dtypes of the named
    arguments (`{"student_logits": torch.float64, ...}`); ValueError if unusable. "auto" takes the `torch` backend
    when a dtype is not one the fused kernels read (float64: computed in float64 there)."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKEND_NAMES):
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
    name, error = _resolve(backend, device.type, tuple((dtypes or {}).items()))
    if error is not None:
        raise ValueError(error)
    return name


@torch.compiler.assume_constant_result  # under torch.compile: evaluated once while tracing (it imports modules)
def _resolve(backend: str, device_type: str, dtypes: tuple) -> tuple:
    """(backend name, None), or (None, why not) for `resolve`: plain Python on constants."""
    unfused = next(((name, dt) for name, dt in dtypes if dt not in FUSED_DTYPES), None)
    if unfused is not None:
        if backend in ("auto", "torch"):
            return "torch", None
        name, dt = unfused
        return None, (f"{name} is {_dtype_name(dt)}; backend {backend!r} takes "
                      f"{'/'.join(map(_dtype_name, FUSED_DTYPES))}: use backend='torch' or 'auto'")
    if backend == "auto":
        # GPU: Triton first, the faster of the two GPU kernels where both were measured (docs/benchmarks.md)
        preferred = ("triton", "cuda") if device_type == "cuda" else ("cpu", "torch")
        return next((name for name in preferred if _usable_on(name, device_type) is None), "torch"), None
    reason = _usable_on(backend, device_type)
    if reason is not None:
        return None, f"backend={backend!r} is not usable here: {reason}"
    return backend, None


def implementation(name: str):
    """The module holding `kl_fwd` and `kl_scale_grad_` for a concrete backend name."""
    if name == "torch":
        return importlib.import_module("rklu_fast.reference")
    return (_triton_module() if name == "triton" else _cpp_module())[0]
