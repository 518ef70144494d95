"""validate_layer_toc and layer_from_json: a table of contents is authentic, not honest.

Its digest is pinned in the manifest, but whoever packed the ModelKit wrote it.
Everything that can be judged without reading the layer is refused here with
one line naming the layer; what `kitfs pack` writes always passes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from crafted import (
    NONSENSE,
    Member,
    add_phantom,
    build_tar,
    craft_layer,
    hidden_file_lie,
    hide_entry,
    published_toc,
    swap_files,
)

from helpers import kitfs, make_project
from kitfs.errors import FormatError
from kitfs.modelkit import mediatypes as mt
from kitfs.modelkit.chunkdigest import chunk_digest
from kitfs.modelkit.kitignore import KitIgnore
from kitfs.modelkit.layers import plan_layer
from kitfs.modelkit.tarwriter import write_layer
from kitfs.modelkit.toc import (
    LayerToc,
    ModelKitToc,
    TocChunk,
    TocEntry,
    dump_toc,
    layer_from_json,
    layer_to_json,
    load_toc,
    validate_layer_toc,
)
from registry import RegistryServer

SMALL = {"chunk_size": 4096, "block_size": 1024}


def refused(toc: LayerToc, blob_size: int | None = None, compressed: bool = False) -> str:
    """The one-line message validate_layer_toc refuses `toc` with."""
    with pytest.raises(FormatError) as info:
        validate_layer_toc(toc, toc.blob_size if blob_size is None else blob_size, compressed)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message and "Error(" not in message
    assert message.startswith(f"table of contents of layer {toc.digest}: "), message
    assert len(message) < 300, message
    return message


def sample_tar() -> bytes:
    return build_tar([
        ("model/a.bin", bytes(range(256)) * 23),
        ("model/b.bin", b"b" * 6000),
        ("model/sub/c.txt", b"hello\n"),
        Member("model/empty"),
        Member("model/emptydir", kind="dir"),
        ("model/tail.bin", b"t" * 9000),
    ])


@pytest.fixture(params=["none", "gzip", "zstd"])
def layer(request: pytest.FixtureRequest) -> tuple[LayerToc, int, bool]:
    """An honest table of contents of a many-chunk layer, its blob size, whether compressed."""
    crafted = craft_layer(sample_tar(), compression=request.param, **SMALL)
    assert crafted.toc is not None and len(crafted.toc.chunks) > 3
    return crafted.toc, len(crafted.blob), request.param != "none"


# --- what kitfs pack writes passes ----------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
async def test_every_table_kitfs_pack_pushes_passes(
    registry: RegistryServer, tmp_path: Path, compression: str
) -> None:
    project = make_project(tmp_path / "p", weight_bytes=(5 << 20) + 777)
    proc = kitfs("pack", str(project), "-t", f"{registry.host}/tocvalid/{compression}:v1",
                 "--compression", compression, home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    manifest, toc = await published_toc(registry.host, f"tocvalid/{compression}", "v1")
    assert toc is not None
    assert len(toc.layers) == len(manifest["layers"]) == 3
    for desc in manifest["layers"]:
        layer_toc = toc.layer(desc["digest"])
        assert layer_toc is not None
        compressed = mt.parse_layer_media_type(desc["mediaType"]).compression != "none"
        assert compressed == (compression != "none")
        validate_layer_toc(layer_toc, desc["size"], compressed)
    weights = next(t for t in toc.layers if any(e.name.endswith(".safetensors")
                                                for e in t.entries))
    assert len(weights.chunks) == 3  # 5 MiB and a bit in 2 MiB chunks
    assert (weights.block_size > 0) == (compression == "none")


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
@pytest.mark.parametrize(("chunk_size", "block_size"),
                         [(4096, 1024), (8192, 8192), (1 << 20, 512), (4 << 20, 1 << 18)])
def test_write_layer_output_passes_at_any_chunk_size(
    tmp_path: Path, compression: str, chunk_size: int, block_size: int
) -> None:
    """Long (PAX) names, empty files, nested directories, one chunk or hundreds."""
    project = make_project(tmp_path / "p", weight_bytes=100_000)
    entries = plan_layer(project, "./model", ["./model"], KitIgnore.from_context(project))
    out = io.BytesIO()
    toc = write_layer(entries, out, compression=compression, chunk_size=chunk_size,
                      block_size=block_size, workers=0,
                      media_type=mt.layer_media_type("model", "tar", compression))
    validate_layer_toc(toc, len(out.getvalue()), compression != "none")
    back = load_toc(dump_toc(ModelKitToc((toc,)))).layers[0]
    validate_layer_toc(back, len(out.getvalue()), compression != "none")


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_a_table_walked_from_headers_passes(compression: str) -> None:
    """What kitfs records for a kit-made layer: no chunks, stream size -1 (unknown)."""
    crafted = craft_layer(sample_tar(), compression=compression, chunked=False)
    media_type = crafted.media_type
    walked = LayerToc(crafted.digest, crafted.uncompressed_digest()
                      if compression == "none" else "", media_type, len(crafted.blob), -1,
                      craft_layer(sample_tar()).toc.entries)
    validate_layer_toc(walked, len(crafted.blob), compression != "none")
    short = len(crafted.blob) - 4096
    assert "is not the manifest's" in refused(walked, short, compression != "none")
    if compression == "none":  # the blob bounds the entries
        assert "past the end of the stream" in refused(replace(walked, blob_size=short))


def test_lies_that_only_reading_the_layer_can_expose_pass(
    layer: tuple[LayerToc, int, bool]
) -> None:
    """The toolkit's lies are shaped like real tables: static checks must let them through
    (the engine compares them with the tar headers)."""
    toc, blob_size, compressed = layer
    validate_layer_toc(toc, blob_size, compressed)
    for lie in (swap_files(toc, "model/a.bin", "model/tail.bin"),
                hide_entry(toc, "model/sub"), hide_entry(toc, "model/b.bin"),
                add_phantom(toc, "model/ghost.bin")):
        validate_layer_toc(lie, blob_size, compressed)
    crafted, lie = hidden_file_lie(sample_tar(), "model/tail.bin", b"secret" * 100,
                                   compression="zstd" if compressed else "none", **SMALL)
    validate_layer_toc(lie, len(crafted.blob), compressed)


# --- what is refused -------------------------------------------------------------------


@pytest.mark.parametrize("lie", sorted(NONSENSE))
def test_nonsense_is_refused_in_one_line(layer: tuple[LayerToc, int, bool], lie: str) -> None:
    toc, blob_size, compressed = layer
    refused(NONSENSE[lie](toc), blob_size, compressed)


def _chunk(toc: LayerToc, i: int, **changes: Any) -> LayerToc:
    chunks = list(toc.chunks)
    chunks[i] = replace(chunks[i], **changes)
    return replace(toc, chunks=tuple(chunks))


def _entry(toc: LayerToc, i: int, **changes: Any) -> LayerToc:
    entries = list(toc.entries)
    entries[i] = replace(entries[i], **changes)
    return replace(toc, entries=tuple(entries))


UNCOMPRESSED_CASES: dict[str, tuple[Any, str]] = {
    "media type of another compression": (
        lambda t: replace(t, media_type=mt.layer_media_type("model", "tar", "zstd")),
        "disagrees with the manifest on compression"),
    "raw media type": (lambda t: replace(t, media_type=mt.layer_media_type("model", "raw")),
                       "is not a tar layer"),
    "unknown media type": (lambda t: replace(t, media_type="text/plain\n"),
                           "'text/plain\\n' is not a tar layer"),
    "diff id": (lambda t: replace(t, diff_id="sha256:" + "0" * 64), "diff id"),
    "chunk elsewhere in the blob": (lambda t: _chunk(t, 1, blob_offset=t.chunks[1].offset + 1),
                                    "in the blob"),
    "short chunk inside": (lambda t: _chunk(t, 1, size=100), "chunk 1 has 100 bytes, not"),
    "empty last chunk": (lambda t: _chunk(t, len(t.chunks) - 1, size=0), "has 0 bytes"),
    "chunk digest": (lambda t: _chunk(t, 0, digest="md5:" + "0" * 64), "invalid digest"),
    "bare hex digest in memory": (lambda t: _chunk(t, 0, digest="0" * 64), "invalid digest"),
    "block digests cut short": (lambda t: _chunk(t, 0, blocks=t.chunks[0].blocks[:-1]),
                                "bytes of block digests"),
    "block size not a power of two": (lambda t: replace(t, block_size=1536), "block size"),
    "block size over the chunk": (lambda t: replace(t, block_size=8192), "block size"),
    "block size under a tar block": (lambda t: replace(t, block_size=256), "block size"),
    "blocks without a block size": (lambda t: replace(t, block_size=0),
                                    "bytes of block digests, not 0"),
    "block size without chunks": (lambda t: replace(t, chunks=(), chunk_size=0),
                                  "block digests without chunks"),
    "stream size unknown with chunks": (lambda t: replace(t, stream_size=-1), "not the stream"),
    "negative stream size": (lambda t: replace(t, chunks=(), block_size=0, stream_size=-2),
                             "negative"),
    "stream past the blob": (lambda t: replace(t, chunks=(), block_size=0,
                                               stream_size=t.blob_size + 512),
                             "not its blob size"),
    "negative mode": (lambda t: _entry(t, 1, mode=-1), "mode -0o1"),
    "symlink": (lambda t: _entry(t, 1, kind="symlink"), "has kind 'symlink'"),
    "negative size": (lambda t: _entry(t, 1, size=-1), "has size -1"),
    "empty name": (lambda t: _entry(t, 1, name=""), "''"),
    "dot name": (lambda t: _entry(t, 0, name="."), "'.'"),
    "trailing slash": (lambda t: _entry(t, 0, name="model/"), "'model/'"),
    "dot component": (lambda t: _entry(t, 1, name="model/./a.bin"), "not a clean"),
    "entries out of order": (
        lambda t: replace(t, entries=(t.entries[1], t.entries[0], *t.entries[2:])), "overlaps"),
    "newline and .. in a long name": (lambda t: _entry(t, 1, name="x\n/../" * 30),
                                      "not a clean"),
    "huge offset": (lambda t: _entry(t, len(t.entries) - 1, offset=1 << 62),
                    "past the end of the stream"),
}


@pytest.mark.parametrize("case", sorted(UNCOMPRESSED_CASES))
def test_uncompressed_layer_refusals(case: str) -> None:
    crafted = craft_layer(sample_tar(), **SMALL)
    assert crafted.toc is not None
    mutate, expect = UNCOMPRESSED_CASES[case]
    message = refused(mutate(crafted.toc), len(crafted.blob))
    assert expect in message, message


def test_compressed_layer_refusals() -> None:
    crafted = craft_layer(sample_tar(), compression="gzip", **SMALL)
    toc, size = crafted.toc, len(crafted.blob)
    assert toc is not None
    c1, c2 = toc.chunks[1], toc.chunks[2]
    cases = {
        "not where the chunk before it ends": _chunk(
            toc, 2, blob_offset=c1.blob_offset + c1.blob_size - 1),
        "has 0 bytes in the blob": _chunk(toc, 2, blob_size=0),
        "runs past the end of the blob": _chunk(toc, len(toc.chunks) - 1, blob_size=size),
        "disagrees with the manifest": replace(toc, media_type=mt.layer_media_type("model")),
    }
    for expect, lie in cases.items():
        assert expect in refused(lie, size, True)
    # a gap between members would hide bytes that `kit unpack` decompresses and a mount
    # never sees (a second tar behind the one the chunks cover); so would bytes in front
    # of the first chunk or after the last
    gap = _chunk(toc, 2, blob_offset=c2.blob_offset + 1, blob_size=c2.blob_size - 1)
    assert "not where the chunk before it ends" in refused(gap, size, True)
    c0 = toc.chunks[0]
    front = _chunk(toc, 0, blob_offset=1, blob_size=c0.blob_size - 1)
    assert "starts at 1 in the blob" in refused(front, size, True)
    last = toc.chunks[-1]
    short = _chunk(toc, len(toc.chunks) - 1, blob_size=last.blob_size - 1)
    assert "not at its end" in refused(short, size, True)
    validate_layer_toc(toc, size, True)  # a diff id is not the digest
    assert "disagrees" in refused(toc, size, False)  # the manifest says uncompressed


def test_missing_parents_are_fine_but_a_parent_file_is_not() -> None:
    """kit-made layers may leave ancestor directories out; nothing can live below a file."""
    tar = build_tar([("a/b/c.txt", b"x"), ("a/d.txt", b"y")], parents=False)
    crafted = craft_layer(tar, **SMALL)
    assert crafted.toc is not None
    assert [e.name for e in crafted.toc.entries] == ["a/b/c.txt", "a/d.txt"]
    validate_layer_toc(crafted.toc, len(crafted.blob), False)
    lie = _entry(crafted.toc, 1, name="a/b/c.txt/d.txt")
    assert "is inside 'a/b/c.txt', which is a file" in refused(lie, len(crafted.blob))


def test_a_file_claiming_the_end_of_archive_marker_passes_one_past_it_does_not() -> None:
    crafted = craft_layer(sample_tar(), **SMALL)
    toc = crafted.toc
    assert toc is not None
    ghost = add_phantom(toc, "model/ghost")
    assert ghost.entries[-1].offset + ghost.entries[-1].size == toc.stream_size
    validate_layer_toc(ghost, len(crafted.blob), False)
    assert "past the end" in refused(add_phantom(toc, "model/ghost", size=513))


# --- layer_from_json only ever raises FormatError ---------------------------------------


def _valid_doc() -> dict[str, Any]:
    crafted = craft_layer(sample_tar(), **SMALL)
    assert crafted.toc is not None
    return layer_to_json(crafted.toc)


JUNK: list[Any] = [
    None, True, False, 0, -1, 1 << 63, -(1 << 63) - 1, 1 << 200, 1.5, float("nan"),
    float("inf"), "", "12", "file", "dir", "zz", [], [[]], [1, 2], {}, {"a": [1]},
    [None] * 6, [[1] * 6] * 3, ["a", "file", 0, 0, 0, 0, 0], "sha256:" + "0" * 64,
]


def _paths(node: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [at]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*at, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*at, i))
    return out


def _mutate(doc: Any, rng: random.Random) -> Any:
    doc = copy.deepcopy(doc)
    path = rng.choice(_paths(doc)[1:])
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    action = rng.randrange(5)
    if action in (0, 1):
        del parent[last]
    elif action == 2 and isinstance(parent, list):
        parent.append(copy.deepcopy(rng.choice(JUNK)))
    elif action == 3:
        parent[last] = [parent[last]]  # nested one level deeper
    else:
        parent[last] = copy.deepcopy(rng.choice(JUNK))
    return doc


def test_layer_from_json_raises_only_format_error_on_any_shape() -> None:
    rng = random.Random(20240607)
    base = _valid_doc()
    assert layer_from_json(base) is not None
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(3000):
        doc = base
        for _ in range(rng.randint(1, 3)):
            doc = _mutate(doc, rng)
        try:
            layer = layer_from_json(doc)
        except FormatError as exc:
            assert "\n" not in str(exc) and str(exc).startswith(
                ("malformed kitfs table of contents", "invalid chunk digest")), exc
            outcomes["refused"] += 1
            continue
        outcomes["ok"] += 1
        for e in layer.entries:  # what came back has the declared types
            assert type(e.name) is str and e.kind in ("file", "dir")
            assert all(type(v) is int for v in (e.mode, e.size, e.offset, e.mtime))
        for c in layer.chunks:
            assert all(type(v) is int for v in (c.offset, c.size, c.blob_offset, c.blob_size))
        with contextlib.suppress(FormatError):  # validation: a FormatError too, or nothing
            validate_layer_toc(layer, layer.blob_size, False)
    assert outcomes["refused"] > 1000 and outcomes["ok"] > 10, outcomes


@pytest.mark.parametrize(("where", "value"), [
    ("blobSize", True), ("blobSize", "10752"), ("blobSize", 1.0), ("blobSize", 1 << 64),
    ("streamSize", None), ("chunkSize", [4096]), ("digest", 1), ("entries", {"a": 1}),
    ("entries", "abcdef"), ("chunks", [[0, 1, 2]]), ("blockSize", -1), ("blockSize", True),
    ("blocks", ["!"]), ("entries", [["a", "file", 0, 0, 0]]),
    ("entries", [["a", "link", 0, 0, 512, 0]]), ("entries", [[["a"], "file", 0, 0, 512, 0]]),
])
def test_layer_from_json_wrong_types(where: str, value: Any) -> None:
    doc = _valid_doc()
    doc[where] = value
    with pytest.raises(FormatError, match=r"^malformed kitfs table of contents") as info:
        layer_from_json(doc)
    assert "\n" not in str(info.value) and "Error(" not in str(info.value)


def test_layer_from_json_not_an_object() -> None:
    for junk in ([], "x", 1, None, [_valid_doc()]):
        with pytest.raises(FormatError, match="malformed"):
            layer_from_json(junk)


def test_load_toc_raises_only_format_error_on_damaged_bytes() -> None:
    crafted = craft_layer(sample_tar(), **SMALL)
    assert crafted.toc is not None
    data = dump_toc(ModelKitToc((crafted.toc,)))
    rng = random.Random(5)
    for _ in range(1500):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(damaged))
            damaged[i] = rng.choice(b'0123456789-.:,[]{}"eE \\tfnu\xff\x00')
        if rng.random() < 0.2:
            damaged = damaged[: rng.randrange(len(damaged))]
        try:
            load_toc(bytes(damaged))
        except FormatError as exc:
            assert "\n" not in str(exc)
    for blob in (b"[" * 100_000, b"1" * 5000, b'{"version":1,"layers":[' + b"9" * 5000 + b"]}",
                 b'{"version":true,"layers":[]}', b"\xff\xfe", b"null"):
        with pytest.raises(FormatError):
            load_toc(blob)


def test_chunks_carry_their_digest_forms() -> None:
    """Constructed tables (not parsed) must use the in-memory `<algorithm>:<hex>` form."""
    data = b"z" * 4096
    toc = LayerToc("sha256:" + "1" * 64, "sha256:" + "1" * 64, mt.layer_media_type("model"),
                   4096, 4096, (TocEntry("f", "file", 0o644, 10, 512),), 4096,
                   (TocChunk(0, 4096, chunk_digest(data, "sha256"), 0, 4096),))
    validate_layer_toc(toc, 4096, False)
    validate_layer_toc(_chunk(toc, 0, digest=chunk_digest(data)), 4096, False)
    json.dumps(layer_to_json(toc))  # serialisable as is


def test_a_compressed_chunk_cannot_span_more_blob_than_it_could_take() -> None:
    """A chunk of 1 KiB claiming gigabytes of the blob would be fetched into one buffer
    that big (every chunk still tiling the blob): refused."""
    crafted = craft_layer(sample_tar(), compression="zstd", **SMALL)
    toc = crafted.toc
    assert toc is not None
    last = toc.chunks[-1]
    huge = last.size * 2 + 8192
    lie = replace(_chunk(toc, len(toc.chunks) - 1, blob_size=huge),
                  blob_size=last.blob_offset + huge)
    assert f"takes {huge} bytes of the blob" in refused(lie, lie.blob_size, True)
