"""Cache keys: the names chunks are stored under, and the check that keeps them inside the cache.

A key becomes a file name, and digests come from registries, so every key is
validated before it touches a path: lowercase hex, `-`, `_` and `.` only,
starting with two hex digits (the shard directory), at most 200 characters
(room for the temporary-name decoration under NAME_MAX). No `/`, and no key
can be `.`/`..` or start with a dot (the prefix of temporary files).

Three kinds of key, which never collide (only a digest key lacks `-`):

- `chunk_key_for_digest`: the chunk's own digest (sha256 hex, or BLAKE3 hex
  with a `.b3` suffix), for chunks of a layer this node hashed end to end
  (the digests in its verified record); the same bytes in two such layers
  share a file.
- `chunk_key_in_layer`: `<layer hex>-<chunk digest key>` for a chunk a kitfs
  table of contents vouches for. The table's author picks those digests: keyed
  by digest alone, a table claiming another layer's chunks would be served
  that layer's cached bytes on a node that has them (what `kit unpack` of its
  own blob never shows). Scoped by layer, a cached chunk is one fetched as
  part of that layer's blob.
- `chunk_key_for_position`: `<layer hex>-<chunk size>-<index>` for layers
  without per-chunk digests; the chunk size is part of the key so two mounts
  configured with different chunk sizes cannot read each other's chunks as
  their own. Position keys and layer-scoped keys of one layer share a
  shard (they start with the layer's hex), so a poisoned layer's chunks are
  found by listing one directory.
"""

from __future__ import annotations

import re

from kitfs.cache.fileformat import CacheError

MAX_KEY_LENGTH = 200
_KEY_RE = re.compile(r"[0-9a-f]{2}[0-9a-f._-]*")
_DIGEST_RE = re.compile(r"(?:sha256:)?([0-9a-f]{64})|(?:sha512:)?([0-9a-f]{128})")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class BadKeyError(CacheError, ValueError):
    """A key or digest that must not become a file name; always a caller's bug or bad input."""


def validate_key(key: str) -> str:
    """`key` unchanged if it is safe to use as a chunk file name; BadKeyError otherwise."""
    if len(key) > MAX_KEY_LENGTH or _KEY_RE.fullmatch(key) is None:
        raise BadKeyError(f"invalid cache key {key[:80]!r}")
    return key


def digest_hex(digest: str) -> str:
    """The hex part of a sha256/sha512 digest (`sha256:<hex>` or bare hex)."""
    m = _DIGEST_RE.fullmatch(digest)
    if m is None:
        raise BadKeyError(f"invalid digest {digest[:80]!r}")
    return m.group(1) or m.group(2)


def chunk_key_for_digest(digest: str) -> str:
    """Key of a chunk addressed by its own digest: `<hex>` for sha256, `<hex>.b3` for BLAKE3.

    A bare hex digest is sha256. The suffix keeps the two hashes' keys apart.
    """
    if digest.startswith("blake3:"):
        hexpart = digest.removeprefix("blake3:")
        if _HEX64.fullmatch(hexpart) is None:
            raise BadKeyError(f"not a BLAKE3 digest: {digest[:80]!r}")
        return hexpart + ".b3"
    hexpart = digest_hex(digest)
    if len(hexpart) != 64:
        raise BadKeyError(f"not a sha256 digest: {digest[:80]!r}")
    return hexpart


def chunk_key_in_layer(layer_digest: str, digest: str) -> str:
    """Key of a chunk a layer's table of contents gives `digest` (see the module doc)."""
    return f"{digest_hex(layer_digest)}-{chunk_key_for_digest(digest)}"


def is_position_key(key: str) -> bool:
    """Whether `key` names a chunk by its place in a layer (no digest vouches for it)."""
    parts = key.split("-")
    return len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit()


def chunk_key_for_position(layer_digest: str, chunk_size: int, index: int) -> str:
    """Key of chunk `index` of a layer's uncompressed stream cut into `chunk_size` pieces."""
    if chunk_size <= 0 or index < 0:
        raise BadKeyError(f"invalid chunk position: size {chunk_size}, index {index}")
    return f"{digest_hex(layer_digest)}-{chunk_size}-{index}"


def layer_key_prefix(layer_digest: str) -> str:
    """The prefix every position key and layer-scoped key of `layer_digest` starts with."""
    return f"{digest_hex(layer_digest)}-"


def key_digest(key: str) -> str | None:
    """The chunk digest (`sha256:<hex>`, `blake3:<hex>`) a key names; None for a position key."""
    if _HEX64.fullmatch(key):
        return "sha256:" + key
    if key.endswith(".b3") and _HEX64.fullmatch(key[:-3]):
        return "blake3:" + key[:-3]
    return None
