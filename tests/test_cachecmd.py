"""`kitfs cache` on a real cache directory."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from helpers import kitfs
from kitfs.cache.keys import chunk_key_for_digest
from kitfs.cache.store import ChunkStore


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
