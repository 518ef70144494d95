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

Block digests let a reader that wants a few hundred KiB of a chunk (one tensor
of a random reader, the kernel's readahead past its end) fetch and check just
those blocks instead of the whole chunk. Each is BLAKE3 of one `block_size`
slice of the chunk, cut to 16 bytes: what a lying registry would need is a
second preimage of a given digest, which at 128 bits is as far out of reach
as at 256 (collisions only help whoever writes the table of contents, and
they choose the digests anyway). Half the size keeps a 100 GB model's table
of contents 9 MB smaller.
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


#: Bytes of one block digest (BLAKE3, truncated; see the module docstring).
BLOCK_DIGEST_SIZE = 16


def block_digests(data: Buffer, block_size: int) -> bytes:
    """The block digests of one chunk, concatenated: one per `block_size` slice, the last short."""
    view = memoryview(data)
    return b"".join(blake3.blake3(view[i : i + block_size]).digest(length=BLOCK_DIGEST_SIZE)
                    for i in range(0, len(view), block_size))


def block_matches(data: Buffer, digests: bytes, index: int) -> bool:
    """Whether `data` is block `index` of the chunk whose block digests are `digests`."""
    want = digests[index * BLOCK_DIGEST_SIZE : (index + 1) * BLOCK_DIGEST_SIZE]
    return (len(want) == BLOCK_DIGEST_SIZE
            and blake3.blake3(data).digest(length=BLOCK_DIGEST_SIZE) == want)


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
