"""JSON outputs: never a bare NaN/Infinity (invalid JSON that most readers reject) and never half a file.

``finite(value)`` replaces every non-finite float with ``null`` and marks the dict that held it with
``"nonfinite": true`` (a list's owner dict is marked too: one level, the list itself holds ``null``);
``write_json`` writes a temporary file, fsyncs it and renames it over the target, so a reader sees the old file
or the new one."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _bad(x) -> bool:
    return isinstance(x, float) and not math.isfinite(x)


def finite(value):
    if _bad(value):
        return None
    if isinstance(value, dict):
        clean = {k: finite(v) for k, v in value.items()}
        if any(_bad(v) or isinstance(v, (list, tuple)) and any(_bad(x) for x in v) for v in value.values()):
            clean["nonfinite"] = True
        return clean
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(data, **kwargs) -> str:
    return json.dumps(finite(data), allow_nan=False, **kwargs)


def write_json(path: str | Path, data, indent: int | None = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dumps(data, indent=indent) + "\n"  # before the file exists: a serialisation error leaves nothing
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a power loss leaves the old file or the new one
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_report(stem: str | Path, data, markdown_lines: list[str], echo: bool = True) -> None:
    """``<stem>.json`` (``write_json``) and ``<stem>.md`` from ``markdown_lines``; the Markdown is printed too."""
    stem = Path(stem)
    write_json(stem.with_name(stem.name + ".json"), data)
    text = "\n".join(markdown_lines) + "\n"
    stem.with_name(stem.name + ".md").write_text(text, encoding="utf-8")
    if echo:
        print(text, end="")
