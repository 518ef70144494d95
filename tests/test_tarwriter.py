"""The layer tar writer: Go archive/tar header bytes, chunking, hashing, compression.

Golden digests marked "Go" were produced by Go 1.19's archive/tar driven the
way kit's `writeLayerToTar` drives it (FileInfoHeader, Name = cleaned path,
sanitizeTarHeader), over `make_tree`'s tree and over synthetic headers.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import blake3
import pytest
import zstandard
from test_layers import OTHER_LAYERS, make_tree

from kitfs.cache.keys import chunk_key_for_digest
from kitfs.errors import FormatError, LocalStorageError
from kitfs.modelkit.chunkdigest import (
    BLOCK_DIGEST_SIZE,
    block_digests,
    block_matches,
    chunk_digest,
    matches,
)
from kitfs.modelkit.kitignore import KitIgnore
from kitfs.modelkit.layers import PlannedEntry, plan_layer
from kitfs.modelkit.tarwriter import (
    encode_header,
    format_pax_record,
    split_ustar_path,
    write_layer,
)
from kitfs.modelkit.toc import (
    DEFAULT_BLOCK_SIZE,
    LayerToc,
    ModelKitToc,
    TocChunk,
    dump_toc,
    load_toc,
)

GiB = 1 << 30
EMPTY_TAR_DIGEST = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
MEDIA_TYPE = "application/vnd.kitops.modelkit.model.v1.tar"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write(
    entries: list[PlannedEntry], compression: str = "none", **kw: int
) -> tuple[LayerToc, bytes]:
    buf = io.BytesIO()
    toc = write_layer(entries, buf, compression=compression, media_type=MEDIA_TYPE, **kw)  # type: ignore[arg-type]
    return toc, buf.getvalue()


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("w") / "ctx")


@pytest.fixture(scope="module")
def models(ctx: Path) -> list[PlannedEntry]:
    return plan_layer(ctx, "models", OTHER_LAYERS, KitIgnore.from_context(ctx))


# --- header bytes ----------------------------------------------------------------------


def test_golden_small_file_header_by_hand() -> None:
    """USTAR header for models/a.txt, 0644, 6 bytes, built field by field from Go's rules."""
    block = bytearray(512)
    block[0:100] = b"models/a.txt".ljust(100, b"\0")
    block[100:108] = b"0000644\0"  # formatOctal: zero-padded to width-1, then NUL
    block[108:116] = b"0001750\0"  # uid 1000
    block[116:124] = b"0000000\0"  # gid 0
    block[124:136] = b"00000000006\0"
    block[136:148] = b"00000000000\0"  # zero ModTime is written as Unix 0
    block[156:157] = b"0"
    block[257:263] = b"ustar\0"
    block[263:265] = b"00"
    # uname/gname: empty strings, so all NUL; linkname empty.
    block[329:337] = b"0000000\0"  # devmajor: formatted although 0
    block[337:345] = b"0000000\0"  # devminor
    chksum = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    block[148:156] = b"%06o\0 " % chksum
    expected = bytes(block)
    assert encode_header(b"models/a.txt", "file", 0o644, 6) == expected
    assert (
        _sha(expected) == "9c3c9a2359a4a6a8ab8a9b10e4c8160c7f1b6d228db08c30770ce6eda4021911"
    )  # Go


@pytest.mark.parametrize(
    ("name", "kind", "mode", "size", "go_sha256"),
    [
        (
            "models/" + "L" * 150,
            "file",
            0o644,
            8 * GiB,
            "5f8a885c130c472f05b3c387cfc6721c2a51645c620749b2271540bcb978312e",
        ),
        (
            "ünï/" + "z" * 120,
            "file",
            0o4755,
            10 * GiB,
            "067ad4a6520396b85a446e904f7c5264b024921ca04e64cb219dd7f2bf163767",
        ),
        (
            "models/" + "D" * 120,
            "dir",
            0o750,
            0,
            "f3a9a0cff63b013dd87480dec286a6c6f768cdb484e2c61a7f5a97d8e2ebb1ab",
        ),
        (
            "models/ファイル.txt",
            "file",
            0o600,
            8 * GiB - 1,
            "5fcea62cd83e021cfe11a6c22e2d5a6c41e01a789c2c958250adfca216594a6e",
        ),
    ],
)
def test_go_golden_headers(name: str, kind: str, mode: int, size: int, go_sha256: str) -> None:
    data = encode_header(name.encode(), kind, mode, size)  # type: ignore[arg-type]
    assert len(data) == 1536
    assert _sha(data) == go_sha256


def test_huge_size_uses_pax_without_writing_data() -> None:
    just_fits = encode_header(b"w.bin", "file", 0o644, 8 * GiB - 1)
    assert len(just_fits) == 512 and just_fits[124:136] == b"77777777777\0"

    data = encode_header(b"m/w.bin", "file", 0o644, 8 * GiB)
    xhdr, records, main = data[:512], data[512:1024], data[1024:]
    assert xhdr[156:157] == b"x"
    assert xhdr[:100].rstrip(b"\0") == b"m/PaxHeaders.0/w.bin"
    assert xhdr[124:136] == b"%011o\0" % 19
    assert records == b"19 size=8589934592\n".ljust(512, b"\0")
    assert main[:100].rstrip(b"\0") == b"m/w.bin"
    assert main[124:136] == b"00000000000\0"  # Go writes 0 where the size does not fit
    assert main[156:157] == b"0" and main[257:265] == b"ustar\x0000"

    long_name = b"d/" + b"n" * 120
    data = encode_header(long_name, "file", 0o644, 10 * GiB)
    recs = data[512:1024].rstrip(b"\0")
    assert recs == format_pax_record("path", long_name) + b"20 size=10737418240\n"
    assert recs.startswith(b"132 path=d/nnn")  # "path" sorts before "size"


def test_pax_records_and_names_for_unicode_and_long_paths() -> None:
    name = "models/ünïcödé/ファイル.txt".encode()
    data = encode_header(name, "file", 0o644, 7)
    assert len(data) == 1536
    xhdr, main = data[:512], data[1024:]
    assert xhdr[:100].rstrip(b"\0") == b"models/ncd/PaxHeaders.0/.txt"  # made ASCII like Go
    assert data[512:1024].rstrip(b"\0") == format_pax_record("path", name)
    assert main[:100].rstrip(b"\0") == b"models/ncd/.txt"
    assert main[345:500] == bytes(155)  # no prefix in a PAX main header

    deep = ("models/" + "/".join(["d" * 40] * 6) + "/" + "f" * 50).encode()
    assert len(deep) == 303 and split_ustar_path(deep) is None
    data = encode_header(deep, "file", 0o644, 1)
    assert data[1024:1124] == deep[:100]  # cut to 100 bytes, no NUL
    # A cut that ends on "/" gets a NUL there (Go: buggy readers would see a directory).
    cut = b"a" * 99 + "/bé".encode()
    main = encode_header(cut, "file", 0o644, 1)[1024:]
    assert main[:100] == b"a" * 99 + b"\0"


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("a" * 100, None),  # fits the name field as it is
        ("m/" + "n" * 99, ("m", "n" * 99)),
        ("p" * 155 + "/s", ("p" * 155, "s")),
        ("p" * 156 + "/s", None),  # prefix over 155
        ("m/" + "n" * 101, None),  # name part over 100
        ("a" * 101, None),  # no slash
        ("ü/" + "n" * 99, None),  # not ASCII
        ("a/b/" + "c" * 98, ("a/b", "c" * 98)),
    ],
)
def test_split_ustar_path(name: str, split: tuple[str, str] | None) -> None:
    got = split_ustar_path(name.encode())
    assert got == (None if split is None else (split[0].encode(), split[1].encode()))


def test_format_pax_record_length_carry() -> None:
    assert format_pax_record("k", b"vvv") == b"8 k=vvv\n"
    # 4 + 91 + 3 = 98, plus two digits = 100, which has three digits: Go recounts to 101.
    rec = format_pax_record("path", b"x" * 91)
    assert rec.startswith(b"101 path=") and len(rec) == 101


def _check_block_fields(block: bytes) -> None:
    assert block[257:263] == b"ustar\0" and block[263:265] == b"00"
    assert block[265:329] == bytes(64)  # uname, gname
    assert block[155:156] == b" " and block[154:155] == b"\0"
    chksum = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    assert block[148:154] == b"%06o" % chksum


def test_every_header_of_a_layer(models: list[PlannedEntry]) -> None:
    toc, blob = _write(models)
    pos = 0
    seen: list[str] = []
    while blob[pos : pos + 512] != bytes(512):
        block = blob[pos : pos + 512]
        _check_block_fields(block)
        full_name: bytes | None = None
        if block[156:157] == b"x":
            assert block[100:124] == b"0000000\0" * 3  # mode, uid, gid
            assert block[136:148] == b"00000000000\0"
            assert block[329:345] == bytes(16)  # devmajor/devminor left empty in PAX headers
            size = int(block[124:135], 8)
            records = blob[pos + 512 : pos + 512 + size]
            assert records.startswith(b"%d path=" % len(records))
            full_name = records.split(b"=", 1)[1][:-1]
            head, _, tail = full_name.rpartition(b"/")
            pax_name = bytes(c for c in head + b"/PaxHeaders.0/" + tail if c < 0x80)
            assert block[:100].rstrip(b"\0") == pax_name[:100].rstrip(b"/")
            pos += 512 + (size + 511) // 512 * 512
            block = blob[pos : pos + 512]
            _check_block_fields(block)
            assert block[345:500] == bytes(155)
        name = full_name
        if name is None:
            prefix = block[345:500].rstrip(b"\0")
            short = block[:100].rstrip(b"\0")
            name = prefix + b"/" + short if prefix else short
        entry = toc.entries[len(seen)]
        assert name.decode() == entry.name
        assert not name.endswith(b"/")
        assert block[100:108] == b"%07o\0" % entry.mode
        assert block[108:124] == b"0001750\x000000000\0"  # uid 1000, gid 0
        assert block[136:148] == b"00000000000\0"  # mtime 0
        assert block[156:157] == (b"5" if entry.kind == "dir" else b"0")
        assert block[329:345] == b"0000000\0" * 2
        assert block[157:257] == bytes(100)  # no link name
        assert int(block[124:135], 8) == entry.size
        assert entry.offset == pos + 512
        seen.append(entry.name)
        pos += 512 + (entry.size + 511) // 512 * 512
    assert seen == [e.name for e in models]
    assert blob[pos:] == bytes(1024)  # two zero blocks, no record padding
    assert len(blob) == toc.stream_size == toc.blob_size


# --- byte-identical to kit -------------------------------------------------------------

GO_LAYER_DIGESTS = [
    ("models", OTHER_LAYERS, "43c244acee99ef8a4f24bba23fd2f21397767268b0db0ff01826536ec8bf1438"),
    (".", [], "b0e4b95f19dbe13197d58666146c88d67ce2fc4e7b5968ee629ba40f490515b3"),
    (
        "models/nested",
        OTHER_LAYERS,
        "8b6c8d58ba75a52aeaf783346e11df7725f29a50ddae3dafeb360191c5827f6c",
    ),
    ("models/a.txt", [], "aa71ffd8691a06b0dace17e1c33ed1490e669739e51a396f1edde423d81e3863"),
]


@pytest.mark.parametrize(("layer", "others", "go_digest"), GO_LAYER_DIGESTS)
def test_layer_digest_equals_kit(ctx: Path, layer: str, others: list[str], go_digest: str) -> None:
    entries = plan_layer(ctx, layer, others, KitIgnore.from_context(ctx))
    toc, blob = _write(entries, chunk_size=4096)
    assert toc.digest == toc.diff_id == "sha256:" + go_digest == "sha256:" + _sha(blob)


def test_empty_layer() -> None:
    toc, blob = _write([])
    assert blob == bytes(1024) and toc.digest == EMPTY_TAR_DIGEST and toc.entries == ()


# --- streams, chunks, compression ------------------------------------------------------


def _decompress(blob: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.decompress(blob)
    if compression == "zstd":
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(blob), read_across_frames=True
        )
        return reader.read()
    return blob


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_reproducible_and_consistent(models: list[PlannedEntry], compression: str) -> None:
    toc, blob = _write(models, compression, chunk_size=4096)
    again, blob2 = _write(models, compression, chunk_size=4096, workers=0)
    threaded, blob3 = _write(models, compression, chunk_size=4096, workers=3)
    assert blob == blob2 == blob3 and toc == again == threaded
    stream = _decompress(blob, compression)
    assert toc.digest == "sha256:" + _sha(blob) and toc.blob_size == len(blob)
    assert toc.diff_id == "sha256:" + _sha(stream) and toc.stream_size == len(stream)
    assert toc.diff_id == "sha256:" + GO_LAYER_DIGESTS[0][2]
    assert toc.media_type == MEDIA_TYPE and toc.chunk_size == 4096
    with tarfile.open(fileobj=io.BytesIO(stream)) as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == [e.name for e in models]
        for m, e in zip(members, models, strict=True):
            assert (m.mode, m.uid, m.gid, m.mtime, m.uname, m.gname) == (e.mode, 1000, 0, 0, "", "")
            if e.kind == "file":
                f = tf.extractfile(m)
                assert f is not None and f.read() == e.source.read_bytes()


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_chunks_stand_alone(models: list[PlannedEntry], compression: str) -> None:
    toc, blob = _write(models, compression, chunk_size=2048)
    stream = _decompress(blob, compression)
    assert len(toc.chunks) == -(-len(stream) // 2048)
    next_offset = next_blob = 0
    for chunk in toc.chunks:
        assert chunk.offset == next_offset and chunk.blob_offset == next_blob
        assert chunk.size == min(2048, len(stream) - chunk.offset)
        piece = blob[chunk.blob_offset : chunk.blob_offset + chunk.blob_size]
        plain = stream[chunk.offset : chunk.offset + chunk.size]
        if compression == "gzip":
            assert piece[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\xff"  # mtime 0, no name
            assert gzip.decompress(piece) == plain
        elif compression == "zstd":
            assert zstandard.frame_content_size(piece) == chunk.size
            assert zstandard.ZstdDecompressor().decompress(piece) == plain
        else:
            assert piece == plain and chunk.blob_offset == chunk.offset
        assert chunk.digest == "blake3:" + blake3.blake3(plain).hexdigest()
        next_offset += chunk.size
        next_blob += chunk.blob_size
    assert next_offset == len(stream) and next_blob == len(blob)


def test_toc_entries_point_at_file_data(models: list[PlannedEntry]) -> None:
    toc, blob = _write(models)
    for entry, planned in zip(toc.entries, models, strict=True):
        assert (entry.name, entry.kind, entry.mode, entry.mtime) == (
            planned.name,
            planned.kind,
            planned.mode,
            0,
        )
        if entry.kind == "file":
            data = planned.source.read_bytes()
            assert entry.size == len(data)
            assert blob[entry.offset : entry.offset + entry.size] == data


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_command_line_tools_read_it(
    models: list[PlannedEntry], compression: str, tmp_path: Path
) -> None:
    toc, blob = _write(models, compression, chunk_size=4096)
    tool = {"none": "tar", "gzip": "gzip", "zstd": "zstd"}[compression]
    if shutil.which(tool) is None or shutil.which("tar") is None:
        pytest.skip(f"{tool} not installed")
    path = tmp_path / "layer"
    path.write_bytes(blob)
    if compression != "none":
        stream = subprocess.run([tool, "-dc", str(path)], capture_output=True, check=True).stdout
        assert "sha256:" + _sha(stream) == toc.diff_id
        path.write_bytes(stream)
    listing = subprocess.run(
        ["tar", "-tvf", str(path)], capture_output=True, check=True, text=True
    ).stdout.splitlines()
    assert len(listing) == len(models)
    assert listing[0].startswith("drwxr-xr-x 1000/0") and listing[0].endswith(" models")
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "-xf", str(path), "-C", str(out)], check=True, capture_output=True)
    for e in models:
        if e.kind == "file":
            assert (out / e.name).read_bytes() == e.source.read_bytes()


def test_progress_counts_file_bytes(models: list[PlannedEntry]) -> None:
    seen: list[int] = []
    _write_with_progress = write_layer(
        models, io.BytesIO(), compression="none", media_type=MEDIA_TYPE, progress=seen.append
    )
    assert _write_with_progress.stream_size > 0
    assert sum(seen) == sum(e.size for e in models) and all(n > 0 for n in seen)


def test_big_file_spans_chunks(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40_000  # 10 MB
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    entries = [PlannedEntry("big.bin", "file", 0o644, len(data), src)]
    toc, blob = _write(entries, "none", chunk_size=1 << 20)
    assert len(toc.chunks) == 10
    assert blob[512 : 512 + len(data)] == data


def test_file_that_changed_size_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"12345")
    grown = [PlannedEntry("f.bin", "file", 0o644, 4, src)]
    with pytest.raises(LocalStorageError, match="changed size"):
        _write(grown)
    shrunk = [PlannedEntry("f.bin", "file", 0o644, 6, src)]
    with pytest.raises(LocalStorageError, match="changed size"):
        _write(shrunk, workers=2)
    gone = [PlannedEntry("g.bin", "file", 0o644, 6, tmp_path / "missing")]
    with pytest.raises(LocalStorageError, match="missing"):
        _write(gone)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        _write([], chunk_size=1000)
    with pytest.raises(ValueError):
        _write([], "brotli")


def test_raw_unbuffered_output(models: list[PlannedEntry], tmp_path: Path) -> None:
    path = tmp_path / "raw.tar"
    with open(path, "wb", buffering=0) as raw:
        toc = write_layer(models, raw, compression="zstd", media_type=MEDIA_TYPE)
    assert "sha256:" + _sha(path.read_bytes()) == toc.digest


def test_chunk_digests_in_the_toc_old_and_new() -> None:
    """Packs write BLAKE3 chunk digests; tables of contents with bare sha256 hex still read."""
    data = b"x" * 5000
    sha = hashlib.sha256(data).hexdigest()
    b3 = blake3.blake3(data).hexdigest()
    chunks = (TocChunk(0, 4096, "sha256:" + sha, 0, 4096),
              TocChunk(4096, 904, "blake3:" + b3, 4096, 904))
    layer = LayerToc("sha256:" + "a" * 64, "sha256:" + "a" * 64, "t", 5000, 5000, (), 4096, chunks)
    doc = json.loads(dump_toc(ModelKitToc((layer,))))
    assert [c[2] for c in doc["layers"][0]["chunks"]] == [sha, "blake3:" + b3]  # v1 form kept
    back = load_toc(dump_toc(ModelKitToc((layer,)))).layers[0]
    assert back == layer
    assert chunk_key_for_digest(back.chunks[0].digest) == sha
    assert chunk_key_for_digest(back.chunks[1].digest) == b3 + ".b3"
    assert matches(data, "sha256:" + sha) and matches(data, "blake3:" + b3)
    assert not matches(data + b"!", "blake3:" + b3)
    for bad in ("md5:" + sha, "blake3:" + b3[:-1], sha.upper(), "sha256:xyz"):
        doc["layers"][0]["chunks"][0][2] = bad
        with pytest.raises(FormatError, match="invalid chunk digest"):
            load_toc(json.dumps(doc).encode())


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_uncompressed_layers_carry_block_digests(tmp_path: Path, compression: str) -> None:
    """Each 256 KiB block of an uncompressed chunk has its own digest, so a mount can
    fetch and check part of a chunk; compressed chunks only decompress whole."""
    src = tmp_path / "w.bin"
    src.write_bytes(bytes(range(256)) * (5 << 12) + b"tail")  # 5 MiB + 4 bytes
    entries = [PlannedEntry("w.bin", "file", 0o644, src.stat().st_size, src)]
    toc = write_layer(entries, io.BytesIO(), compression=compression, media_type=MEDIA_TYPE)
    if compression != "none":
        assert toc.block_size == 0 and all(c.blocks == b"" for c in toc.chunks)
        assert "blockSize" not in json.loads(dump_toc(ModelKitToc((toc,))))["layers"][0]
        return
    assert toc.block_size == DEFAULT_BLOCK_SIZE
    stream = io.BytesIO()
    write_layer(entries, stream, compression="none", media_type=MEDIA_TYPE)
    data = stream.getvalue()
    for c in toc.chunks:
        blocks = [data[o : o + toc.block_size]
                  for o in range(c.offset, c.offset + c.size, toc.block_size)]
        assert len(c.blocks) == len(blocks) * BLOCK_DIGEST_SIZE
        for i, block in enumerate(blocks):
            assert block_matches(block, c.blocks, i)
            assert not block_matches(block[:-1] + b"?", c.blocks, i)
        assert not block_matches(blocks[0], c.blocks, len(blocks))  # no such block
    assert load_toc(dump_toc(ModelKitToc((toc,)))).layers[0] == toc


def test_malformed_block_digests_are_refused() -> None:
    data = b"y" * 5000
    chunk = TocChunk(0, 5000, chunk_digest(data), 0, 5000, block_digests(data, 1024))
    layer = LayerToc("sha256:" + "a" * 64, "sha256:" + "a" * 64, "t", 5000, 5000, (), 8192,
                     (chunk,), block_size=1024)
    doc = json.loads(dump_toc(ModelKitToc((layer,))))
    assert load_toc(json.dumps(doc).encode()).layers[0] == layer
    for blocks in (["!!"], [], [doc["layers"][0]["blocks"][0][:-8]], "x"):
        broken = json.loads(json.dumps(doc))
        broken["layers"][0]["blocks"] = blocks
        with pytest.raises(FormatError, match="malformed"):
            load_toc(json.dumps(broken).encode())
    broken = json.loads(json.dumps(doc))
    broken["layers"][0]["blockSize"] = float("inf")  # JSON `Infinity`: Python's json reads it
    with pytest.raises(FormatError, match="malformed"):
        load_toc(json.dumps(broken).encode())
