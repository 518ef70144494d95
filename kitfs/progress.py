"""A byte progress bar on stderr for long work (packing, pushing).

Drawn only when stderr is a terminal, at most ten times a second, so piping
kitfs into a log stays clean. Updates may come from worker threads.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from kitfs.units import human_bytes


class Progress:
    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 0)
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = self._stream.isatty()
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last_draw = 0.0

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

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-6)
        rate = self.done / elapsed
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        eta = (self.total - self.done) / rate if rate > 0 and self.total > self.done else 0
        self._stream.write(
            f"\r{self.label} [{bar}] {frac * 100:5.1f}% {human_bytes(self.done)}"
            f"/{human_bytes(self.total)} {human_bytes(rate)}/s eta {eta:4.0f}s "
        )
        self._stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._enabled:
                self._draw(time.monotonic())
                self._stream.write("\n")
                self._stream.flush()
