"""Byte sizes as people write and read them (`50G`, `512MiB`, `1.5 GiB`), and names from a
ModelKit as one line of a terminal shows them."""

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


def parse_cache_size(text: str | None) -> int | None:
    """--cache-size: a size, or None (no limit) for none/unlimited or when not given."""
    if text is None or text.strip().lower() in ("none", "unlimited"):
        return None
    return parse_size(text)


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


def shown_path(path: str) -> str:
    """A path as a listing prints it, one line whatever it holds (JSON output keeps it exact).

    Tar names and Kitfile paths come from whoever packed the ModelKit. Names
    that are not UTF-8 arrive surrogate-escaped (as os.fsdecode gives them)
    and cannot be printed to a UTF-8 stdout; they are shown as \\xNN. Control
    characters are escaped too, so a newline cannot fake a second entry, nor
    an escape sequence rewrite the terminal; a backslash is doubled so the
    escaping stays unambiguous.
    """
    if path.isprintable() and "\\" not in path:
        return path
    out = []
    for ch in path:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(_ESCAPES.get(ch) or (f"\\x{code:02x}" if code < 0x100 else
                                            f"\\u{code:04x}" if code < 0x10000 else
                                            f"\\U{code:08x}"))
    return "".join(out)


_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
