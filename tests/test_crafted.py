"""The crafted-ModelKit toolkit itself: honest kits read right, each lie is the lie it claims.

Whether the engine catches the lies is tested where the engine is; here only
that the toolkit makes what it says (tests/crafted.py).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import tarfile
from pathlib import Path

import pytest
import trio
import zstandard
from crafted import (
    BLOCK,
    MODEL_TAR,
    NONSENSE,
    CraftLayer,
    Member,
    add_phantom,
    append_hidden,
    build_tar,
    chunk_of,
    craft_layer,
    end_of_archive,
    header_spans,
    hidden_file_lie,
    hide_entry,
    kit_blobs,
    lie_in_headers,
    point_at,
    publish_kit,
    published_toc,
    rewrite_header,
    sha256,
    swap_files,
    toc_for,
)
from faultproxy import FaultProxy, Replace
from opening import opened, read_file

from helpers import kitfs
from kitfs.errors import FormatError, IntegrityError
from kitfs.modelkit import mediatypes as mt
from kitfs.modelkit.chunkdigest import block_matches, matches
from kitfs.modelkit.layers import PlannedEntry
from kitfs.modelkit.tarindex import index_tar_stream
from kitfs.modelkit.tarwriter import write_layer
from kitfs.modelkit.toc import (
    TOC_ANNOTATION,
    LayerToc,
    ModelKitToc,
    dump_toc,
    validate_layer_toc,
)
from kitfs.oci.client import ClientOptions, RegistryClient
from registry import RegistryServer

SMALL = {"chunk_size": 4096, "block_size": 1024}
LONG = "model/" + "d" * 60 + "/" + "é" * 70 + ".bin"  # non-ASCII: a PAX header names it


def files() -> list[tuple[str, bytes]]:
    rnd = random.Random(3)
    return [
        ("model/weights.bin", rnd.randbytes(20_000)),
        ("model/config.json", b'{"hidden_size": 64}\n'),
        ("model/sub/tokenizer.json", b"{}" * 700),
        ("model/zero.bin", b""),
        (LONG, b"long name\n" * 30),
    ]


def model_tar() -> bytes:
    return build_tar([*files(), Member("model/emptydir", kind="dir")])


def stream_of(layer: CraftLayer, toc: LayerToc, index: int) -> bytes:
    """The uncompressed bytes of chunk `index`, decompressed from the blob as a mount would."""
    raw = chunk_of(toc, layer.blob, index)
    if layer.compression == "gzip":
        return gzip.decompress(raw)
    if layer.compression == "zstd":
        return zstandard.ZstdDecompressor().decompress(raw)
    return raw


# --- tar bytes and layers are what kit and kitfs pack write -----------------------------


def test_build_tar_is_byte_for_byte_what_pack_writes(tmp_path: Path) -> None:
    planned: list[PlannedEntry] = []
    members: list[Member] = []
    for name, data in files():
        parts = name.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if all(p.name != d for p in planned):
                (tmp_path / d).mkdir(exist_ok=True)
                planned.append(PlannedEntry(d, "dir", 0o755, 0, tmp_path / d))
        (tmp_path / name).write_bytes(data)
        planned.append(PlannedEntry(name, "file", 0o640, len(data), tmp_path / name))
        members.append(Member(name, data, mode=0o640))
    out = io.BytesIO()
    write_layer(planned, out, compression="none", media_type=MODEL_TAR, workers=0)
    assert build_tar(members) == out.getvalue()
    assert build_tar(members, parents=False) != out.getvalue()
    names = [e.name for e in index_tar_stream(io.BytesIO(build_tar(members, parents=False)))]
    assert names == [n for n, _ in files()]
    assert not build_tar(members, end=False).endswith(bytes(2 * BLOCK))


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_craft_layer_cuts_the_stream_exactly_as_pack_does(
    tmp_path: Path, compression: str
) -> None:
    planned = []
    for name, data in files():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
        planned.append(PlannedEntry(name, "file", 0o644, len(data), tmp_path / name))
    stream, blob = io.BytesIO(), io.BytesIO()
    write_layer(planned, stream, compression="none", media_type=MODEL_TAR, workers=0)
    want = write_layer(planned, blob, compression=compression, workers=0,
                       media_type=mt.layer_media_type("model", "tar", compression), **SMALL)
    layer = craft_layer(stream.getvalue(), compression=compression, **SMALL)
    assert layer.blob == blob.getvalue()
    assert layer.toc == want
    assert layer.digest == want.digest and layer.uncompressed_digest() == want.diff_id
    assert toc_for(layer) == ModelKitToc((want,))
    for i, c in enumerate(want.chunks):
        data = stream_of(layer, want, i)
        assert matches(data, c.digest)
        if want.block_size:
            assert block_matches(data[: want.block_size], c.blocks, 0)


def test_layers_without_a_kitfs_table() -> None:
    single = craft_layer(model_tar(), compression="gzip", chunked=False)
    assert single.toc is None and gzip.decompress(single.blob) == model_tar()
    assert single.uncompressed_digest() == sha256(model_tar())
    assert CraftLayer(single.blob, single.media_type).uncompressed_digest() == sha256(
        model_tar())
    with pytest.raises(ValueError, match="no kitfs table of contents"):
        toc_for(single)
    honest = craft_layer(model_tar())
    assert toc_for(single, honest, strict=False).layers == (honest.toc,)
    _, _, toc_blob = kit_blobs([single])
    assert toc_blob is None  # "auto" with nothing to describe: a kit-made ModelKit


def test_append_hidden_puts_bytes_where_no_tar_reader_looks() -> None:
    tar = model_tar()
    stream, at = append_hidden(tar, b"SECRET")
    assert at == len(tar) == end_of_archive(stream) and at % BLOCK == 0
    assert stream[at:] == b"SECRET"
    assert index_tar_stream(io.BytesIO(stream)) == index_tar_stream(io.BytesIO(tar))
    with tarfile.open(fileobj=io.BytesIO(stream)) as tf:
        assert all(b"SECRET" not in tf.extractfile(m).read()  # type: ignore[union-attr]
                   for m in tf.getmembers() if m.isfile())


# --- publishing -----------------------------------------------------------------------


def layers_for(tag: str) -> tuple[list[CraftLayer], dict[str, bytes]]:
    """A model layer (uncompressed, chunked), a dataset (gzip, chunked), docs as kit writes
    them (one gzip stream, no kitfs table); `tag` makes every blob unique."""
    extra = tag.encode()
    model = build_tar([*files(), Member("model/emptydir", kind="dir"), ("model/tag.txt", extra)])
    data = build_tar([("data/train.csv", b"a,b\n1,2\n" * 900 + extra)])
    docs = build_tar([("README.md", b"# crafted\n" + extra)])
    layers = [
        craft_layer(model, **SMALL),
        craft_layer(data, kind="dataset", path="./data/train.csv", compression="gzip", **SMALL),
        craft_layer(docs, kind="docs", path="./README.md", compression="gzip", chunked=False),
    ]
    want = {**dict(files()), "model/tag.txt": extra,
            "data/train.csv": b"a,b\n1,2\n" * 900 + extra, "README.md": b"# crafted\n" + extra}
    return layers, want


@pytest.mark.parametrize("toc", ["auto", None])
async def test_an_honest_kit_lists_and_reads_through_kitfs(
    registry: RegistryServer, tmp_path: Path, toc: str | None
) -> None:
    layers, want = layers_for(f"honest-{toc}")
    ref = await publish_kit(registry.host, "crafted/honest", f"t-{toc}", layers, toc=toc)
    assert ref == f"{registry.host}/crafted/honest:t-{toc}"

    listing = await trio.to_thread.run_sync(lambda: kitfs("ls", ref, "--json"))
    assert listing.returncode == 0, listing.stderr
    shown = {e["path"]: e for e in json.loads(listing.stdout)}
    assert {p: e["size"] for p, e in shown.items() if e["type"] == "file"} == {
        **{p: len(d) for p, d in want.items()}, "Kitfile": shown["Kitfile"]["size"]}
    assert shown["model/emptydir"]["type"] == "dir"
    honest = layers[0].toc
    assert honest is not None
    assert shown["model/weights.bin"]["offset"] == next(
        e.offset for e in honest.entries if e.name == "model/weights.bin")

    async with opened(ref, tmp_path / "cache") as kit:
        for path, data in want.items():
            assert await read_file(kit, path) == data, path
        if toc == "auto":
            states = {layer["state"] for layer in kit.engine.status()["layers"]}
            assert "poisoned" not in states


KITFILE = {"manifestVersion": "1.0.0", "package": {"name": "pinned"},
           "model": {"name": "m", "path": "./model"},
           "datasets": [{"name": "d", "path": "./data/train.csv",
                         "digest": "sha256:" + "0" * 64}],
           "docs": [{"path": "./README.md"}]}


async def test_publish_pins_the_table_config_and_annotations(registry: RegistryServer) -> None:
    layers, _ = layers_for("pins")
    ref = await publish_kit(registry.host, "crafted/pins", "v1", layers, KITFILE,
                            annotations={"x.test": "1"}, referrer=True)
    assert ref == f"{registry.host}/crafted/pins:v1"
    manifest, toc = await published_toc(registry.host, "crafted/pins", "v1")
    assert toc == toc_for(*layers, strict=False) and toc is not None
    assert len(toc.layers) == 2
    assert manifest["artifactType"] == mt.KITOPS_ARTIFACT_TYPE
    assert manifest["config"]["mediaType"] == mt.KITOPS_CONFIG
    assert manifest["annotations"][mt.ANNOTATION_CLI_VERSION]
    assert manifest["annotations"]["x.test"] == "1"
    assert manifest["annotations"][TOC_ANNOTATION] == sha256(dump_toc(toc))
    assert [d["digest"] for d in manifest["layers"]] == [layer.digest for layer in layers]
    assert [d["mediaType"] for d in manifest["layers"]] == [
        mt.layer_media_type("model"), mt.layer_media_type("dataset", "tar", "gzip"),
        mt.layer_media_type("docs", "tar", "gzip")]
    async with RegistryClient(registry.host, ClientOptions()) as client:
        body, _, digest = await client.get_manifest("crafted/pins", "v1")
        config = json.loads(await client.get_blob("crafted/pins", manifest["config"]["digest"]))
        referrers = await client.referrers("crafted/pins", digest)
    assert body == kit_blobs(layers, KITFILE, annotations={"x.test": "1"})[0]
    assert list(config) == ["manifestVersion", "package", "model", "datasets", "docs"]
    assert config["model"]["digest"] == layers[0].digest
    assert config["model"]["diffId"] == layers[0].digest  # uncompressed
    assert config["datasets"][0]["digest"] == "sha256:" + "0" * 64  # a given digest is kept
    assert "diffId" not in config["datasets"][0]
    assert config["docs"][0]["diffId"] == layers[2].uncompressed_digest() != layers[2].digest
    assert referrers, "the TOC referrer was attached"


async def test_publish_takes_raw_config_and_toc_bytes(registry: RegistryServer) -> None:
    layer = craft_layer(build_tar([("model/w", b"w" * 100)]))
    await publish_kit(registry.host, "crafted/raw", "v1", [layer], b'{"not":"a kitfile"}',
                      toc=b"not json")
    async with RegistryClient(registry.host, ClientOptions()) as client:
        body, _, _ = await client.get_manifest("crafted/raw", "v1")
        manifest = json.loads(body)
        assert await client.get_blob("crafted/raw", manifest["config"]["digest"]) == (
            b'{"not":"a kitfile"}')
    assert manifest["annotations"][TOC_ANNOTATION] == sha256(b"not json")
    with pytest.raises(FormatError, match="not JSON"):
        await published_toc(registry.host, "crafted/raw", "v1")


# --- lies in the table of contents -----------------------------------------------------


@pytest.fixture(params=["none", "zstd"])
def honest(request: pytest.FixtureRequest) -> CraftLayer:
    layer = craft_layer(model_tar(), compression=request.param, **SMALL)
    assert layer.toc is not None and len(layer.toc.chunks) > 3
    return layer


def by_name(toc: LayerToc) -> dict[str, tuple[int, int]]:
    return {e.name: (e.offset, e.size) for e in toc.entries}


def test_swap_files(honest: CraftLayer) -> None:
    toc = honest.toc
    assert toc is not None
    lie = swap_files(toc, "model/weights.bin", "model/config.json")
    before, after = by_name(toc), by_name(lie)
    assert after["model/weights.bin"] == before["model/config.json"]
    assert after["model/config.json"] == before["model/weights.bin"]
    assert {k: v for k, v in after.items() if "weights" not in k and "config" not in k} == {
        k: v for k, v in before.items() if "weights" not in k and "config" not in k}
    assert [e.offset for e in lie.entries] == sorted(e.offset for e in lie.entries)
    assert sorted(by_name(lie).values()) == sorted(before.values())  # the same slots
    assert lie.chunks == toc.chunks and lie.digest == toc.digest


def test_hide_and_phantom(honest: CraftLayer) -> None:
    toc = honest.toc
    assert toc is not None and honest.stream is not None
    hidden = hide_entry(toc, "model/config.json")
    assert set(by_name(toc)) - set(by_name(hidden)) == {"model/config.json"}
    assert len(hidden.entries) == len(toc.entries) - 1
    ghost = add_phantom(toc, "model/ghost.bin")
    extra = set(by_name(ghost)) - set(by_name(toc))
    assert extra == {"model/ghost.bin"}
    offset, size = by_name(ghost)["model/ghost.bin"]
    assert size == BLOCK and offset + size == toc.stream_size == len(honest.stream)
    assert honest.stream[offset - BLOCK : offset + size] == bytes(2 * BLOCK)  # the end marker
    assert "model/ghost.bin" not in {e.name for e in index_tar_stream(io.BytesIO(
        honest.stream))}
    moved = point_at(toc, "model/zero.bin", 1024, 7)
    assert by_name(moved)["model/zero.bin"] == (1024, 7)


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_hidden_file_lie_keeps_every_chunk_check(compression: str) -> None:
    secret = b"not what the tar says " * 50
    layer, lie = hidden_file_lie(model_tar(), "model/config.json", secret,
                                 compression=compression, **SMALL)
    honest = layer.toc
    assert honest is not None and layer.stream is not None
    offset, size = by_name(lie)["model/config.json"]
    assert layer.stream[offset : offset + size] == secret
    assert offset >= end_of_archive(layer.stream)
    assert by_name(honest)["model/config.json"] != (offset, size)
    assert {k: v for k, v in by_name(lie).items() if k != "model/config.json"} == {
        k: v for k, v in by_name(honest).items() if k != "model/config.json"}
    assert lie.chunks == honest.chunks and lie.stream_size == len(layer.stream)
    got = b"".join(stream_of(layer, lie, i) for i in range(len(lie.chunks)))
    assert got == layer.stream
    assert all(matches(stream_of(layer, lie, i), c.digest) for i, c in enumerate(lie.chunks))
    validate_layer_toc(lie, len(layer.blob), compression != "none")


async def test_a_lying_table_is_published_as_given(registry: RegistryServer) -> None:
    layer, lie = hidden_file_lie(model_tar(), "model/config.json", b"lie" + os.urandom(8))
    await publish_kit(registry.host, "crafted/lie", "v1", [layer], toc=[lie])
    _, toc = await published_toc(registry.host, "crafted/lie", "v1")
    assert toc is not None and toc.layers == (lie,)


def test_nonsense_differs_and_is_refused_in_one_line(honest: CraftLayer) -> None:
    toc = honest.toc
    assert toc is not None
    for name, mutate in NONSENSE.items():
        lie = mutate(toc)
        assert lie != toc, name
        with pytest.raises(FormatError) as info:
            validate_layer_toc(lie, len(honest.blob), honest.compression != "none")
        assert "\n" not in str(info.value), name
        assert str(info.value).startswith(f"table of contents of layer {toc.digest}: "), name


# --- lies in tar headers ---------------------------------------------------------------


def test_header_spans() -> None:
    tar = model_tar()
    spans = header_spans(tar)
    entries = index_tar_stream(io.BytesIO(tar))
    assert [s.name for s in spans] == [e.name for e in entries]
    assert [s.data for s in spans] == [e.offset for e in entries]
    for s in spans:
        assert s.main == s.data - BLOCK and s.start <= s.main
        assert s.extended == (s.name == LONG) == (s.start < s.main)
    header_bytes = sum(s.data - s.start for s in spans)
    data_bytes = sum(s.size + (-s.size % BLOCK) for s in spans)
    assert header_bytes + data_bytes + 2 * BLOCK == len(tar)


def test_swapping_names_in_headers_keeps_a_valid_tar() -> None:
    tar = build_tar([("model/a.bin", b"A" * 3000), ("model/b.bin", b"B" * 3000),
                     ("model/c.bin", b"C" * 10)])
    lie = lie_in_headers(tar, swap=("model/a.bin", "model/b.bin"))
    bad = lie(0, tar)
    assert len(bad) == len(tar)
    entries = {e.name: e for e in index_tar_stream(io.BytesIO(bad))}  # checksums hold
    honest = {e.name: e for e in index_tar_stream(io.BytesIO(tar))}
    assert entries["model/a.bin"].offset == honest["model/b.bin"].offset
    assert entries["model/b.bin"].offset == honest["model/a.bin"].offset
    with tarfile.open(fileobj=io.BytesIO(bad)) as tf:  # Python's reader agrees
        assert tf.extractfile("model/a.bin").read() == b"B" * 3000  # type: ignore[union-attr]
    changed = [i for i in range(len(tar)) if tar[i] != bad[i]]
    assert changed and all(any(at <= i < at + BLOCK for at in lie.patches) for i in changed)
    assert set(lie.patches) == {honest["model/a.bin"].offset - BLOCK,
                                honest["model/b.bin"].offset - BLOCK}
    rng = random.Random(1)
    for _ in range(200):  # a proxy sees ranges, not the whole blob
        lo = rng.randrange(len(tar))
        hi = rng.randrange(lo, len(tar) + 1)
        assert lie(lo, tar[lo:hi]) == bad[lo:hi]
        assert lie.touches(lo, hi - lo) or tar[lo:hi] == bad[lo:hi]


def test_rewrite_header_fields() -> None:
    tar = model_tar()
    span = header_spans(tar)[1]
    block = tar[span.main : span.main + BLOCK]
    long_name = "model/" + "x" * 90 + "/" + "y" * 90
    new = rewrite_header(block, name=long_name, mode=0o600)
    patched = tar[: span.main] + new + tar[span.main + BLOCK :]
    e = index_tar_stream(io.BytesIO(patched))[1]
    assert (e.name, e.mode, e.offset) == (long_name, 0o600, span.data)
    zero = next(s for s in header_spans(tar) if s.name == "model/zero.bin")
    as_dir = rewrite_header(tar[zero.main : zero.data], kind="dir")
    kinds = {e.name: e.kind for e in index_tar_stream(
        io.BytesIO(tar[: zero.main] + as_dir + tar[zero.data :]))}
    assert kinds["model/zero.bin"] == "dir"
    small = build_tar([("f", b"f" * 1000)], parents=False)
    longer = rewrite_header(small[:BLOCK], size=1024)  # still inside the padding
    assert index_tar_stream(io.BytesIO(longer + small[BLOCK:]))[0].size == 1024
    with pytest.raises(ValueError, match="does not fit"):
        rewrite_header(block, name="z" * 101)
    with pytest.raises(ValueError, match="extension header"):
        lie_in_headers(tar, rename={LONG: "model/short"})
    modes = lie_in_headers(tar, modes={"model/zero.bin": 0o4755})
    assert {e.name: e.mode for e in index_tar_stream(io.BytesIO(modes(0, tar)))}[
        "model/zero.bin"] == 0o4755


async def test_a_proxy_serves_the_header_lie_and_whole_blobs_fail_their_digest(
    registry: RegistryServer
) -> None:
    tar = build_tar([("model/a.bin", os.urandom(5000)), ("model/b.bin", os.urandom(5000))])
    layer = craft_layer(tar)
    await publish_kit(registry.host, "crafted/headers", "v1", [layer], toc=None)
    lie = lie_in_headers(tar, swap=("model/a.bin", "model/b.bin"))
    with FaultProxy(registry.host) as proxy:
        proxy.add(Replace(lie), path=layer.digest)
        async with RegistryClient(proxy.host, ClientOptions(retry_budget=1)) as client:
            for at, block in lie.patches.items():
                got = await client.read_range("crafted/headers", layer.digest, at - 100, 700)
                assert got == lie(at - 100, tar[at - 100 : at + 600])
                assert got[100:612] == block
            with pytest.raises(IntegrityError):
                await client.get_blob("crafted/headers", layer.digest)
