"""`kitfs cache` on a real cache directory."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from helpers import kitfs, ok
from kitfs.cache.keys import chunk_key_for_digest
from kitfs.cache.store import ChunkStore
from kitfs.oci.digest import digest_of
from kitfs.oci.reference import parse_reference
from kitfs.offline import KeptMetadata, Resolved


def test_du_verify_gc_clear(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "c", sync=False)
    chunks = [bytes([i]) * 100_000 for i in range(6)]
    keys = [chunk_key_for_digest(hashlib.sha256(c).hexdigest()) for c in chunks]
    for key, chunk in zip(keys, chunks, strict=True):
        store.put(key, chunk)
    path = store.path(keys[2])
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    cache = ["--cache-dir", str(tmp_path / "c"), "--json"]

    du = json.loads(kitfs("cache", "du", *cache).stdout)
    assert du["chunks"] == 6 and du["bytes"] >= 600_000

    verify = kitfs("cache", "verify", *cache)
    assert verify.returncode == 1
    assert json.loads(verify.stdout)["bad"] == 1
    assert kitfs("cache", "verify", *cache).returncode == 0

    gc = json.loads(kitfs("cache", "gc", *cache, "--max-size", "250K").stdout)
    assert gc["removed_chunks"] >= 3 and gc["bytes"] <= 250 * 1024

    no_size = kitfs("cache", "gc", *cache)
    assert no_size.returncode == 2 and "--max-size" in no_size.stderr

    assert json.loads(kitfs("cache", "clear", *cache).stdout)["removed_chunks"] >= 1
    assert json.loads(kitfs("cache", "du", *cache).stdout)["chunks"] == 0
    assert "no kitfs cache" in kitfs("cache", "du", "--cache-dir", str(tmp_path / "x")).stdout


def test_gc_refuses_a_bad_size_with_or_without_a_cache(tmp_path: Path) -> None:
    for cache in (tmp_path / "none", tmp_path / "some"):
        if cache.name == "some":
            ChunkStore(cache)
        proc = kitfs("cache", "gc", "--max-size", "1x", "--cache-dir", str(cache))
        assert proc.returncode == 2, (cache, proc)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_kept_manifests_and_records_are_counted_bounded_and_cleared(tmp_path: Path) -> None:
    """What offline.py keeps beside the chunks (blobs/, resolved/): du counts it, gc drops
    what no registry answer used for 30 days (keeping it again refreshes it), clear
    removes it all."""
    root = tmp_path / "c"
    store = ChunkStore(root, sync=False)
    chunk = b"x" * 50_000
    store.put(chunk_key_for_digest(hashlib.sha256(chunk).hexdigest()), chunk)
    kept = KeptMetadata(root)
    blobs = [json.dumps({"n": i, "pad": "m" * 20_000}).encode() for i in range(3)]
    for blob in blobs:
        kept.keep_blob(digest_of(blob), blob)
    ref = parse_reference("registry.example.com/team/llm:v1")
    kept.keep_resolved(Resolved("registry.example.com/team/llm:v1", digest_of(blobs[0]),
                                "application/vnd.oci.image.manifest.v1+json", 0.0), ref)
    assert kept.resolved(ref) is not None
    cache = ["--cache-dir", str(root), "--json"]

    du = json.loads(ok(kitfs("cache", "du", *cache)))
    assert du["chunks"] == 1 and du["kept_files"] == 4
    assert du["kept_bytes"] >= 60_000 and du["bytes"] == du["chunk_bytes"] + du["kept_bytes"]

    month = time.time() - 31 * 24 * 3600
    for path in [*(root / "blobs").iterdir(), *(root / "resolved").iterdir()]:
        os.utime(path, (month, month))
    kept.keep_blob(digest_of(blobs[1]), blobs[1])  # used again by a registry answer
    gc = json.loads(ok(kitfs("cache", "gc", *cache, "--max-size", "1G")))
    assert gc["removed_chunks"] == 0 and gc["removed_kept"] == 3
    assert kept.blob(digest_of(blobs[1])) == blobs[1]
    assert kept.blob(digest_of(blobs[0])) is None and kept.resolved(ref) is None

    clear = json.loads(ok(kitfs("cache", "clear", *cache)))
    assert clear["removed_chunks"] == 1 and clear["removed_kept"] == 1
    du = json.loads(ok(kitfs("cache", "du", *cache)))
    assert du["bytes"] == du["kept_files"] == du["chunks"] == 0
