"""Attacks a second review found on the read path, kept as tests (each asserts the safe behaviour).

Layers `kit` compressed are streamed: a lie the decompressor sees before the
digest does, a stream cut midway, a layer poisoned while it is being hashed,
a cache disk that fills up, a stream ending exactly on a chunk boundary.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from crafted import build_tar, craft_layer, publish_kit
from faultproxy import Corrupt, FaultProxy
from opening import opened, read_file

from kitfs.errors import KitfsError
from registry import RegistryServer

A = os.urandom(3 << 20)


def _flip_inside_stored_block(blob: bytes) -> tuple[int, int]:
    """(offset of the gzip blob whose flip changes one byte of the output, that output
    offset); the gzip CRC then fails at the stream's end."""
    for off in range(len(blob) // 2, len(blob) - 64):
        bad = bytearray(blob)
        bad[off] ^= 0xFF
        d = zlib.decompressobj(31)
        try:
            out = d.decompress(bytes(bad))
            out += d.flush()
        except zlib.error as exc:
            if "incorrect data check" not in str(exc):
                continue
            good = zlib.decompressobj(31).decompress(blob)
            d2 = zlib.decompressobj(31)
            part = d2.decompress(bytes(bad[:-8]))
            diff = next(i for i in range(len(part)) if part[i] != good[i])
            return off, diff
    raise AssertionError("no offset found")


async def test_stream_layer_whose_lie_breaks_the_gzip_crc_is_poisoned(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """A kit gzip layer (streamed). After listing, the registry flips one byte of the
    stored deflate data: the decompressed bytes differ and the gzip CRC fails at the end,
    before stream_blob checks the blob digest. SAFE: the layer is poisoned (the lie is a lie),
    and the wrong bytes are never served again, even once the registry is honest again."""
    tar = build_tar([("model/a.bin", A), ("model/config.json", b"{}\n")])
    layer = craft_layer(tar, compression="gzip", chunked=False)
    ref = await publish_kit(registry.host, "rev2/gzcrc", "v1", [layer], toc=None)
    off, where = _flip_inside_stored_block(layer.blob)
    node_offset = tar.index(A[:64])
    in_file = where - node_offset
    assert 0 <= in_file < len(A)
    with FaultProxy(registry.host) as proxy:
        lying = ref.replace(registry.host, proxy.host)
        async with opened(lying, tmp_path / "cache") as kit:
            proxy.add(Corrupt([off]), path=layer.digest)
            node = kit.tree.nodes["model/a.bin"]
            with contextlib.suppress(KitfsError):
                await read_file(kit, "model/a.bin")  # lazy: may see the lie, stream fails
            await trio.sleep(0.5)
            state = kit.engine.status()["layers"][0]
            # The stream failed on the lie; read the byte the registry changed again.
            again = None
            with contextlib.suppress(KitfsError):
                again = bytes(await kit.engine.read(node, in_file, 1))
            assert again is None or again == A[in_file : in_file + 1], (
                "the lied byte is still served after the stream failed", state)
            assert state["state"] == "poisoned", state


async def test_stream_layer_verification_resumes_after_a_transient_failure(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """A kit gzip layer; the stream is cut once (connection closed mid-body) after its first
    chunks were served (lazy). SAFE: once the registry is healthy again, the layer's
    verification is retried (the bytes already served get checked) instead of the layer
    staying 'unverified' forever while those chunks keep being served from memory."""
    tar = build_tar([("model/a.bin", A), ("model/config.json", b"{}\n")])
    layer = craft_layer(tar, compression="gzip", chunked=False)
    ref = await publish_kit(registry.host, "rev2/gzcut", "v1", [layer], toc=None)
    from faultproxy import Truncate
    with FaultProxy(registry.host) as proxy:
        lying = ref.replace(registry.host, proxy.host)
        async with opened(lying, tmp_path / "cache") as kit:
            proxy.add(Truncate(len(layer.blob) // 2), path=layer.digest)
            node = kit.tree.nodes["model/a.bin"]
            with contextlib.suppress(KitfsError):
                await kit.engine.read(node, 0, 4096)
            await trio.sleep(1)
            proxy.clear()
            for _ in range(20):  # a reader keeps reading the start of the file
                with contextlib.suppress(KitfsError):
                    await kit.engine.read(node, 0, 4096)
                await trio.sleep(0.25)
                if kit.engine.status()["layers"][0]["state"] == "verified":
                    break
            assert kit.engine.status()["layers"][0]["state"] == "verified", \
                kit.engine.status()["layers"][0]


async def test_a_layer_poisoned_while_it_verifies_stays_poisoned(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """A kitfs TOC that swaps two files' names over an authentic blob. The whole-layer hash
    (_verify) is under way when a reader's layout check poisons the layer. SAFE: the
    layer stays poisoned (status, trusted(), no verified record written after the purge).
    Before: _mark_verified set state 'verified' over 'poisoned' and re-wrote the record."""
    from crafted import swap_files

    from kitfs.engine.reader import EngineConfig
    from kitfs.errors import IntegrityError
    big_a, big_b = os.urandom(24 << 20), os.urandom(24 << 20)
    tar = build_tar([("model/a.bin", big_a), ("model/b.bin", big_b),
                     ("model/config.json", b"{}\n")])
    layer = craft_layer(tar, chunk_size=1 << 20, block_size=256 << 10)
    assert layer.toc is not None
    toc = swap_files(layer.toc, "model/a.bin", "model/b.bin")
    ref = await publish_kit(registry.host, "rev2/unpoison", "v1", [layer], toc=[toc])
    config = EngineConfig(chunk_size=1 << 20, prefetch="all", read_timeout=20,
                          memory_bytes=2 << 20)
    cache = tmp_path / "cache"
    async with opened(ref, cache, config) as kit:
        eng = kit.engine
        with trio.fail_after(30):
            while eng.status()["layers"][0]["state"] != "verifying":
                await trio.sleep(0.002)
        with pytest.raises(IntegrityError):
            await read_file(kit, "model/config.json")
        seen = {eng.status()["layers"][0]["state"]}
        for _ in range(100):
            await trio.sleep(0.05)
            seen.add(eng.status()["layers"][0]["state"])
        node = kit.tree.nodes["model/a.bin"]
        trusted = eng.trusted(node)
    records = sorted(p.name for p in cache.rglob("verified/*.json"))
    assert (seen, trusted, records) == ({"poisoned"}, False, []), (seen, trusted, records)


@contextlib.contextmanager
def small_disk(where: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (we run as root): a cache disk that fills up."""
    where.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("compression", ["none", "gzip"])
async def test_a_full_cache_disk_does_not_fail_reads(
    registry: RegistryServer, tmp_path: Path, compression: str
) -> None:
    """The cache directory is a 2 MiB tmpfs; the layer is 6 MiB. Every read succeeds
    (ENOSPC is noted, chunks are served from the fetch), the layer verifies."""
    data = os.urandom(6 << 20)
    tar = build_tar([("model/a.bin", data), ("model/config.json", b"{}\n")])
    layer = craft_layer(tar, compression=compression, chunked=False)
    ref = await publish_kit(registry.host, f"rev2/full-{compression}", "v1", [layer], toc=None)
    with small_disk(tmp_path / "small") as disk:
        async with opened(ref, disk / "cache") as kit:
            assert await read_file(kit, "model/a.bin") == data
            assert await read_file(kit, "model/a.bin") == data
            with trio.fail_after(20):
                while kit.engine.status()["layers"][0]["state"] != "verified":
                    await trio.sleep(0.05)


def _tar_of_length(total: int) -> tuple[bytes, bytes]:
    n = total - 8192
    while True:
        data = os.urandom(n)
        tar = build_tar([("model/a.bin", data)])
        if len(tar) == total:
            return tar, data
        n += total - len(tar)
        if n <= 0 or n > total:
            raise AssertionError("cannot hit the length")


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
async def test_a_stream_ending_on_a_chunk_boundary_reads_and_verifies(
    registry: RegistryServer, tmp_path: Path, compression: str
) -> None:
    """SAFE: a streamed layer of exactly 2 chunks reads its last byte and verifies."""
    tar, data = _tar_of_length(2 << 20)
    layer = craft_layer(tar, compression=compression, chunked=False)
    ref = await publish_kit(registry.host, f"rev2/edge-{compression}", "v1", [layer], toc=None)
    async with opened(ref, tmp_path / "cache") as kit:
        node = kit.tree.nodes["model/a.bin"]
        assert bytes(await kit.engine.read(node, node.size - 1, 4096)) == data[-1:]
        assert await read_file(kit, "model/a.bin") == data
        with trio.fail_after(10):
            while kit.engine.status()["layers"][0]["state"] != "verified":
                await trio.sleep(0.05)
    async with opened(ref, tmp_path / "cache") as kit:  # again, from the disk cache
        assert await read_file(kit, "model/a.bin") == data
