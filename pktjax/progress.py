"""Progress bars: ``tqdm`` with a total and an ETA on a terminal, plain log lines elsewhere.

Launch logs (a TPU VM's, a scheduler's) are files, where ``tqdm``'s carriage returns pile every refresh into one
line. :func:`progress_bar` therefore writes, when stderr is not a terminal, one ordinary line per 10% of the
total (or per minute, whichever comes first) and one at the end. Every progress bar of pktjax goes through it.
"""

from __future__ import annotations

import sys
import time
from typing import Any

PLAIN_EVERY_S = 60.0  # a line at least this often when the work is slow
PLAIN_EVERY_FRACTION = 0.1  # and one per tenth of the total


def progress_bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0,
                 stream=None):
    """A bar with ``update(n)``, ``set_postfix(**kw)`` and ``close()`` (also a context manager): ``tqdm`` when
    ``stream`` (default stderr) is a terminal, else :class:`PlainProgress`; a silent one when not ``enabled``."""
    stream = stream or sys.stderr
    if enabled and not _is_terminal(stream):
        return PlainProgress(total, desc, unit, initial, stream)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=not enabled, file=stream)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or foreign stream
        return False


class PlainProgress:
    """Progress as whole lines: ``desc: 40/100 ex (40%), 12s elapsed, ETA 18s, loss=0.5``."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int, stream):
        self.total, self.desc, self.unit, self.n, self.stream = total, desc, unit, initial, stream
        self.start = self.last_time = time.monotonic()
        self.initial, self.last_n, self.postfix, self.closed = initial, initial, "", False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        step = PLAIN_EVERY_FRACTION * self.total if self.total else float("inf")
        if self.n - self.last_n >= step or now - self.last_time >= PLAIN_EVERY_S or self.n == self.total:
            self._line(now)

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        done = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
        parts = [f"{self.desc}: {done}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{_duration(elapsed)} elapsed")
        if self.total and self.n > self.initial:  # the rate of this run's work (resumed work took no time)
            parts.append(f"ETA {_duration(elapsed / (self.n - self.initial) * (self.total - self.n))}")
        if self.postfix:
            parts.append(self.postfix)
        print(", ".join(parts), file=self.stream, flush=True)
        self.last_n, self.last_time = self.n, now

    def close(self) -> None:
        if not self.closed and self.n != self.last_n:
            self._line(time.monotonic())
        self.closed = True

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
