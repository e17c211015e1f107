"""The loss straight from hidden states and the LM head: `fused_linear_reverse_kl_loss` / `_forward_kl_loss`.

The student's logits `hidden @ weight.T + bias` never exist in full. The valid rows (ignored rows are dropped
before any matrix product) are taken C at a time; per chunk: one GEMM for the logits, the fused KL kernel through
the custom op `rklu_fast::kl_div` (which writes the logits' gradient), then `dhidden = g·W`, `dW += gᵀ·h` (an
accumulating GEMM into an fp32 buffer) and `db += Σ g`. So the gradients exist when the forward ends; like
`rklu_fast::kl_div`, this op (`rklu_fast::fused_linear_kl`, fake kernel + autograd registered) hands them out in
the backward, multiplied by the incoming gradient. Math, chunking, numerics, FLOPs and measurements:
docs/fused-linear.md.

Also here: `supports_fused_linear(model)` and `fused_linear_parts(model)`, which say whether a Hugging Face
causal LM's logits are exactly `lm_head(last_hidden_state)` and hand out its body and head.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
from torch._subclasses.fake_tensor import is_fake

from rklu_fast.backends import resolve
from rklu_fast.arg_checks import FLOAT_DTYPES, check_device, check_options, loss_scale, unit_stride, valid_rows
from rklu_fast.loss import _own_version

__all__ = ["fused_linear_reverse_kl_loss", "fused_linear_forward_kl_loss", "chunk_rows", "supports_fused_linear",
           "fused_linear_parts", "CHUNK_BUDGET_BYTES"]

# Per-chunk temporaries are budgeted as 3 fp32 [C, V] tensors (student logits, their gradient, and room for a
# teacher or an upcast): C = clamp(budget / (3·V·4 B), 256, N_valid). Larger chunks make the dW GEMM (inner
# dimension C) more efficient: it reads and writes the fp32 dW once per chunk (docs/fused-linear.md).
CHUNK_BUDGET_BYTES = 256 << 20
MIN_CHUNK_ROWS = 256


def chunk_rows(n_valid: int, vocab: int, chunk_size: Optional[int] = None,
               budget_bytes: int = CHUNK_BUDGET_BYTES) -> int:
    """Rows per chunk: `chunk_size` if given, else `clamp(budget / (3·V·4 B), 256, N_valid)`; at most N_valid."""
    c = chunk_size if chunk_size else max(budget_bytes // (3 * vocab * 4), MIN_CHUNK_ROWS)
    return max(1, min(c, n_valid))


# ------------------------------------------------------------------------------------------- the GEMMs
_FP32_OUT_GEMM: dict = {}


def _fp32_out_gemm(device: torch.device) -> bool:
    """Whether `torch.addmm(fp32 C, bf16 A, bf16 B, out_dtype=float32, out=C)` runs here (CUDA, torch ≥ 2.8):
    one GEMM that accumulates into fp32, with no low-precision product in between."""
    if device.type != "cuda":
        return False
    if device not in _FP32_OUT_GEMM:
        try:
            c = torch.zeros(2, 2, device=device)
            a = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
            torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
            torch.mm(a, a, out_dtype=torch.float32, out=c)
            _FP32_OUT_GEMM[device] = True
        except (RuntimeError, TypeError):
            _FP32_OUT_GEMM[device] = False
    return _FP32_OUT_GEMM[device]


def _accumulate_weight_grad(dw: torch.Tensor, g: torch.Tensor, h: torch.Tensor, first: bool) -> None:
    """`dw = gᵀh` (first chunk: nothing to read) or `dw += gᵀh`, written by the GEMM itself into `dw`.

    `dw` is fp32 for bf16/fp16 operands: on CUDA one GEMM with fp32 output (β = 1 accumulates in its epilogue);
    elsewhere (the CPU has no bf16 → fp32 GEMM) this chunk's operands are upcast to fp32 first.
    """
    gt = g.t()
    if dw.dtype != g.dtype:
        if _fp32_out_gemm(g.device):
            if first:
                torch.mm(gt, h, out_dtype=dw.dtype, out=dw)
            else:
                torch.addmm(dw, gt, h, out_dtype=dw.dtype, out=dw)
            return
        gt, h = gt.to(dw.dtype), h.to(dw.dtype)
    if first:
        torch.mm(gt, h, out=dw)
    else:
        dw.addmm_(gt, h)


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _scale_(t: torch.Tensor, factor: torch.Tensor) -> None:
    """`t *= factor` in place, the product formed in fp32 (at least) and rounded once to t's dtype."""
    if t.numel() == 0:
        return
    if t.dtype in (torch.float32, torch.float64):
        t.mul_(factor.to(t.dtype))
    else:
        t.copy_(t.to(torch.float32) * factor)


# ------------------------------------------------------------------------------------------- the chunk loop
def _run(hidden, weight, bias, original, augmented, valid, row_scale, alpha, inv_temperature, reverse,
         compact_teacher, grad_hidden, grad_weight, grad_bias, chunk_size, compute_dtype, backend):
    """(loss rows `[N]`, dhidden `[N, d]`, dW `[V, d]` (fp32 for bf16/fp16 weights), db `[V]` (fp32)), each
    gradient scaled by `row_scale` (0-d, or one factor per row) and `[0]` when not asked for."""
    n, d = hidden.shape
    v = weight.shape[0]
    idx = valid.nonzero().squeeze(1)  # a host sync: the chunking depends on the count of valid rows
    n_valid = idx.numel()
    m = math.prod(original.shape[:-1])
    if compact_teacher and m != n_valid:
        raise ValueError(f"teacher_rows='valid' needs one original_logits row per valid student row: "
                         f"{n_valid} valid rows, {m} teacher rows")
    all_valid = n_valid == n
    c = chunk_rows(n_valid, v, chunk_size or None)
    w = weight.to(compute_dtype)  # a copy only under autocast (as autocast's own linear makes)
    b = None if bias is None else bias.to(compute_dtype)
    per_row = row_scale.dim() == 1
    grad_scale = torch.ones((), dtype=row_scale.dtype, device=hidden.device) if per_row else row_scale
    compute_grad = grad_hidden or grad_weight or grad_bias

    loss_rows = torch.zeros(n, dtype=row_scale.dtype, device=hidden.device)
    dh = hidden.new_zeros((n, d)) if grad_hidden else hidden.new_empty(0)  # ignored rows keep 0
    dw = weight.new_empty((v, d) if grad_weight else (0,), dtype=_accumulator_dtype(weight.dtype))
    db = torch.zeros(v if grad_bias else 0, dtype=_accumulator_dtype(bias.dtype if bias is not None
                                                                      else weight.dtype), device=hidden.device)
    if grad_weight and n_valid == 0:
        dw.zero_()
    for start in range(0, n_valid, c):
        stop = min(start + c, n_valid)
        rows = slice(start, stop) if all_valid else idx[start:stop]
        h = hidden[rows].to(compute_dtype)
        logits = h @ w.t() if b is None else torch.addmm(b, h, w.t())
        teacher_row = (torch.arange(start, stop, device=hidden.device) if compact_teacher or all_valid
                       else rows)
        loss_c, g, _ = torch.ops.rklu_fast.kl_div(logits, original, augmented, teacher_row, grad_scale, alpha,
                                                  inv_temperature, reverse, compute_grad, backend)
        del logits
        if per_row:
            scale = row_scale[rows]
            loss_c = loss_c * scale
            if compute_grad:
                _scale_(g, scale.unsqueeze(1))
        loss_rows[rows] = loss_c
        if not compute_grad:
            continue
        if grad_hidden:
            if all_valid and dh.dtype == g.dtype:
                torch.mm(g, w, out=dh[rows])
            else:
                dh[rows] = (g @ w).to(dh.dtype)
        if grad_weight:
            _accumulate_weight_grad(dw, g, h, first=start == 0)
        if grad_bias:
            db += g.sum(0, dtype=db.dtype)
        del g, h
    return loss_rows, dh, dw, db


# ------------------------------------------------------------------------------------------- the custom op
@torch.library.custom_op("rklu_fast::fused_linear_kl", mutates_args=())
def fused_linear_kl(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    original: torch.Tensor, augmented: Optional[torch.Tensor], valid: torch.Tensor,
                    row_scale: torch.Tensor, alpha: float, inv_temperature: float, reverse: bool,
                    compact_teacher: bool, grad_hidden: bool, grad_weight: bool, grad_bias: bool, reduce: bool,
                    chunk_size: int, compute_dtype: torch.dtype, backend: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dhidden, dW, db) for `hidden [N, d]`, `weight [V, d]`, `bias [V]` or None.

    `valid` (bool `[N]`) selects the rows; teacher row of valid row i: i itself, or with `compact_teacher` its
    rank among the valid rows. `reduce`: the loss is `Σ_i row_scale·KL_i` (0-d; `row_scale` 0-d) and the
    gradients asked for by `grad_*` are computed now (scaled by `row_scale`; dW and db in the fp32 accumulator
    dtype). Not `reduce`: the per-row losses `[N]` only, unscaled (`row_scale` is 1: `reduction='none'`); the
    backward then recomputes the gradients with the rows' incoming gradients as `row_scale`. `chunk_size` 0: from
    the budget (`chunk_rows`).
    """
    with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are chosen explicitly
        loss_rows, dh, dw, db = _run(hidden, weight, bias, original, augmented, valid, row_scale, alpha,
                                     inv_temperature, reverse, compact_teacher, grad_hidden and reduce,
                                     grad_weight and reduce, grad_bias and reduce, chunk_size, compute_dtype,
                                     backend)
    return (loss_rows.sum() if reduce else loss_rows), dh, dw, db


@fused_linear_kl.register_fake
def _(hidden, weight, bias, original, augmented, valid, row_scale, alpha, inv_temperature, reverse,
      compact_teacher, grad_hidden, grad_weight, grad_bias, reduce, chunk_size, compute_dtype, backend):
    n, d = hidden.shape
    v = weight.shape[0]
    loss = row_scale.new_empty(() if reduce else (n,))
    dh = hidden.new_empty((n, d) if grad_hidden and reduce else (0,))
    dw = weight.new_empty((v, d) if grad_weight and reduce else (0,), dtype=_accumulator_dtype(weight.dtype))
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    db = weight.new_empty((v,) if grad_bias and reduce else (0,), dtype=_accumulator_dtype(bias_dtype))
    return loss, dh, dw, db


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, original, augmented, valid, row_scale, alpha, inv_temperature, reverse,
     compact_teacher, grad_hidden, grad_weight, grad_bias, reduce, chunk_size, compute_dtype, backend) = inputs
    ctx.set_materialize_grads(False)  # the gradient outputs get no gradient: no zeros [V, d] in the backward
    ctx.reduce = reduce
    ctx.loss_dtype = row_scale.dtype
    ctx.computed = (grad_hidden, grad_weight, grad_bias)  # the op hands out only the gradients it was asked for
    ctx.weight_dtype = weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.backwards_done = False
    ctx.applied = None
    if reduce:
        ctx.save_for_backward(*output[1:])
    else:  # the backward runs the op again with the rows' incoming gradients: keep its inputs (no copies)
        ctx.save_for_backward(hidden, weight, bias, original, augmented, valid)
        ctx.args = (alpha, inv_temperature, reverse, compact_teacher, chunk_size, compute_dtype, backend)


def _backward(ctx, grad_loss, _g_dh, _g_dw, _g_db):
    wants = [need and asked for need, asked in zip(ctx.needs_input_grad[:3], ctx.computed)]
    if grad_loss is None or not any(wants):
        return (None,) * 18
    if ctx.reduce:
        dh, dw, db = ctx.saved_tensors
        go = grad_loss.to(ctx.loss_dtype)
        first = not ctx.backwards_done
        ctx.backwards_done = True
        if first and not (torch.compiler.is_compiling() or is_fake(go)):
            # The buffers the forward filled are scaled in place and handed out (through aliases with their own
            # version counters, so that a retained graph can still unpack them); nothing to do when go is 1.
            if go.device.type != "cpu" or bool(go != 1):
                for t in (dh, dw, db):
                    _scale_(_own_version(t), go)
            ctx.applied = go.detach().clone()
        else:
            # Graph capture cannot mutate a forward output, and a later backward (retain_graph=True) must not
            # change a gradient already handed out: scale out of place, relative to what the buffers hold.
            # After a first backward with go = 0 the scale is lost: inf ratio, NaN gradient (stopped loudly by
            # the training loop's finiteness check).
            ratio = go if ctx.applied is None else torch.where(go != ctx.applied, go / ctx.applied, 1.0)
            dh, dw, db = ((t.to(_accumulator_dtype(t.dtype)) * ratio).to(t.dtype) for t in (dh, dw, db))
    else:
        hidden, weight, bias, original, augmented, valid = ctx.saved_tensors
        _, dh, dw, db = torch.ops.rklu_fast.fused_linear_kl(
            hidden, weight, bias, original, augmented, valid, grad_loss.to(ctx.loss_dtype), *ctx.args[:4],
            wants[0], wants[1], wants[2], True, *ctx.args[4:])
    return ((dh if wants[0] else None), (dw.to(ctx.weight_dtype) if wants[1] else None),
            (db.to(ctx.bias_dtype) if wants[2] else None)) + (None,) * 15


fused_linear_kl.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------- argument checks
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_float(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be bfloat16, float16, float32 or float64, got {_dtype_name(x.dtype)}")


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.dtype:
    """The matmul dtype: autocast's when it is on for this device, else the one dtype of hidden/weight/bias."""
    kind = hidden.device.type
    try:
        autocast = torch.is_autocast_enabled(kind)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        autocast = False
    if autocast and torch.float64 not in (hidden.dtype, weight.dtype):  # autocast leaves float64 alone
        return torch.get_autocast_dtype(kind)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden is {_dtype_name(hidden.dtype)} but weight is {_dtype_name(weight.dtype)}: pass "
                        "them in one dtype (or run under torch.autocast, which computes in its own dtype)")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias is {_dtype_name(bias.dtype)} but weight is {_dtype_name(weight.dtype)}: pass "
                        "them in one dtype (or run under torch.autocast, which computes in its own dtype)")
    return weight.dtype


def _check_options(alpha, temperature, reduction, teacher_rows, num_items_in_batch, ignore_index, chunk_size):
    check_options(alpha=alpha, temperature=temperature, reduction=reduction, teacher_rows=teacher_rows,
                  num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                  sync_ok=True)  # the op reads its valid-row count on the host anyway: a clear error costs nothing
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None (from the memory budget) or an int >= 1, got {chunk_size!r}")


def _fused_kl_loss(hidden, weight, original_logits, augmented_logits, alpha, *, bias, labels, ignore_index, mask,
                   temperature, reduction, num_items_in_batch, teacher_rows, chunk_size, backend, reverse):
    _check_float("hidden", hidden)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, d] or [B, T, d], got shape {tuple(hidden.shape)}")
    d = hidden.shape[-1]
    device = hidden.device
    _check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"weight must be [V, d] with d = {d} (hidden's last dim; the lm_head's weight, not its "
                         f"transpose), got shape {tuple(weight.shape)}")
    check_device("weight", weight, device, "hidden")
    v = weight.shape[0]
    if v == 0:
        raise ValueError(f"weight has 0 rows (shape {tuple(weight.shape)}): a distribution needs at least one entry")
    if bias is not None:
        _check_float("bias", bias)
        if tuple(bias.shape) != (v,):
            raise ValueError(f"bias must be [V] = [{v}] (weight has {v} rows), got shape {tuple(bias.shape)}")
        check_device("bias", bias, device, "hidden")
    for name, t in (("original_logits", original_logits), ("augmented_logits", augmented_logits)):
        if t is None and name == "augmented_logits":
            continue
        _check_float(name, t)
        if t.dim() not in (2, 3):
            raise ValueError(f"{name} must be [M, V] or [B, T, V], got shape {tuple(t.shape)}")
        if t.shape[-1] != v:
            raise ValueError(f"{name} has vocab size {t.shape[-1]}, but weight has {v} rows (vocab entries)")
        check_device(name, t, device, "hidden")
        if t.requires_grad:
            raise ValueError(f"{name} requires grad; the loss gives gradients to hidden, weight and bias only: "
                             f"pass {name}.detach() (or compute it under torch.no_grad())")
    if augmented_logits is not None and augmented_logits.shape != original_logits.shape:
        raise ValueError(f"augmented_logits has shape {tuple(augmented_logits.shape)}, "
                         f"original_logits {tuple(original_logits.shape)}: they must match")
    _check_options(alpha, temperature, reduction, teacher_rows, num_items_in_batch, ignore_index, chunk_size)
    row_shape = hidden.shape[:-1]
    n = math.prod(row_shape)
    m = math.prod(original_logits.shape[:-1])
    if teacher_rows == "all" and m != n:
        raise ValueError(f"original_logits has {m} rows (shape {tuple(original_logits.shape)}) but hidden has {n} "
                         f"(shape {tuple(hidden.shape)}); with teacher_rows='valid' the teacher holds one row per "
                         "valid row")
    compute_dtype = _compute_dtype(hidden, weight, bias)
    dtypes = {name: t.dtype for name, t in (("original_logits", original_logits),
                                            ("augmented_logits", augmented_logits)) if t is not None}
    dtypes["hidden"] = compute_dtype  # the student's logits are in the GEMMs' dtype
    resolved = resolve(backend, device, dtypes)
    # float64 anywhere is computed in float64 (by the torch backend): the loss and its scale are float64 then
    loss_dtype = torch.float64 if torch.float64 in dtypes.values() else torch.float32

    valid = valid_rows(labels, mask, ignore_index, row_shape, device, of="hidden")
    row_scale = loss_scale(reduction, num_items_in_batch, valid, loss_dtype, device)

    grad_on = torch.is_grad_enabled()
    loss, _, _, _ = torch.ops.rklu_fast.fused_linear_kl(
        hidden.reshape(n, d), weight, bias, unit_stride(original_logits), unit_stride(augmented_logits), valid,
        row_scale, float(alpha), 1.0 / float(temperature), reverse, teacher_rows == "valid",
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad, reduction != "none", chunk_size or 0, compute_dtype,
        resolved)
    return loss.view(row_shape) if reduction == "none" else loss


_DOC_ARGS = """
    Args:
        hidden: `[N, d]` or `[B, T, d]` (bf16/fp16/fp32/fp64): the states the LM head reads (e.g. the body's
            `last_hidden_state[:, :-1]`); gradients flow here when it requires grad.
        weight: the LM head's weight `[V, d]` (`lm_head.weight`, as stored); its gradient is computed only when it
            requires grad (a frozen head, as with LoRA, costs no dW GEMM).
        original_logits / augmented_logits / alpha / labels / ignore_index / mask / temperature / reduction /
            num_items_in_batch / teacher_rows / backend: as in `reverse_kl_loss`, with the student's logits
            being `hidden @ weight.T + bias` (row shape: `hidden.shape[:-1]`).
        bias: the LM head's bias `[V]` or None (Phi-1.5's head has one, Llama's none).
        chunk_size: rows per chunk; None: `clamp(256 MiB / (3·V·4 B), 256, N_valid)` (`chunk_rows`).

    Computes in hidden/weight's dtype (the same dtype required), or under `torch.autocast` in autocast's dtype;
    the logits and their gradient are in that dtype, as `lm_head(hidden)` gives them; dW and db accumulate in
    fp32 and are returned in the parameter's dtype. Deterministic; one host sync (the count of valid rows).
"""


def _public_loss(name: str, reverse: bool, summary: str):
    """One public loss function per direction: the same signature, `reverse` fixed."""

    def loss(hidden: torch.Tensor, weight: torch.Tensor, original_logits: torch.Tensor,
             augmented_logits: Optional[torch.Tensor] = None, alpha: float = 8.0, *,
             bias: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None, ignore_index: int = -100,
             mask: Optional[torch.Tensor] = None, temperature: float = 1.0, reduction: str = "mean",
             num_items_in_batch: Union[int, torch.Tensor, None] = None, teacher_rows: str = "all",
             chunk_size: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
        return _fused_kl_loss(hidden, weight, original_logits, augmented_logits, alpha, bias=bias, labels=labels,
                              ignore_index=ignore_index, mask=mask, temperature=temperature, reduction=reduction,
                              num_items_in_batch=num_items_in_batch, teacher_rows=teacher_rows,
                              chunk_size=chunk_size, backend=backend, reverse=reverse)

    loss.__name__ = loss.__qualname__ = name
    loss.__doc__ = summary + "\n" + _DOC_ARGS
    return loss


fused_linear_reverse_kl_loss = _public_loss(
    "fused_linear_reverse_kl_loss", True,
    "`reverse_kl_loss(hidden @ weight.T + bias, ...)` without ever holding the `[N, V]` student logits.")
fused_linear_forward_kl_loss = _public_loss(
    "fused_linear_forward_kl_loss", False,
    "`forward_kl_loss(hidden @ weight.T + bias, ...)` without ever holding the `[N, V]` student logits.")


# ------------------------------------------------------------------------------------------- models
# Causal LMs whose logits are `lm_head(body(...).last_hidden_state)`: the body is `model.model`.
_PLAIN_HEAD_MODELS = ("LlamaForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM")
# Config fields by which transformers models change logits after the head: soft-capping (any value), scaling
# (any value but 1).
_SOFTCAP_FIELDS = ("final_logit_softcapping", "logit_softcapping")
_SCALE_FIELDS = ("logit_scale", "logits_scaling", "output_multiplier_scale", "lm_head_multiplier", "logits_scale")


def _unwrap(model):
    """The transformers model under a peft wrapper, or (None, reason) for wrappers whose forward must run."""
    kind = type(model).__name__
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        FSDPModule = ()
    if isinstance(model, FSDPModule):
        return None, (f"the model is sharded with FSDP2 ({kind}): its forward gathers the shards, so the body and "
                      "the head cannot be called apart")
    if kind in ("DistributedDataParallel", "FullyShardedDataParallel", "DataParallel"):
        return None, (f"the model is wrapped in {kind}, whose forward must run (gradient synchronisation); "
                      "calling its body directly would skip it")
    if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft.PeftModel
        model = model.get_base_model()
    return model, None


def supports_fused_linear(model) -> tuple[bool, str]:
    """(True, "") when the logits of `model` are exactly `model.lm_head(model.model(...).last_hidden_state)`
    (a Hugging Face Llama or Phi causal LM, also under a peft wrapper, with a plain `torch.nn.Linear` head and
    no logit scaling or soft-capping), else (False, why)."""
    inner, why = _unwrap(model)
    if inner is None:
        return False, why
    kind = type(inner).__name__
    if kind not in _PLAIN_HEAD_MODELS:
        return False, f"{kind} is not one of the supported causal LMs {_PLAIN_HEAD_MODELS}"
    forward_module = getattr(type(inner).forward, "__module__", "") or ""
    if not forward_module.startswith("transformers."):
        return False, (f"{kind}.forward comes from {forward_module or 'elsewhere'}, not transformers (patched): "
                       "its logits may not be lm_head(last_hidden_state)")
    config = getattr(inner, "config", None)
    for field in _SOFTCAP_FIELDS + _SCALE_FIELDS:
        value = getattr(config, field, None)
        if value is not None and (field in _SOFTCAP_FIELDS or value != 1):
            return False, f"config.{field} = {value!r} changes the logits after the head"
    body, head = getattr(inner, "model", None), getattr(inner, "lm_head", None)
    if not isinstance(body, torch.nn.Module):
        return False, f"{kind} has no body module `model`"
    if type(head) is not torch.nn.Linear:  # an adapter, quantised or offloaded layer computes something else
        return False, f"lm_head is a {type(head).__name__}, not a plain torch.nn.Linear (adapter or quantised?)"
    if not head.weight.dtype.is_floating_point:
        return False, f"lm_head.weight is {_dtype_name(head.weight.dtype)}, not a floating-point tensor"
    if head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook"):
        return False, "lm_head has forward hooks (e.g. accelerate offloading): its output may differ from x @ W.T + b"
    return True, ""


def fused_linear_parts(model) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """(body, lm_head) of a supported model: `body(input_ids=..., attention_mask=...).last_hidden_state` are the
    hidden states the head reads. ValueError with the reason for an unsupported model."""
    ok, why = supports_fused_linear(model)
    if not ok:
        raise ValueError(f"model: fused linear loss not supported: {why}")
    inner, _ = _unwrap(model)
    return inner.model, inner.lm_head
