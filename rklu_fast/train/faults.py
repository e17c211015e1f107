"""Injected write failures, for tests of what a crash or a full disk leaves behind.

``RKLU_FAULT_AT=<role>:<step>:<file>[:kill]``: when the epoch checkpoint written after optimizer step ``<step>`` of
``<role>`` (original, oracle, augmented, unlearned) is complete in its temporary directory, ``<file>`` (a path
inside the checkpoint: ``model.safetensors``, ``training_state.pt``, ``tokenizer.json``, ``manifest.json`` …) is
cut to half its size, as a write that stopped midway leaves it, and the write fails: with ``OSError`` ENOSPC (a
full disk), or with ``kill`` the process exits at once with status 137, as after SIGKILL (no cleanup runs).
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

ENV = "RKLU_FAULT_AT"


def _parse(spec: str) -> tuple[str, int, str, bool]:
    parts = spec.split(":")
    if len(parts) not in (3, 4) or not parts[1].isdigit() or parts[3:] not in ([], ["kill"]) or not parts[2]:
        raise ValueError(f"{ENV}: expected <role>:<step>:<file>[:kill], e.g. unlearned:4:model.safetensors, "
                         f"got {spec!r}")
    return parts[0], int(parts[1]), parts[2], parts[3:] == ["kill"]


def at_checkpoint_write(directory: str | Path, role: str, step: int) -> None:
    """Called with the complete temporary directory of a checkpoint, before it is renamed into place."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    want_role, want_step, name, kill = _parse(spec)
    if (want_role, want_step) != (role, step):
        return
    target = Path(directory) / name
    if not target.is_file():
        have = sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*") if p.is_file())
        raise ValueError(f"{ENV}: the checkpoint has no file {name!r}; it has {have}")
    with open(target, "r+b") as f:
        f.truncate(target.stat().st_size // 2)
    if kill:
        os._exit(137)
    raise OSError(errno.ENOSPC, f"No space left on device (injected by {ENV}={spec})", str(target))
