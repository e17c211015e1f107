"""Argument checks shared by the public losses (``loss.py``, ``fused_linear.py``): errors name the argument and say
what to pass.  No check here syncs the host unless the caller allows it."""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def check_device(name: str, x: torch.Tensor, device: torch.device, of: str) -> None:
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, but {of} is on {device}")


def row_mask(name: str, x, row_shape, device, integer: bool, of: str) -> torch.Tensor:
    """``labels`` (integer) or ``mask`` (bool) in the row shape of the input ``of``, flattened."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if integer and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if not integer and x.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {x.dtype}")
    if tuple(x.shape) != tuple(row_shape):
        shifted = "logits" if of == "student_logits" else of
        raise ValueError(f"{name} must have the row shape {tuple(row_shape)} of {of} (the op never shifts: pass "
                         f"labels[:, 1:] with {shifted}[:, :-1]), got {tuple(x.shape)}")
    check_device(name, x, device, of)
    return x.reshape(-1)


def check_positive_count(num, sync_ok: bool) -> None:
    """num_items_in_batch must be > 0. A tensor is checked only where that costs no host sync: on the CPU, outside
    torch.compile (or anywhere with ``sync_ok``); on an accelerator a stream-ordered device assert checks it."""
    if not isinstance(num, torch.Tensor):
        if num <= 0:
            raise ValueError(f"num_items_in_batch must be > 0 (the divisor of reduction='mean'), got {num}")
    elif torch.compiler.is_compiling():
        return
    elif num.device.type == "cpu" or sync_ok:
        if not bool(num > 0):
            raise ValueError(f"num_items_in_batch must be > 0 (the divisor of reduction='mean'), got {num.item()}")
    elif num.device.type != "meta":
        torch._assert_async(num > 0, "num_items_in_batch must be > 0 (the divisor of reduction='mean')")


def check_options(*, alpha, temperature, reduction, teacher_rows, num_items_in_batch, ignore_index,
                  sync_ok: bool = False) -> None:
    """The scalar options both losses take."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise TypeError(f"alpha must be a finite real number, got {alpha!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if teacher_rows not in ("all", "valid"):
        raise ValueError(f"teacher_rows must be 'all' or 'valid', got {teacher_rows!r}")
    if num_items_in_batch is not None:
        if reduction != "mean":
            raise ValueError("num_items_in_batch replaces the divisor of reduction='mean'; "
                             f"got reduction={reduction!r}")
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.dim() != 0 or num_items_in_batch.dtype == torch.bool:
                raise TypeError("num_items_in_batch must be an int or a 0-d numeric tensor, "
                                f"got a {num_items_in_batch.dtype} tensor of shape {tuple(num_items_in_batch.shape)}")
        elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Integral):
            raise TypeError(f"num_items_in_batch must be an int or a 0-d tensor, got {num_items_in_batch!r}")
        check_positive_count(num_items_in_batch, sync_ok)
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")


def valid_rows(labels, mask, ignore_index: int, row_shape, device, of: str) -> torch.Tensor:
    """Flat bool ``[N]``: which rows count (``labels != ignore_index`` and ``mask``; all rows when both are None)."""
    valid = torch.ones(math.prod(row_shape), dtype=torch.bool, device=device)
    if labels is not None:
        valid = row_mask("labels", labels, row_shape, device, integer=True, of=of) != ignore_index
    if mask is not None:
        valid = valid & row_mask("mask", mask, row_shape, device, integer=False, of=of)
    return valid


def loss_scale(reduction: str, num_items_in_batch, valid: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """The factor on the summed per-row losses: ``1/num_items_in_batch`` (or ``1/valid rows``, at least 1: no
    valid row gives 0/1, not 0/0) for ``mean``, 1 for ``sum``.  A Python count becomes a device tensor without a
    host-to-device copy (``torch.full``), so the training step stays free of host syncs."""
    if reduction != "mean":
        return torch.ones((), dtype=dtype, device=device)
    if num_items_in_batch is None:
        return 1.0 / valid.sum().to(dtype).clamp(min=1.0)
    if isinstance(num_items_in_batch, torch.Tensor):
        return 1.0 / num_items_in_batch.detach().to(device=device, dtype=dtype)
    return torch.full((), float(num_items_in_batch), dtype=dtype, device=device).reciprocal()


def unit_stride(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` with a contiguous last dimension (the kernels read rows), copied only when it is not."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()
