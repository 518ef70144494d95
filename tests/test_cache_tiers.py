"""MemoryTier (chunks being served now) and TocCache (per-layer records on disk)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kitfs.cache import HEADER_SIZE, BadKeyError, CacheError, MemoryTier, TocCache

LAYER = "sha256:" + "12" * 32
OTHER = "sha256:" + "34" * 32

# -- MemoryTier ------------------------------------------------------------------------


def test_memory_tier_is_bounded_by_bytes_and_evicts_lru() -> None:
    tier = MemoryTier(capacity=300)
    tier.put("a", b"a" * 100)
    tier.put("b", b"b" * 100)
    tier.put("c", b"c" * 100)
    assert tier.nbytes == 300
    assert tier.get("a") == b"a" * 100  # a is now the most recent
    tier.put("d", b"d" * 100)
    assert "b" not in tier
    assert [k in tier for k in "acd"] == [True, True, True]
    tier.put("e", b"e" * 250)  # needs three evictions
    assert len(tier) == 1
    assert tier.nbytes == 250
    assert tier.get("e") == b"e" * 250
    assert tier.get("a") is None


def test_a_look_without_touch_keeps_the_eviction_order() -> None:
    """What the engine does: a served chunk is in the page cache now, so being read does
    not keep it over chunks prefetched for a reader that has not got to them yet."""
    tier = MemoryTier(capacity=300)
    for key in "abc":
        tier.put(key, key.encode() * 100)
    assert tier.get("a", touch=False) == b"a" * 100
    tier.put("d", b"d" * 100)
    assert "a" not in tier and [k in tier for k in "bcd"] == [True, True, True]


def test_memory_tier_replacing_a_key_and_oversized_items() -> None:
    tier = MemoryTier(capacity=100)
    tier.put("a", b"x" * 60)
    tier.put("a", b"y" * 30)
    assert tier.nbytes == 30
    assert tier.get("a") == b"y" * 30
    tier.put("big", b"z" * 101)  # larger than everything: not kept, evicts nothing
    assert "big" not in tier
    assert tier.get("a") == b"y" * 30
    tier.put("a", b"w" * 101)  # replacing with an oversized value drops the old one
    assert "a" not in tier
    assert tier.nbytes == 0


def test_memory_tier_discard_clear_and_zero_capacity() -> None:
    tier = MemoryTier(capacity=1000)
    tier.put("a", b"1" * 10)
    tier.put("b", b"2" * 10)
    tier.discard("a")
    tier.discard("missing")
    assert (len(tier), tier.nbytes) == (1, 10)
    tier.clear()
    assert (len(tier), tier.nbytes) == (0, 0)
    off = MemoryTier(capacity=0)
    off.put("a", b"x")
    assert off.get("a") is None
    off.put("empty", b"")
    assert off.get("empty") == b""
    with pytest.raises(ValueError):
        MemoryTier(capacity=-1)


def test_memory_tier_many_items_stays_within_capacity() -> None:
    tier = MemoryTier(capacity=10_000)
    for i in range(5000):
        tier.put(f"k{i}", bytes(i % 97))
        assert tier.nbytes <= 10_000
    assert tier.nbytes == sum(len(tier.get(f"k{i}") or b"") for i in range(5000))


# -- TocCache --------------------------------------------------------------------------


@pytest.fixture
def tocs(tmp_path: Path) -> TocCache:
    return TocCache(tmp_path / "cache", sync=False)


def test_toc_round_trip_and_layout(tocs: TocCache) -> None:
    assert tocs.get(LAYER) is None
    data = b'{"entries": []}'
    tocs.put(LAYER, data)
    path = tocs.root / "tocs" / f"{'12' * 32}.json"
    assert path.is_file()
    assert path.read_bytes()[HEADER_SIZE:] == data
    assert tocs.get(LAYER) == data
    assert tocs.get("12" * 32) == data  # bare hex names the same layer
    assert tocs.get(OTHER) is None
    tocs.put(LAYER, b'{"entries": [1]}')  # a better table of contents replaces the old one
    assert tocs.get(LAYER) == b'{"entries": [1]}'
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left
    assert tocs.remove(LAYER)
    assert not tocs.remove(LAYER)
    assert tocs.get(LAYER) is None


def test_verified_records_are_separate_from_tocs(tocs: TocCache) -> None:
    tocs.put(LAYER, b"toc")
    tocs.put_verified(LAYER, b'{"chunks": ["aa"]}')
    assert (tocs.root / "verified" / f"{'12' * 32}.json").is_file()
    assert tocs.get(LAYER) == b"toc"
    assert tocs.get_verified(LAYER) == b'{"chunks": ["aa"]}'
    assert tocs.get_verified(OTHER) is None
    assert tocs.remove_verified(LAYER)
    assert tocs.get_verified(LAYER) is None
    assert tocs.get(LAYER) == b"toc"


@pytest.mark.parametrize("damage", ["flip", "truncate", "append", "empty", "garbage"])
def test_corrupt_toc_reads_as_absent_and_is_rebuilt(tocs: TocCache, damage: str) -> None:
    data = b'{"entries": ["' + b"x" * 500 + b'"]}'
    tocs.put(LAYER, data)
    path = tocs.root / "tocs" / f"{'12' * 32}.json"
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[HEADER_SIZE + 3] ^= 0x20
    elif damage == "truncate":
        del raw[-10:]
    elif damage == "append":
        raw += b"\n"
    elif damage == "empty":
        raw = bytearray()
    else:
        raw = bytearray(os.urandom(len(raw)))
    path.write_bytes(raw)
    assert tocs.get(LAYER) is None
    assert not path.exists()
    tocs.put(LAYER, data)
    assert tocs.get(LAYER) == data


def test_a_verified_record_is_not_accepted_as_a_toc(tocs: TocCache) -> None:
    """Each record kind has its own magic: a file copied to the wrong place reads as absent."""
    tocs.put_verified(LAYER, b"verified")
    (tocs.root / "tocs").mkdir()
    src = tocs.root / "verified" / f"{'12' * 32}.json"
    (tocs.root / "tocs" / src.name).write_bytes(src.read_bytes())
    assert tocs.get(LAYER) is None


@pytest.mark.parametrize("bad", ["", "../../etc/passwd", "sha256:" + "12" * 31, "md5:" + "1" * 32])
def test_toc_bad_digests_are_rejected(tocs: TocCache, bad: str) -> None:
    with pytest.raises(BadKeyError):
        tocs.get(bad)
    with pytest.raises(BadKeyError):
        tocs.put(bad, b"x")
    with pytest.raises(BadKeyError):
        tocs.put_verified(bad, b"x")


def test_toc_unwritable_root_is_a_cache_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    tocs = TocCache(blocker)
    with pytest.raises(CacheError, match="cannot write cached record"):
        tocs.put(LAYER, b"x")
    with pytest.raises(CacheError, match=r"cannot read cached record .*\(ENOTDIR\)"):
        tocs.get(LAYER)  # a broken cache directory is an error, not a miss


def test_toc_sync_mode_round_trip(tmp_path: Path) -> None:
    tocs = TocCache(tmp_path / "cache")
    tocs.put(LAYER, b"durable")
    assert tocs.get(LAYER) == b"durable"
