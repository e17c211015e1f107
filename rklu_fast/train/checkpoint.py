"""Atomic checkpoints in ``save_pretrained`` form, and the training state that makes ``--resume`` exact.

A checkpoint directory holds the model (``save_pretrained``; of a peft model only its active adapter, see
``lora.save_adapter``), the tokenizer, and ``training_state.pt`` (step, optimizer, scheduler, RNG states).  It is
written to a temporary sibling, fsynced, then renamed: a killed run leaves either the whole checkpoint or none,
never half of one.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

STATE_FILE = "training_state.pt"
_EPOCH_DIR = re.compile(r"^epoch-(\d+)$")


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


def save_model(path: str | Path, model, tokenizer=None) -> None:
    """The model (and tokenizer) in ``save_pretrained`` form, written atomically."""
    with atomic_directory(path) as tmp:
        _save_pretrained(tmp, model, tokenizer)


def _save_pretrained(directory: Path, model, tokenizer) -> None:
    peft = sys.modules.get("peft")  # a PeftModel exists only once peft is imported
    if peft is not None and isinstance(model, peft.PeftModel):  # LoRA: the trained adapter, not the frozen base
        from rklu_fast.train.lora import save_adapter

        save_adapter(directory, model)
    else:
        model.save_pretrained(directory)
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


def save_checkpoint(path: str | Path, model, tokenizer, *, step: int, optimizer, scheduler) -> None:
    """Model + tokenizer + everything needed to continue exactly from ``step`` (atomic)."""
    with atomic_directory(path) as tmp:
        _save_pretrained(tmp, model, tokenizer)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_state()}, tmp / STATE_FILE)


def load_training_state(path: str | Path) -> dict:
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)


def epoch_checkpoints(directory: str | Path) -> list[Path]:
    """Complete epoch checkpoints under ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _EPOCH_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(directory: str | Path, keep_last: int) -> None:
    for old in epoch_checkpoints(directory)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
