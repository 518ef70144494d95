"""How long FUSE reads take, as a histogram a state file can carry and Prometheus can read.

The buckets are fixed (seconds) so that histograms of every mount, and of
every restart of one, add up; they span a page from the kernel's cache
path (sub-millisecond: served from memory) to a read that waited out a
slow registry. Counts are cumulative (a read of 3 ms counts in every bucket
from 0.005 up), as Prometheus exposes them.
"""

from __future__ import annotations

import bisect
from typing import Any

READ_BUCKETS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
)


class LatencyHistogram:
    def __init__(self, bounds: tuple[float, ...] = READ_BUCKETS_S) -> None:
        self.bounds = bounds
        self._counts = [0] * len(bounds)  # per bucket, not cumulative: one add per sample
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        index = bisect.bisect_left(self.bounds, seconds)
        if index < len(self._counts):
            self._counts[index] += 1
        self.count += 1
        self.sum += seconds

    def to_json(self) -> dict[str, Any]:
        """{"buckets": [[upper bound, cumulative count], ...], "sum": s, "count": n};
        the +Inf bucket is `count`."""
        cumulative, running = [], 0
        for bound, n in zip(self.bounds, self._counts, strict=True):
            running += n
            cumulative.append([bound, running])
        return {"buckets": cumulative, "sum": self.sum, "count": self.count}
