"""Model references, in configs and on the command line: a local folder or a hub id (``name`` / ``owner/name``).

One rule for telling them apart and one loader whose errors name the config key or option, so that a typo gives a
single line before any compute instead of a transformers traceback after minutes.
"""
from __future__ import annotations

from pathlib import Path

from rklu_fast.config import ConfigError


def looks_local(ref) -> bool:
    """A hub id is ``name`` or ``owner/name``; absolute, ``./``-relative or deeper references are paths."""
    ref = str(ref)
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or Path(ref).exists()


def missing_local(ref) -> bool:
    """``ref`` can only be a local path, and nothing is there."""
    return looks_local(ref) and not Path(ref).exists()


def from_pretrained(cls, key: str, ref, **kwargs):
    """``cls.from_pretrained(ref, **kwargs)``; transformers' OSError (not a hub id, no network, no config or weights
    in the folder) or ValueError (a folder of something else) becomes a ConfigError naming ``key``."""
    try:
        return cls.from_pretrained(ref, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot load {str(ref)!r} with {cls.__name__}: {e}") from None
