"""A byte progress bar on stderr for long work (packing, pushing).

Drawn only when stderr is a terminal, at most ten times a second, so piping
kitfs into a log stays clean. Where a log is what people watch (a container's:
kitfs-init and kitfs-kserve set it), $KITFS_PROGRESS_LINES asks for a plain
line every that many seconds instead. Updates may come from worker threads.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO

from kitfs.errors import UsageError
from kitfs.units import human_bytes

LINES_ENV = "KITFS_PROGRESS_LINES"


def _line_interval() -> float:
    """Seconds between plain progress lines, from $KITFS_PROGRESS_LINES (unset or 0: none)."""
    text = os.environ.get(LINES_ENV, "").strip()
    try:
        seconds = float(text) if text else 0.0
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        raise UsageError(f"${LINES_ENV} must be a number of seconds, not {text!r}")
    return seconds


class Progress:
    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 0)
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = self._stream.isatty()
        self._every = 0.0 if self._enabled else _line_interval()
        self._lock = threading.Lock()
        self._start = time.monotonic()
        # A bar shows at once; the first log line only after an interval, so a short run
        # (or one that fails within it) logs none.
        self._last_draw = self._start if self._every else 0.0

    def add_total(self, n: int) -> None:
        with self._lock:
            self.total += n

    def update(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self._enabled and now - self._last_draw >= 0.1:
                self._last_draw = now
                self._draw(now)
            elif self._every and now - self._last_draw >= self._every:
                self._last_draw = now
                self._stream.write(f"{self.label}: {self._status(now)}\n")
                self._stream.flush()

    def _fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total else 1.0

    def _status(self, now: float) -> str:
        """`45.0% 1.2 GiB/2.6 GiB 120 MiB/s eta 12s`: what the bar and a log line say."""
        elapsed = max(now - self._start, 1e-6)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 and self.total > self.done else 0
        return (f"{self._fraction() * 100:5.1f}% {human_bytes(self.done)}"
                f"/{human_bytes(self.total)} {human_bytes(rate)}/s eta {eta:4.0f}s")

    def _draw(self, now: float) -> None:
        width = 24
        filled = int(self._fraction() * width)
        bar = "#" * filled + "-" * (width - filled)
        self._stream.write(f"\r{self.label} [{bar}] {self._status(now)} ")
        self._stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._enabled:
                self._draw(time.monotonic())
                self._stream.write("\n")
                self._stream.flush()
