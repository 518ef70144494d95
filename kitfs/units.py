"""Byte sizes as people write and read them: `50G`, `512MiB`, `1.5 GiB`."""

from __future__ import annotations

import math
import re

from kitfs.errors import UsageError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Binary units, case-insensitive: `100`, `64K`, `50G`, `1.5GiB`, `2TB` (= 2 TiB)."""
    match = _SIZE.match(text)
    if match is None:
        raise UsageError(f"invalid size {text!r}: use a number with an optional unit, e.g. 50G")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def kit_bytes(n: int) -> str:
    """A size as `kit list` prints it (pkg/output/util.go FormatBytes): whole bytes under
    1 KiB, else rounded down to a tenth of KiB, MiB, GiB or TiB, then PiB."""
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for suffix in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            return f"{math.floor(size * 10) / 10:.1f} {suffix}"
        size /= 1024
    return f"{size:.1f} PiB"
