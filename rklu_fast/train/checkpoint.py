"""Atomic, verifiable checkpoints in ``save_pretrained`` form, and the training state that makes ``--resume`` exact.

A checkpoint directory holds the model (``save_pretrained``; of a peft model only its active adapter, see
``lora.save_adapter``), the tokenizer, ``training_state.pt`` (step, optimizer, scheduler, RNG states) and, written
last, ``manifest.json``: every file's size and xxh3-64 checksum (fast enough to re-read a 7B checkpoint's ≈ 40 GB
at disk speed; a cryptographic hash would add nothing against torn writes and bit rot).  The whole is written to a
temporary sibling, fsynced, then renamed: a killed run or a failed write leaves either the whole checkpoint or
none, never half of one, and the previous checkpoints untouched.

A sharded checkpoint (``distributed.engine: fsdp2``, written by ``distributed.save_checkpoint``) has the same
atomic directory and manifest, with the model's and optimizer's shards under ``dcp/`` (``torch.distributed.
checkpoint``) in place of the ``save_pretrained`` weights and the optimizer in ``training_state.pt``
(``is_sharded``).

On ``--resume``, ``resume_point`` verifies the latest checkpoint against its manifest; a damaged or incomplete one
is reported by file name and the previous intact one is used; none left is an error saying what to do.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from rklu_fast.train import faults

STATE_FILE = "training_state.pt"
MANIFEST = "manifest.json"
SHARDED_DIR = "dcp"  # a sharded checkpoint's model and optimizer (torch.distributed.checkpoint; distributed.py)
_EPOCH_DIR = re.compile(r"^epoch-(\d+)$")
_LEFTOVER = re.compile(r"^\.epoch-\d+\.(tmp|old)-(\d+)$")  # what a killed atomic write leaves beside the checkpoints
_CHUNK = 8 << 20  # bytes read per checksum update


class CheckpointError(RuntimeError):
    """No intact checkpoint to resume from; the message names the damage and the remedy."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, I/O error); the earlier checkpoints are intact."""


def raise_on_every_rank(failure: CheckpointWriteError | None, accelerator) -> None:
    """Collective in a multi-process run: raise the one writer's ``failure`` on every rank."""
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        messages = [m for m in gather_object([None if failure is None else str(failure)]) if m is not None]
        if messages and failure is None:
            failure = CheckpointWriteError(messages[0])
    if failure is not None:
        raise failure


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(path: str | Path):
    """Yield a temporary directory; on success it is fsynced and renamed to ``path`` (replacing it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():  # replace: move the old one aside first, rename is atomic only onto a missing dir
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model(path: str | Path, model, tokenizer=None, state_dict: dict | None = None) -> None:
    """The model (and tokenizer) in ``save_pretrained`` form with a manifest, written atomically; a failed write
    raises ``CheckpointWriteError`` and leaves ``path`` as it was.  ``state_dict``: the weights to write instead
    of the model's own (a sharded model's gathered full state dict)."""
    try:
        with atomic_directory(path) as tmp:
            _save_pretrained(tmp, model, tokenizer, state_dict)
            write_manifest(tmp)
    except Exception as e:  # disk full surfaces as OSError, torch's RuntimeError or a SafetensorError
        raise CheckpointWriteError(f"model {path}: writing failed ({type(e).__name__}: {e}); nothing of it was "
                                   "kept, and the stage's epoch checkpoints are untouched") from e


def _save_pretrained(directory: Path, model, tokenizer, state_dict: dict | None = None) -> None:
    peft = sys.modules.get("peft")  # a PeftModel exists only once peft is imported
    kwargs = {} if state_dict is None else {"state_dict": state_dict}
    if peft is not None and isinstance(model, peft.PeftModel):  # LoRA: the trained adapter, not the frozen base
        from rklu_fast.train.lora import write_adapter

        write_adapter(directory, model, **kwargs)
    else:
        model.save_pretrained(directory, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, model, tokenizer, *, step: int, optimizer, scheduler,
                    role: str | None = None) -> None:
    """Model + tokenizer + everything needed to continue exactly from ``step``, then the manifest (atomic).

    ``role``: the stage's role, for fault injection (default: the name two levels up, as in
    ``<run_dir>/<role>/checkpoints/epoch-K``).  A failed write raises ``CheckpointWriteError`` and leaves the
    earlier checkpoints as they were; a successful one removes what killed writes left beside it.
    """
    path = Path(path)
    try:
        with atomic_directory(path) as tmp:
            _save_pretrained(tmp, model, tokenizer)
            torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": rng_state()}, tmp / STATE_FILE)
            write_manifest(tmp)
            faults.at_checkpoint_write(tmp, role or path.parent.parent.name, step)
    except Exception as e:  # disk full surfaces as OSError, torch's RuntimeError or a SafetensorError
        earlier = [p.name for p in epoch_checkpoints(path.parent) if p != path]
        kept = f"the earlier checkpoints ({', '.join(earlier)}) are untouched" if earlier else \
            "no earlier checkpoint of this stage exists"
        raise CheckpointWriteError(f"checkpoint {path}: writing failed ({type(e).__name__}: {e}); nothing of it "
                                   f"was kept and {kept}") from e
    remove_superseded(path)


def load_training_state(path: str | Path) -> dict:
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)


def is_sharded(path: str | Path) -> bool:
    """Whether the checkpoint at ``path`` holds sharded state (written by ``distributed.save_checkpoint``; the
    model's weights are restored into the sharded model, not loaded with ``from_pretrained``)."""
    return (Path(path) / SHARDED_DIR).is_dir()


# ---------------------------------------------------------------------------------------------- manifests
def file_checksum(path: str | Path) -> tuple[int, str]:
    """(size in bytes, xxh3-64 hex digest) of a file, read in chunks."""
    import xxhash

    h, size = xxhash.xxh3_64(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def write_manifest(directory: str | Path) -> None:
    """``manifest.json`` listing every other file under ``directory``: relative path, size, xxh3-64 checksum.
    Written last, so its presence also says that everything before it was written."""
    directory = Path(directory)
    files = {}
    for p in sorted(q for q in directory.rglob("*") if q.is_file() and q.name != MANIFEST):
        size, digest = file_checksum(p)
        files[p.relative_to(directory).as_posix()] = {"size": size, "xxh3_64": digest}
    (directory / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=1) + "\n")


def _read_manifest(directory: Path) -> tuple[dict | None, str | None]:
    if not (directory / MANIFEST).is_file():
        return None, f"{MANIFEST} is missing (it is written last: the checkpoint is incomplete)"
    try:
        files = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))["files"]
        sizes = {name: int(entry["size"]) for name, entry in files.items()}
        digests = {name: str(entry["xxh3_64"]) for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    return {name: (sizes[name], digests[name]) for name in files}, None


def verify(directory: str | Path, required: tuple[str, ...] = (STATE_FILE,), checksums: bool = True) -> str | None:
    """What is wrong with the checkpoint at ``directory`` (one line naming the file), or ``None`` when every file
    has the size and checksum its manifest records and the ``required`` files are there.  ``checksums=False``:
    sizes only (no reading)."""
    directory = Path(directory)
    manifest, problem = _read_manifest(directory)
    if problem:
        return problem
    if is_sharded(directory):
        required = (*required, f"{SHARDED_DIR}/.metadata")
    for name in required:
        if not (directory / name).is_file():
            return f"{name} is missing (the optimizer, scheduler and step cannot be restored)" \
                if name == STATE_FILE else f"{name} is missing"
    for name, (size, _) in manifest.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {MANIFEST} says {size}"
    if checksums:
        for name, (_, digest) in manifest.items():
            got = file_checksum(directory / name)[1]
            if got != digest:
                return f"{name} does not match its checksum (xxh3-64 {got}, {MANIFEST} says {digest}): its bytes " \
                       "changed after it was written"
    return None


# ---------------------------------------------------------------------------------------------- epoch checkpoints
def epoch_checkpoints(directory: str | Path) -> list[Path]:
    """The ``epoch-K`` directories under ``directory``, oldest first, complete or not (``verify`` tells)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _EPOCH_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resume_point(directory: str | Path, report=None) -> Path | None:
    """The newest intact epoch checkpoint under ``directory`` (``None`` when there is none at all).

    Each damaged newer one is reported by ``report`` (default: a line on stderr) naming its bad file and the
    checkpoint used instead.  When every checkpoint is damaged, ``CheckpointError`` says what is wrong with each
    and how to go on: resuming would otherwise restart the stage from step 0 without a word.
    """
    directory = Path(directory)
    report = report or (lambda line: print(f"rklu: warning: {line}", file=sys.stderr))
    damaged = []
    for path in reversed(epoch_checkpoints(directory)):
        problem = verify(path)
        if problem is None:
            for bad, why in damaged:
                report(f"checkpoint {bad}: {why}; resuming from {path.name}")
            return path
        damaged.append((path, problem))
    if damaged:
        details = "; ".join(f"{p.name}: {why}" for p, why in damaged)
        raise CheckpointError(f"checkpoint {directory}: no intact checkpoint to resume from ({details}). Delete "
                              f"{directory} to restart this stage from step 0, or use a new run_dir")
    return None


def prune_checkpoints(directory: str | Path, keep_last: int) -> None:
    """Keep the ``keep_last`` newest checkpoints whose files have their manifest sizes (a cheap check: no
    reading); delete the rest, damaged ones included."""
    if keep_last < 1:
        raise ValueError(f"checkpoint.keep_last: must be at least 1 (the newest checkpoint is what resumes), got "
                         f"{keep_last}")
    kept = 0
    for path in reversed(epoch_checkpoints(directory)):
        if kept < keep_last and verify(path, checksums=False) is None:
            kept += 1
        else:
            shutil.rmtree(path)


def remove_superseded(written: Path) -> None:
    """After ``written`` (epoch-K) is in place: checkpoints of later epochs are from before a resume that fell back
    past them (damaged, or about to be rewritten identically), and temporary directories of other processes are
    what killed writes left."""
    k = int(_EPOCH_DIR.match(written.name).group(1))
    for p in written.parent.iterdir():
        m, leftover = _EPOCH_DIR.match(p.name), _LEFTOVER.match(p.name)
        if m and int(m.group(1)) > k or leftover and int(leftover.group(2)) != os.getpid():
            shutil.rmtree(p, ignore_errors=True)
