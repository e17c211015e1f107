"""The reverse-KL implementations that bench_loss.py compares, in one place.

Every loss method is built by `build(name, device, compile_backend)` into a callable
`fn(student, original, augmented, labels, alpha) -> scalar loss` (mean over valid rows, rows with
`labels == IGNORE_INDEX` ignored) and is timed from the same three logits tensors: teacher construction
`l_t = l_o - alpha * relu(l_aug - l_o)` and every log-softmax are inside the timed region.

A method that cannot be built here raises `Unavailable(reason)`; bench_loss.py reports the reason as a result.
torchtune and liger-kernel are benchmark-only competitors, never runtime dependencies of rklu_fast.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
CHUNKS = 8  # row chunks of the chunked variants (torchtune's default num_output_chunks)
RKLU_BACKENDS = ("torch", "triton", "cpu", "cuda")


class Unavailable(Exception):
    """The method cannot run on this machine; the message says why (a reported result, not an omission)."""


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    kind: str  # "loss": a reverse-KL loss; "sol": speed-of-light traffic (addcmul) with no loss
    interpreted_on_cpu: bool = False  # a Triton kernel: on CPU only the interpreter runs it (correctness only)


METHODS = (
    Method("sol_addcmul", "speed of light: addcmul (3 reads + 1 write)", "sol"),
    Method("eager", "eager PyTorch (fp32 log_softmax x2, autograd)", "loss"),
    Method("compile", "torch.compile(eager), whole", "loss"),
    Method("compile_chunked", f"torch.compile(eager), {CHUNKS} row chunks", "loss"),
    Method("torchtune", "torchtune ReverseKLWithChunkedOutputLoss", "loss"),
    Method("liger_jsd", "Liger-Kernel LigerJSD(beta=1) + log_softmax", "loss", interpreted_on_cpu=True),
    *(Method(f"rklu_{b}", f"rklu_fast backend={b}", "loss", interpreted_on_cpu=(b == "triton"))
      for b in RKLU_BACKENDS),
)
BY_NAME = {m.name: m for m in METHODS}


# ----------------------------------------------------------------------------------------------- eager math
def teacher(original: torch.Tensor, augmented: torch.Tensor, alpha: float, acc: torch.dtype) -> torch.Tensor:
    o = original.to(acc)
    return o - alpha * torch.relu(augmented.to(acc) - o)


def row_kl(student, original, augmented, alpha: float, acc: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-row KL(p_student || p_teacher) in `acc` precision: the eager expression every user would write.
    With acc=float64 it is also the benchmark's oracle."""
    log_p = torch.log_softmax(student.to(acc), dim=-1)
    log_q = torch.log_softmax(teacher(original, augmented, alpha, acc), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def eager_loss(student, original, augmented, labels, alpha: float, acc: torch.dtype = torch.float32):
    valid = (labels != IGNORE_INDEX).to(acc)
    return (row_kl(student, original, augmented, alpha, acc) * valid).sum() / valid.sum().clamp_min(1)


def _chunk_sum(student, original, augmented, labels, alpha: float):
    valid = (labels != IGNORE_INDEX).float()
    return (row_kl(student, original, augmented, alpha) * valid).sum()


# ------------------------------------------------------------------------------------------- the builders
def _compiled(fn, compile_backend: str):
    return torch.compile(fn, dynamic=False, backend=compile_backend)


def _chunked(compile_backend: str):
    chunk_sum = _compiled(_chunk_sum, compile_backend)

    def loss(student, original, augmented, labels, alpha):
        total = sum(chunk_sum(s, o, a, lab, alpha) for s, o, a, lab in zip(
            student.chunk(CHUNKS), original.chunk(CHUNKS), augmented.chunk(CHUNKS), labels.chunk(CHUNKS)))
        return total / (labels != IGNORE_INDEX).sum().clamp_min(1)
    return loss


def _torchtune_kd_losses():
    """torchtune's own loss module. `import torchtune` needs torchao (and, through torchtune.models, more), which
    this benchmark does not install; kd_losses.py imports only torch, so fall back to loading that file."""
    try:
        return importlib.import_module("torchtune.modules.loss.kd_losses"), "imported"
    except Exception as import_error:  # noqa: BLE001 - any import failure is reported below
        spec = importlib.util.find_spec("torchtune")
        if spec is None or not spec.submodule_search_locations:
            raise Unavailable("torchtune is not installed (pip install --no-deps torchtune)") from None
        path = os.path.join(spec.submodule_search_locations[0], "modules", "loss", "kd_losses.py")
        file_spec = importlib.util.spec_from_file_location("torchtune_kd_losses", path)
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
        return module, f"loaded torchtune/modules/loss/kd_losses.py by file (import torchtune: " \
                       f"{type(import_error).__name__}: {str(import_error).strip().splitlines()[0][:80]})"


def _torchtune():
    kd_losses, note = _torchtune_kd_losses()
    loss_fn = kd_losses.ReverseKLWithChunkedOutputLoss(num_output_chunks=CHUNKS, ignore_index=IGNORE_INDEX)

    def loss(student, original, augmented, labels, alpha):
        t = teacher(original, augmented, alpha, torch.float32)
        return loss_fn(list(student.chunk(CHUNKS)), list(t.chunk(CHUNKS)), labels.view(1, -1))
    return loss, note


def _liger(device: str):
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise Unavailable("Liger's Triton kernel runs on CPU only under TRITON_INTERPRET=1")
    try:
        from liger_kernel.transformers import LigerJSD
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"liger-kernel not importable ({type(e).__name__}: {e})"[:200]) from None
    jsd = LigerJSD(beta=1.0, ignore_index=IGNORE_INDEX)  # beta=1: KL(student || teacher), student first

    def loss(student, original, augmented, labels, alpha):
        log_p = torch.log_softmax(student.float(), dim=-1)
        log_q = torch.log_softmax(teacher(original, augmented, alpha, torch.float32), dim=-1)
        return jsd(log_p, log_q, labels)
    return loss


def rklu_usable() -> dict[str, tuple[bool, str]]:
    """{backend: (usable here, why not)} for every rklu_fast backend, from `rklu_fast.backends()`."""
    try:
        import rklu_fast
        info = rklu_fast.backends()
    except Exception as e:  # noqa: BLE001 - the API may not exist yet: report, don't crash
        return {b: (False, f"rklu_fast.backends() failed: {type(e).__name__}: {e}"[:200]) for b in RKLU_BACKENDS}
    usable = {}
    for b in RKLU_BACKENDS:
        entry = info.get(b) if isinstance(info, dict) else (b in info)
        if isinstance(entry, dict):
            ok = bool(entry.get("usable"))
            why = str(entry.get("reason") or entry.get("why") or ("not usable" if not ok else ""))
        else:
            ok, why = bool(entry), "" if entry else "not listed as usable by rklu_fast.backends()"
        usable[b] = (ok, why)
    return usable


# The device type each native backend runs on (torch and triton run on both).
_BACKEND_DEVICE = {"cpu": "cpu", "cuda": "cuda"}


def _rklu(backend: str, device: str):
    ok, why = rklu_usable()[backend]
    if not ok:
        raise Unavailable(f"rklu_fast backend {backend!r} not usable here: {why}")
    if _BACKEND_DEVICE.get(backend, device) != device:
        raise Unavailable(f"rklu_fast backend {backend!r} runs on {_BACKEND_DEVICE[backend]} tensors, not {device}")
    import rklu_fast

    def loss(student, original, augmented, labels, alpha):
        return rklu_fast.reverse_kl_loss(student, original, augmented, alpha=alpha, labels=labels,
                                         backend=backend)
    return loss


def build(name: str, device: str, compile_backend: str = "inductor"):
    """(loss callable, note) for a loss method; raises Unavailable with the reason."""
    note = ""
    if name == "eager":
        fn = eager_loss
    elif name == "compile":
        fn = _compiled(eager_loss, compile_backend)
    elif name == "compile_chunked":
        fn = _chunked(compile_backend)
    elif name == "torchtune":
        fn, note = _torchtune()
    elif name == "liger_jsd":
        fn = _liger(device)
    elif name.startswith("rklu_"):
        fn = _rklu(name[len("rklu_"):], device)
    else:
        raise ValueError(f"name: unknown loss method {name!r}; known: {sorted(BY_NAME)}")
    if compile_backend != "inductor" and name.startswith("compile"):
        note = f"torch.compile(backend={compile_backend!r})"
    return fn, note
