"""Refusal answers for the IDK and IdkDPO baselines: one refusal per line (TOFU's ``idontknow.jsonl`` is plain text
lines despite its name; TOFU reads it with ``readlines()`` and strips each line)."""
from __future__ import annotations

from pathlib import Path

from rklu_fast.data.tofu import default_data_dir, read_text_file

REFUSALS_FILE = "idontknow.jsonl"


def default_refusals_path() -> Path | None:
    """``idontknow.jsonl`` in the TOFU data folder (``rklu_fast.data.default_data_dir``), if there is one."""
    folder = default_data_dir("tofu")
    return folder / REFUSALS_FILE if folder is not None and (folder / REFUSALS_FILE).is_file() else None


def load_refusals(path: str | Path | None, key: str = "unlearn.refusals") -> list[str]:
    """The non-empty stripped lines of ``path`` (default: TOFU's ``idontknow.jsonl``); errors name ``key``."""
    if path is None:
        path = default_refusals_path()
        if path is None:
            raise FileNotFoundError(f"{key}: no refusal file given and no {REFUSALS_FILE} in the TOFU data folder "
                                    "(../shared/data/tofu or $RKLU_DATA_DIR/tofu); set it to a file with one "
                                    "refusal per line")
    lines = [line.strip() for line in read_text_file(path, key).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{key}: {path} has no refusal (one per line)")
    return lines
