"""Chunk digests in kitfs tables of contents: which hash, and how to check one.

Every chunk a mount fetches is checked against its digest before anyone sees
it, on the daemon's few cores, while the model streams in. sha256 runs at
1.4 GB/s per core here (SHA-NI) and was the largest single cost of a cold
read; BLAKE3 is just as collision-resistant for this purpose and runs at
5.7 GB/s per core, so `kitfs pack` writes BLAKE3 chunk digests. Tables of
contents written before (bare sha256 hex) are read and checked as sha256.

In memory a chunk digest is `<algorithm>:<hex>`; in the table of contents a
sha256 digest stays bare hex (the version-1 form) and a BLAKE3 one carries
its `blake3:` prefix.
"""

from __future__ import annotations

import hashlib
import re

import blake3

from kitfs.errors import FormatError

#: What `kitfs pack` writes.
PACK_ALGORITHM = "blake3"

_ALGORITHMS = ("sha256", "blake3")  # both 256-bit: 64 hex digits
_HEX = re.compile(r"[0-9a-f]{64}")

Buffer = bytes | bytearray | memoryview


def chunk_digest(data: Buffer, algorithm: str = PACK_ALGORITHM) -> str:
    """`<algorithm>:<hex>` of `data`; the hash releases the GIL for big buffers."""
    if algorithm == "blake3":
        return "blake3:" + blake3.blake3(data).hexdigest()
    if algorithm == "sha256":
        return "sha256:" + hashlib.sha256(data).hexdigest()
    raise FormatError(f"unknown chunk digest algorithm {algorithm!r}")


def parse_chunk_digest(text: str) -> str:
    """The in-memory form of a digest as a table of contents writes it (bare hex = sha256)."""
    algorithm, sep, hexpart = text.partition(":")
    if not sep:
        algorithm, hexpart = "sha256", text
    if algorithm not in _ALGORITHMS or _HEX.fullmatch(hexpart) is None:
        raise FormatError(f"invalid chunk digest {text[:80]!r}")
    return f"{algorithm}:{hexpart}"


def toc_form(digest: str) -> str:
    """How `digest` is written in a table of contents (sha256 stays bare hex)."""
    return digest.removeprefix("sha256:")


def matches(data: Buffer, digest: str) -> bool:
    """Whether `data` has chunk digest `digest` (`<algorithm>:<hex>`)."""
    algorithm = digest.partition(":")[0]
    return chunk_digest(data, algorithm) == digest
