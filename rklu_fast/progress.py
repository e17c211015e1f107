"""Progress: a tqdm bar on a terminal, plain periodic lines anywhere else (a log file or a pipe would otherwise
collect every redraw of the bar, ``\\r`` by ``\\r``).

``progress(...)`` takes tqdm's arguments and returns an object with the part of tqdm's interface training uses:
``update(n)``, ``set_postfix(**values)``, ``close()``.
"""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


def progress(total: int, *, initial: int = 0, desc: str = "", unit: str = "it", disable: bool = False,
             stream=None, every_percent: float = 10.0, every_seconds: float = 60.0, **tqdm_kwargs):
    """A tqdm bar when ``stream`` (default: stderr) is a terminal; otherwise ``LineProgress``, one line per
    ``every_percent`` of ``total`` or ``every_seconds``, whichever comes first, and one at the end."""
    stream = sys.stderr if stream is None else stream
    if disable or _is_terminal(stream):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, file=stream, **tqdm_kwargs)
    return LineProgress(total, initial=initial, desc=desc, unit=unit, stream=stream, every_percent=every_percent,
                        every_seconds=every_seconds)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """``desc: n/total units (p%), rate, elapsed, ETA, postfix`` lines, written by ``update`` when one is due (with
    the latest ``set_postfix`` values: set them before the ``update`` of their step), and by ``close``."""

    def __init__(self, total: int, *, initial: int = 0, desc: str = "", unit: str = "it", stream=None,
                 every_percent: float = 10.0, every_seconds: float = 60.0):
        self.total, self.n, self.initial, self.desc, self.unit = total, initial, initial, desc, unit
        self.stream = sys.stderr if stream is None else stream
        self.every_percent, self.every_seconds = every_percent, every_seconds
        self.postfix: dict = {}
        self._start = self._last_time = time.monotonic()
        self._last_n = initial

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._mark(self.n) > self._mark(self._last_n) or time.monotonic() - self._last_time >= self.every_seconds:
            self._write()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **values) -> None:
        self.postfix = {**(ordered_dict or {}), **values}

    def close(self) -> None:
        if self.n != self._last_n:
            self._write()

    def line(self) -> str:
        elapsed = time.monotonic() - self._start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.n}/{self.total} {self.unit}s" + (f" ({100.0 * self.n / self.total:.0f}%)" if self.total
                                                          else "")]
        if done and rate > 0:
            parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}")
            parts.append(f"{tqdm.format_interval(elapsed)} elapsed")
            if self.total and self.n < self.total:
                parts.append(f"ETA {tqdm.format_interval((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(" ".join(f"{k}={v}" for k, v in self.postfix.items()))
        return (f"{self.desc}: " if self.desc else "") + ", ".join(parts)

    def _mark(self, n: int) -> int:
        """How many ``every_percent`` marks ``n`` steps have passed."""
        return int((100.0 * n / self.total if self.total else 100.0) // self.every_percent)

    def _write(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._last_n, self._last_time = self.n, time.monotonic()
