"""The public loss API: `reverse_kl_loss`, `forward_kl_loss`, `teacher_logits`.

Arguments are checked here (shapes, dtypes, devices: no host sync), then every backend sits behind ONE autograd
entry, the custom op `rklu_fast::kl_div` (docs/kernel-contract.md). The forward writes the gradient when it will
be needed (it has the row statistics at hand); the backward only rescales it in place by the incoming gradient
with the backend's `kl_scale_grad_`, which is a no-op when that gradient is 1 (out of place under graph capture).

Rows are never copied when the student (or teacher) is a view whose rows lie on a regular grid: `[N, V]` with any
row stride, and `[B, T, V]` slices such as the causal-LM shift `logits[:, :-1]`. Such a `[B, T, V]` view is read
as `[(B−1)·T_full + T, V]` rows of row stride `stride(1)` (T_full = stride(0)/stride(1)), whose extra rows (the
gaps between sequences) are marked ignored; the op maps logical rows to these "padded" rows itself, from the
strides it actually receives.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
from torch._subclasses.fake_tensor import is_fake

from rklu_fast.arg_checks import FLOAT_DTYPES, check_device, check_options, loss_scale, unit_stride, valid_rows
from rklu_fast.backends import implementation, resolve
from rklu_fast.reference import teacher_logits

__all__ = ["reverse_kl_loss", "forward_kl_loss", "teacher_logits"]


# ------------------------------------------------------------------------------------------- row layouts
class RowLayout(NamedTuple):
    """Logical row i lives at padded row `(i // per_group) * group_stride + i % per_group`, of stride `row_stride`."""

    groups: int
    per_group: int
    group_stride: int  # in rows
    row_stride: int  # in elements

    @property
    def padded_rows(self) -> int:
        return 0 if self.groups * self.per_group == 0 else (self.groups - 1) * self.group_stride + self.per_group

    @property
    def is_dense(self) -> bool:
        return self.groups <= 1 or self.group_stride == self.per_group


def row_layout(x: torch.Tensor) -> Optional[RowLayout]:
    """How the rows of `x` (`[..., V]`, `stride(-1) == 1`) lie in memory, or None if not on a regular grid."""
    lead = [(size, stride) for size, stride in zip(x.shape[:-1], x.stride()[:-1]) if size != 1]
    n = math.prod(x.shape[:-1])
    if not lead:
        return RowLayout(1, n, n, x.shape[-1])
    blocks = [list(lead[-1])]  # [rows, row stride], merging dims that nest densely, from the innermost out
    for size, stride in reversed(lead[:-1]):
        if stride == blocks[-1][0] * blocks[-1][1]:
            blocks[-1][0] *= size
        else:
            blocks.append([size, stride])
    if len(blocks) == 1:
        return RowLayout(1, n, n, blocks[0][1])
    if len(blocks) == 2:
        (per_group, row_stride), (groups, stride) = blocks
        if row_stride > 0 and stride % row_stride == 0 and stride // row_stride >= per_group:
            return RowLayout(groups, per_group, stride // row_stride, row_stride)
    return None


def _layout_used(x: torch.Tensor) -> RowLayout:
    """The layout the op reads `x` with: its own, or that of a dense copy when its rows are irregular."""
    n = math.prod(x.shape[:-1])
    return row_layout(x) or RowLayout(1, n, n, x.shape[-1])


def _as_rows(x: torch.Tensor):
    """A `[padded_rows, V]` view of `x` without copying (or a dense copy if its rows are irregular), and the layout."""
    lay = _layout_used(x)
    if row_layout(x) is None:
        x = x.contiguous()
    return x.as_strided((lay.padded_rows, x.shape[-1]), (lay.row_stride, 1)), lay


def _padded_index(i: torch.Tensor, lay: RowLayout) -> torch.Tensor:
    return i if lay.is_dense else (i // lay.per_group) * lay.group_stride + i % lay.per_group


def _logical_rows(lay: RowLayout, device) -> torch.Tensor:
    return _padded_index(torch.arange(lay.groups * lay.per_group, device=device), lay)


# ------------------------------------------------------------------------------------------- the custom ops
@torch.library.custom_op("rklu_fast::kl_div", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def kl_div(student: torch.Tensor, original: torch.Tensor, augmented: Optional[torch.Tensor],
           teacher_row: torch.Tensor, grad_scale: torch.Tensor, alpha: float, inv_temperature: float,
           reverse: bool, compute_grad: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_rows · grad_scale `[N]`, gradient `[padded rows, V]` or `[0]`, `applied` `[padded rows]` or `[0]`).

    `teacher_row[i]` is the logical row of `original`/`augmented` compared with logical student row i, or −1.
    The loss rows and `applied` have grad_scale's dtype: float32, or float64 when the inputs are computed in float64.
    """
    impl = implementation(backend)
    s2, s_lay = _as_rows(student)
    o2, o_lay = _as_rows(original)
    a2 = None
    if augmented is not None:
        a2, a_lay = _as_rows(augmented)
        if a_lay != o_lay:  # one teacher_row must address both: give both the dense layout
            o2, o_lay = _as_rows(original.contiguous())
            a2, a_lay = _as_rows(augmented.contiguous())
    n_pad = s_lay.padded_rows
    student_at = _logical_rows(s_lay, student.device)
    teacher_at = torch.where(teacher_row >= 0, _padded_index(teacher_row, o_lay), -1)
    padded_teacher_row = torch.full((n_pad,), -1, dtype=torch.int64, device=student.device)
    padded_teacher_row[student_at] = teacher_at
    if n_pad == 0:
        loss_pad = torch.zeros(0, dtype=grad_scale.dtype, device=student.device)
        grad = student.new_zeros((0, student.shape[-1])) if compute_grad else student.new_empty(0)
    else:
        loss_pad, grad = impl.kl_fwd(s2, o2, a2, padded_teacher_row, grad_scale, alpha, inv_temperature,
                                     reverse, compute_grad)
    applied = torch.ones(n_pad if compute_grad else 0, dtype=grad_scale.dtype, device=student.device)
    return loss_pad[student_at] * grad_scale, grad, applied


@kl_div.register_fake
def _(student, original, augmented, teacher_row, grad_scale, alpha, inv_temperature, reverse, compute_grad,
      backend):
    n_pad = _layout_used(student).padded_rows
    grad = student.new_empty((n_pad, student.shape[-1]) if compute_grad else (0,))
    applied = student.new_empty((n_pad if compute_grad else 0,), dtype=grad_scale.dtype)
    return teacher_row.new_empty(teacher_row.shape, dtype=grad_scale.dtype), grad, applied


def _own_version(t: torch.Tensor) -> torch.Tensor:
    """A tensor over the memory of `t` whose in-place updates do not bump `t`'s autograd version counter."""
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def _setup_context(ctx, inputs, output):
    student, backend = inputs[0], inputs[-1]
    _, grad, applied = output
    ctx.set_materialize_grads(False)  # else backward gets a zeros [N, V] for the unused `grad` output: 2x memory
    ctx.save_for_backward(grad, applied)
    ctx.backend = backend
    ctx.shape = tuple(student.shape)
    ctx.layout = _layout_used(student)
    ctx.backwards_done = False


def _backward(ctx, grad_rows, _grad_grad, _grad_applied):
    grad, applied = ctx.saved_tensors
    if grad_rows is None:
        return (None,) * 10
    lay = ctx.layout
    if grad.numel() == 0:  # no rows (or no vocab): the gradient is an empty zero tensor, not None
        return (grad.new_zeros(ctx.shape),) + (None,) * 9
    g = torch.ones(lay.padded_rows, dtype=applied.dtype, device=grad.device)  # 1 on gap rows: nothing to do
    g[_logical_rows(lay, grad.device)] = grad_rows.to(applied.dtype)
    first = not ctx.backwards_done
    ctx.backwards_done = True
    if first and not (torch.compiler.is_compiling() or is_fake(grad)):
        # In place (reading only g when g == 1), through aliases with their own version counters: the saved
        # tensors are updated on purpose, and a retained graph must still unpack them for a second backward.
        implementation(ctx.backend).kl_scale_grad_(_own_version(grad), _own_version(applied), g)
    else:
        # Graph capture (torch.compile, opcheck) cannot mutate a forward output in the backward, and a later
        # backward (retain_graph=True) must not change a gradient already handed out: scale out of place.
        # exactly 1 where unchanged: bitwise the same. After a first backward with g = 0 the scale is lost: the
        # ratio is inf and the gradient NaN, which the training loop's finiteness check stops loudly.
        ratio = torch.where(g != applied, g / applied, 1.0)
        grad = (grad.to(torch.promote_types(grad.dtype, ratio.dtype)) * ratio.unsqueeze(-1)).to(grad.dtype)
    # The logical rows of the padded gradient in the student's shape: a view, the gradient is not copied.
    v = ctx.shape[-1]
    grouped = grad.as_strided((lay.groups, lay.per_group, v), (lay.group_stride * v, v, 1))
    return (grouped.view(ctx.shape),) + (None,) * 9


kl_div.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------- argument checks
def _check_logits(name: str, x, v: Optional[int] = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be bfloat16, float16, float32 or float64, got {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must be [N, V] or [B, T, V], got shape {tuple(x.shape)}")
    if v is not None and x.shape[-1] != v:
        raise ValueError(f"{name} has vocab size {x.shape[-1]}, but student_logits has {v}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has vocab size 0 (shape {tuple(x.shape)}): a distribution needs at least one entry")


def _check_finite(student, original, augmented, valid, teacher_row, reverse):
    """Host-syncing checks of the data, only on request: NaN/+inf in a valid row, a row with no distribution."""
    named = [("student_logits", student.reshape(-1, student.shape[-1])[valid])]
    used = teacher_row[valid]
    for name, t in (("original_logits", original), ("augmented_logits", augmented)):
        if t is not None:
            named.append((name, t.reshape(-1, t.shape[-1])[used]))
    for name, rows in named:
        if torch.isnan(rows).any():
            raise ValueError(f"{name} contains NaN in a valid row")
        if torch.isposinf(rows).any():
            raise ValueError(f"{name} contains +inf in a valid row")
    own = named[0][1] if reverse else named[1][1]
    if own.numel() and (own == float("-inf")).all(-1).any():
        raise ValueError(f"a valid row of {named[0][0] if reverse else named[1][0]} is entirely -inf: "
                         "it has no distribution (the loss would be NaN)")


def _kl_loss(student_logits, original_logits, augmented_logits, alpha, *, labels, ignore_index, mask,
             temperature, reduction, num_items_in_batch, check_finite, teacher_rows, backend, reverse):
    _check_logits("student_logits", student_logits)
    v = student_logits.shape[-1]
    device = student_logits.device
    row_shape = student_logits.shape[:-1]
    n = math.prod(row_shape)
    teachers = [("original_logits", original_logits), ("augmented_logits", augmented_logits)]
    for name, t in teachers:
        if t is None and name == "augmented_logits":
            continue
        _check_logits(name, t, v)
        check_device(name, t, device, "student_logits")
        if t.requires_grad:
            raise ValueError(f"{name} requires grad; the loss gives gradients to student_logits only: "
                             f"pass {name}.detach() (or compute it under torch.no_grad())")
    if augmented_logits is not None and augmented_logits.shape != original_logits.shape:
        raise ValueError(f"augmented_logits has shape {tuple(augmented_logits.shape)}, "
                         f"original_logits {tuple(original_logits.shape)}: they must match")
    check_options(alpha=alpha, temperature=temperature, reduction=reduction, teacher_rows=teacher_rows,
                  num_items_in_batch=num_items_in_batch, ignore_index=ignore_index, sync_ok=check_finite)
    m = math.prod(original_logits.shape[:-1])
    if teacher_rows == "all" and m != n:
        raise ValueError(f"original_logits has {m} rows (shape {tuple(original_logits.shape)}) but student_logits "
                         f"has {n} (shape {tuple(student_logits.shape)}); with teacher_rows='valid' the teacher "
                         "holds one row per valid student row")
    dtypes = {name: t.dtype for name, t in [("student_logits", student_logits)] + teachers if t is not None}
    resolved = resolve(backend, device, dtypes)
    # float64 anywhere is computed in float64 (by the torch backend): the loss and its scale are float64 then
    loss_dtype = torch.float64 if torch.float64 in dtypes.values() else torch.float32

    valid = valid_rows(labels, mask, ignore_index, row_shape, device, of="student_logits")
    if teacher_rows == "all":
        teacher_row = torch.where(valid, torch.arange(n, device=device), -1)
    else:
        teacher_row = torch.where(valid, torch.cumsum(valid, 0) - 1, -1)
    if teacher_rows == "valid" and (check_finite or (device.type == "cpu" and not torch.compiler.is_compiling())):
        count = int(valid.sum())  # a host sync: free on CPU, on request elsewhere
        if count != m:
            raise ValueError(f"teacher_rows='valid' needs one original_logits row per valid student row: "
                             f"{count} valid rows, {m} teacher rows")
    elif teacher_rows == "valid" and not torch.compiler.is_compiling():
        # No host sync on an accelerator: a stream-ordered device assert stops the kernel reading past the teacher.
        torch._assert_async(valid.sum() == m, "teacher_rows='valid': valid student rows != teacher rows")
    elif teacher_rows == "valid":
        # Under torch.compile (no assert op to keep): a count mismatch points every valid row at teacher row m, one
        # past the end, which every backend refuses without reading it (an error, a device assert, or NaN rows).
        teacher_row = torch.where(valid & (valid.sum() != m), m, teacher_row)
    if check_finite:
        _check_finite(student_logits, original_logits, augmented_logits, valid, teacher_row.clamp(min=0), reverse)

    grad_scale = loss_scale(reduction, num_items_in_batch, valid, loss_dtype, device)

    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    rows, _, _ = torch.ops.rklu_fast.kl_div(
        unit_stride(student_logits), unit_stride(original_logits), unit_stride(augmented_logits), teacher_row,
        grad_scale, float(alpha), 1.0 / float(temperature), reverse, compute_grad, resolved)
    if reduction == "none":
        return rows.view(row_shape)
    return rows.sum()


_DOC_ARGS = """
    Args:
        student_logits: `[N, V]` or `[B, T, V]` (bf16/fp16/fp32/fp64, V ≥ 1), the model being trained; gradients
            flow here.
        original_logits: the original model's logits, same vocab; the student's row shape with
            `teacher_rows="all"`, or one row per valid student row (`[M, V]` or `[B, T, V]`) with `"valid"`.
        augmented_logits: the augmented model's logits (shape of `original_logits`) or None: then the teacher is
            `original_logits` itself.
        alpha: teacher `l_t = l_o − α·relu(l_aug − l_o)`; `−inf` wherever `l_o = −inf`.
        labels / ignore_index / mask: row i is valid iff `labels[i] != ignore_index` and `mask[i]` (row shape;
            the op never shifts: pass `logits[:, :-1]` with `labels[:, 1:]`). Ignored rows add 0, get a zero
            gradient and may hold anything, NaN included.
        temperature: distributions are `softmax(z/T)`; no `T²` factor.
        reduction: "mean" (sum over valid rows ÷ number of valid rows, at least 1), "sum", or "none" (per-row
            losses in the row shape, 0 on ignored rows). The result is float32, float64 when an input is float64
            (then computed in float64 by the torch backend, which "auto" picks).
        num_items_in_batch: int or 0-d tensor > 0 replacing the divisor of "mean" (gradient accumulation); a
            tensor is checked only without a host sync (on the CPU; a device assert on a GPU; not under compile).
        check_finite: raise ValueError (syncing the host) for NaN or +inf in a valid row or a valid row with no
            distribution; otherwise such rows give NaN/inf losses, never a silent finite number.
        teacher_rows: "all" or "valid" (see `original_logits`).
        backend: "auto", "torch", "triton", "cpu" or "cuda" (see `rklu_fast.backends()`).
"""


def _public_loss(name: str, reverse: bool, summary: str):
    """One public loss function per direction: the same signature, `reverse` fixed."""

    def loss(student_logits: torch.Tensor, original_logits: torch.Tensor,
             augmented_logits: Optional[torch.Tensor] = None, alpha: float = 8.0, *,
             labels: Optional[torch.Tensor] = None, ignore_index: int = -100, mask: Optional[torch.Tensor] = None,
             temperature: float = 1.0, reduction: str = "mean",
             num_items_in_batch: Union[int, torch.Tensor, None] = None, check_finite: bool = False,
             teacher_rows: str = "all", backend: str = "auto") -> torch.Tensor:
        return _kl_loss(student_logits, original_logits, augmented_logits, alpha, labels=labels,
                        ignore_index=ignore_index, mask=mask, temperature=temperature, reduction=reduction,
                        num_items_in_batch=num_items_in_batch, check_finite=check_finite,
                        teacher_rows=teacher_rows, backend=backend, reverse=reverse)

    loss.__name__ = loss.__qualname__ = name
    loss.__doc__ = summary + "\n" + _DOC_ARGS
    return loss


reverse_kl_loss = _public_loss("reverse_kl_loss", True, "RKLU loss: per valid row `KL(p_θ ‖ p_t) = Σ_v p_θ(v)(log "
                               "p_θ(v) − log p_t(v))`, reduced.")
forward_kl_loss = _public_loss("forward_kl_loss", False, "FKLU loss (and the 'KL' retain term): per valid row "
                               "`KL(p_t ‖ p_θ) = Σ_v p_t(v)(log p_t(v) − log p_θ(v))`, reduced.")
