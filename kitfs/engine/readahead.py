"""Readahead: how far ahead of a sequential reader to fetch, decided per open file handle.

Each open handle has a `Cursor`: its sequential run and what was asked for
ahead of it. Two readers of one file (a loader's threads, `cp` beside a
server) each keep their own run, so neither resets the other's window.
Callers without a handle (tests, benchmarks reading the engine directly)
share one cursor per file.

A read continues a run only if it starts exactly where the last one ended;
otherwise it starts a new one (a reader that jumps: random tensor access).
The window then grows in proportion to the run, as Linux does: a run from
the file's start (a shard streamed by cp, a hash or a loader; Linux treats
a read at offset 0 as sequential) gets readahead from READAHEAD_MIN_RUN on,
a run that began mid-file (most likely one tensor of a random reader) from
READAHEAD_MIN_RUN_MIDFILE; the window is an eighth of the run, up to the
cap. A tensor read front to back so costs at most an eighth more than its
size (plus the chunk its end falls in), while a streamed shard has the
full window in flight after 512 MiB. The window is topped up only once
half of it (at least a chunk) is not yet requested, and then in one go:
the registry spends more on a request than on a megabyte. Measurements
behind these numbers: benchmarks/TUNING.md.

Invariants of a Cursor:
- `run_end` is where the last read ended (-1 before the first read), and
  from the first read on `run_start <= run_end`;
- `requested` is the last chunk (layer index) asked for ahead in this run,
  -1 when nothing was: it only grows within a run;
- `tensor_stop`/`tensor_front`: the end of the safetensors tensor this
  handle's reads asked for ahead (-1: none), and how far.
"""

from __future__ import annotations

from dataclasses import dataclass

#: A sequential run from a file's start shorter than this gets no readahead.
READAHEAD_MIN_RUN = 16 << 20
#: The same for a run that began mid-file: most likely one tensor read by a random reader.
READAHEAD_MIN_RUN_MIDFILE = 64 << 20


@dataclass
class Cursor:
    run_start: int = 0
    run_end: int = -1
    requested: int = -1
    tensor_stop: int = -1
    tensor_front: int = 0

    def step(self, offset: int, end: int) -> bool:
        """Note a read of [offset, end) of the file; True when it begins a new run."""
        fresh = offset != self.run_end
        if fresh:
            self.run_start, self.requested = offset, -1
        self.run_end = end
        return fresh

    @property
    def from_start(self) -> bool:
        """The run began at the file's start: a stream that reads on (cp, a hash, a loader)."""
        return self.run_start == 0

    def window(self, base: int, size: int, chunk_size: int, cap: int, merge_limit: int
               ) -> range | None:
        """The chunks (layer indexes) to ask for ahead now, or None; they count as requested.

        `base` is where the file starts in its layer's stream, `size` its length.
        """
        run = self.run_end - self.run_start
        least = READAHEAD_MIN_RUN if self.from_start else READAHEAD_MIN_RUN_MIDFILE
        if run < max(2 * chunk_size, least):
            return None
        ahead = min(run // 8, cap)
        first = max((base + self.run_end) // chunk_size, self.requested + 1)
        last = min((base + size - 1) // chunk_size,
                   (base + self.run_end + ahead - 1) // chunk_size)
        if last < first or (last - first + 1) * chunk_size < min(ahead // 2, merge_limit):
            return None
        self.requested = last
        return range(first, last + 1)
