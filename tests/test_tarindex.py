"""The tar header walker: range-read indexing of kit, kitfs and foreign tar layers."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest
import zstandard
from test_layers import OTHER_LAYERS, make_tree

from kitfs.errors import FormatError
from kitfs.modelkit.kitignore import KitIgnore
from kitfs.modelkit.layers import PlannedEntry, plan_layer
from kitfs.modelkit.tarindex import (
    Readable,
    TarWalker,
    index_tar_stream,
    parse_numeric,
    parse_pax_records,
)
from kitfs.modelkit.tarwriter import encode_header, format_pax_record, write_layer
from kitfs.modelkit.toc import LayerToc, TocEntry

GiB = 1 << 30


class RangeReader:
    """A blob behind range reads, counting what was asked for."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.requests: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        self.requests.append((offset, length))
        return self.data[offset : offset + length]

    @property
    def bytes_read(self) -> int:
        return sum(min(n, max(0, len(self.data) - o)) for o, n in self.requests)


def walk(data: bytes, *, known_size: bool = True, **kw: int) -> tuple[list[TocEntry], RangeReader]:
    reader = RangeReader(data)
    walker = TarWalker(len(data) if known_size else None, **kw)
    while (req := walker.next_request()) is not None:
        walker.feed(req[0], reader.read(*req))
    assert walker.done
    return walker.entries, reader


def _layer(entries: list[PlannedEntry], compression: str = "none") -> tuple[LayerToc, bytes]:
    buf = io.BytesIO()
    toc = write_layer(entries, buf, compression=compression, media_type="m", chunk_size=4096)  # type: ignore[arg-type]
    return toc, buf.getvalue()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[PlannedEntry]:
    ctx = make_tree(tmp_path_factory.mktemp("i") / "ctx")
    return plan_layer(ctx, "models", OTHER_LAYERS, KitIgnore.from_context(ctx))


# --- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("known_size", [True, False])
def test_round_trip_with_writer(models: list[PlannedEntry], known_size: bool) -> None:
    toc, blob = _layer(models)
    entries, reader = walk(blob, known_size=known_size)
    assert entries == list(toc.entries)
    # Small files: a couple of 64 KiB windows cover the whole 29 KiB layer.
    assert len(reader.requests) <= 2


def test_big_files_are_skipped_not_read(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"\x01" * (6 << 20))
    small = tmp_path / "s.txt"
    small.write_bytes(b"s" * 100)
    entries = [
        PlannedEntry("m", "dir", 0o755, 0, tmp_path),
        PlannedEntry("m/a.bin", "file", 0o644, 6 << 20, big),
        PlannedEntry("m/b.bin", "file", 0o644, 6 << 20, big),
        *(PlannedEntry(f"m/s{i:03}.txt", "file", 0o644, 100, small) for i in range(50)),
        PlannedEntry("m/z.bin", "file", 0o644, 6 << 20, big),
    ]
    toc, blob = _layer(entries)
    got, reader = walk(blob)
    assert got == list(toc.entries)
    assert reader.bytes_read < 400_000  # of an 18 MiB blob
    # After a big file only a header is asked for; small files are batched in windows.
    assert (toc.entries[2].offset - 512, 512) in reader.requests
    assert len(reader.requests) <= 8


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_python_tarfile_archives(fmt: int) -> None:
    names = [
        "top",
        "top/" + "a" * 99,
        "top/" + "/".join(["d" * 30] * 4) + "/f",  # 130 characters: USTAR prefix split
    ]
    if fmt != tarfile.USTAR_FORMAT:
        names += ["top/" + "L" * 150, "top/ünï/ファイル", "top/" + "/".join(["p" * 60] * 5)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            if i == 0:
                info.type = tarfile.DIRTYPE
                info.mode = 0o40755  # some writers keep the file type bits
                tf.addfile(info)
                continue
            data = bytes([i]) * (i * 300)
            info.size = len(data)
            info.mode = 0o640
            info.mtime = 1_700_000_000 + i
            tf.addfile(info, io.BytesIO(data))
    blob = buf.getvalue()
    entries, _ = walk(blob)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        members = tf.getmembers()
    assert [e.name for e in entries] == names
    for entry, member in zip(entries, members, strict=True):
        assert entry.offset == member.offset_data
        assert entry.size == member.size
        assert entry.mode == member.mode & 0o7777
        assert entry.mtime == int(member.mtime)
        assert entry.kind == ("dir" if member.isdir() else "file")
    assert entries[0].mode == 0o755
    assert entries == index_tar_stream(io.BytesIO(blob))


def test_pax_mtime_size_and_path_records() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("x")
        info.mtime = 1234.75  # float: tarfile writes it as a PAX record
        info.size = 3
        info.pax_headers = {"path": "renamed/by/pax", "comment": "ignored"}
        tf.addfile(info, io.BytesIO(b"abc"))
    entries, _ = walk(buf.getvalue())
    assert entries == [TocEntry("renamed/by/pax", "file", 0o644, 3, 1536, 1234)]


def test_base256_size_and_huge_pax_size() -> None:
    info = tarfile.TarInfo("huge.bin")
    info.size = 10 * GiB
    gnu = info.tobuf(tarfile.GNU_FORMAT)
    assert gnu[124] & 0x80  # base-256
    # Only the header exists here: ask for exactly one block so that the short
    # answer past the data (not the first one) marks the end of the blob.
    entries, reader = walk(gnu, known_size=False, window=512)
    assert entries == [TocEntry("huge.bin", "file", 0o644, 10 * GiB, 512, 0)]
    assert reader.requests[-1][0] == 512 + 10 * GiB  # jumped over the data, found EOF
    pax = encode_header(b"m/huge.bin", "file", 0o644, 10 * GiB)
    entries, _ = walk(pax, known_size=False, window=1536)
    assert entries == [TocEntry("m/huge.bin", "file", 0o644, 10 * GiB, 1536, 0)]
    with pytest.raises(FormatError, match="truncated"):
        walk(pax)  # with the blob size known, 10 GiB of data cannot fit


def test_parse_numeric() -> None:
    assert parse_numeric(b"0000644\0") == 0o644
    assert parse_numeric(b"  644 \0") == 0o644
    assert parse_numeric(b"\0" * 8) == 0
    assert parse_numeric(bytes([0x80]) + (10 * GiB).to_bytes(11, "big")) == 10 * GiB
    assert parse_numeric(b"\xff" * 12) == -1
    with pytest.raises(ValueError):
        parse_numeric(b"0009\0")
    with pytest.raises(ValueError):
        parse_numeric(b"\x80" + b"\xff" * 11)  # overflows int64


def test_parse_pax_records() -> None:
    data = format_pax_record("path", "ü/x".encode()) + b"13 mtime=1.5\n"
    assert parse_pax_records(data) == {"path": "ü/x".encode(), "mtime": b"1.5"}
    for bad in (b"5 a=b", b"x path=a\n", b"9 patha\n", b"3 a=\n", b"11 path=a\0\n"):
        with pytest.raises(ValueError):
            parse_pax_records(bad)


# --- what kit unpack refuses ---------------------------------------------------------


def _tar_with(info: tarfile.TarInfo, fmt: int = tarfile.PAX_FORMAT, **kw: object) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, **kw) as tf:  # type: ignore[call-overload]
        ok = tarfile.TarInfo("ok.txt")
        tf.addfile(ok, io.BytesIO(b""))
        tf.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("kind", "what"),
    [
        (tarfile.SYMTYPE, "symbolic link"),
        (tarfile.LNKTYPE, "hard link"),
        (tarfile.FIFOTYPE, "FIFO"),
        (tarfile.CHRTYPE, "character device"),
        (tarfile.BLKTYPE, "block device"),
        (tarfile.CONTTYPE, "type '7'"),
    ],
)
def test_rejected_entry_types(kind: bytes, what: str) -> None:
    info = tarfile.TarInfo("models/bad-entry")
    info.type = kind
    info.linkname = "ok.txt"
    blob = _tar_with(info)
    with pytest.raises(FormatError, match=f"models/bad-entry.*{what}"):
        walk(blob)
    with pytest.raises(FormatError, match="models/bad-entry"):
        index_tar_stream(io.BytesIO(blob))


def test_long_symlink_target_is_still_a_symlink() -> None:
    info = tarfile.TarInfo("l")
    info.type = tarfile.SYMTYPE
    info.linkname = "t" * 200  # GNU 'K' header
    with pytest.raises(FormatError, match="'l' is a symbolic link"):
        walk(_tar_with(info, tarfile.GNU_FORMAT))


def test_pax_global_header_rejected() -> None:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "g"}
    ) as tf:
        tf.addfile(tarfile.TarInfo("a"), io.BytesIO(b""))
    with pytest.raises(FormatError, match="global header"):
        walk(buf.getvalue())


def _raw(name: bytes, typeflag: bytes, size: int = 0, mode: int = 0o644) -> bytearray:
    block = bytearray(encode_header(name, "file", mode, size)[-512:])
    block[156:157] = typeflag
    block[148:156] = b"        "
    block[148:156] = b"%06o\0 " % sum(block)
    return block


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def test_v7_style_entries_and_gnu_long_name_precedence() -> None:
    long_name = b"gnu/" + b"n" * 120
    blob = b"".join(
        [
            _raw(b"olddir/", b"\0"),
            _raw(b"oldfile", b"\0", size=3),
            _pad(b"abc"),
            _raw(b"././@LongLink", b"L", size=len(long_name) + 1),
            _pad(long_name + b"\0"),
            _raw(b"PaxHeaders.0/x", b"x", size=len(format_pax_record("path", b"pax/name"))),
            _pad(format_pax_record("path", b"pax/name")),
            _raw(b"short", b"0", size=1),
            _pad(b"z"),
            bytes(1024),
        ]
    )
    entries, _ = walk(blob)
    assert entries == [
        TocEntry("olddir", "dir", 0o644, 0, 512),
        TocEntry("oldfile", "file", 0o644, 3, 1024),
        TocEntry(long_name.decode(), "file", 0o644, 1, 4096),  # GNU long name wins, as in Go
    ]


def test_names_are_cleaned_and_unsafe_names_rejected() -> None:
    blob = b"".join(
        [_raw(b"./", b"5"), _raw(b"./a//b/", b"5"), _raw(b"./a/b/c", b"0"), bytes(1024)]
    )
    entries, _ = walk(blob)
    assert [(e.name, e.kind) for e in entries] == [("a/b", "dir"), ("a/b/c", "file")]
    for bad in (b"../evil", b"a/../../evil", b"/etc/passwd"):
        with pytest.raises(FormatError, match=r"evil|passwd"):
            walk(bytes(_raw(bad, b"0")) + bytes(1024))


# --- damaged archives ----------------------------------------------------------------


def test_bad_checksum() -> None:
    block = _raw(b"a", b"0")
    block[0:1] = b"b"
    with pytest.raises(FormatError, match="checksum"):
        walk(bytes(block) + bytes(1024))


def test_zero_block_then_header() -> None:
    with pytest.raises(FormatError, match="zero block"):
        walk(bytes(512) + bytes(_raw(b"a", b"0")) + bytes(1024))


def test_end_of_archive_variants(models: list[PlannedEntry]) -> None:
    toc, blob = _layer(models)
    trimmed = blob[:-1024]
    assert walk(trimmed)[0] == list(toc.entries)  # EOF at a header boundary
    assert walk(trimmed + bytes(512))[0] == list(toc.entries)  # one zero block, then EOF
    assert walk(blob + b"garbage after the end")[0] == list(toc.entries)
    with pytest.raises(FormatError, match="truncated"):
        walk(trimmed[:-600])  # inside the last file's data
    with pytest.raises(FormatError, match="truncated"):
        walk(blob[: toc.entries[3].offset - 100])  # inside a header
    assert walk(b"")[0] == []


def test_feed_must_cover_the_next_header() -> None:
    walker = TarWalker()
    with pytest.raises(ValueError):
        walker.feed(512, b"x" * 512)


# --- sequential streams --------------------------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_index_compressed_streams(models: list[PlannedEntry], compression: str) -> None:
    toc, blob = _layer(models, compression)
    if compression == "gzip":
        stream: Readable = gzip.GzipFile(fileobj=io.BytesIO(blob))
    else:
        stream = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(blob), read_across_frames=True
        )
    assert index_tar_stream(stream) == list(toc.entries)


def test_index_truncated_stream(models: list[PlannedEntry]) -> None:
    toc, blob = _layer(models)
    with pytest.raises(FormatError, match="truncated"):
        index_tar_stream(io.BytesIO(blob[: toc.entries[-1].offset + 3]))


@pytest.mark.parametrize("window", [512, 1000, 4096, 65536])
def test_windows_that_split_headers(tmp_path: Path, window: int) -> None:
    src = tmp_path / "s.txt"
    src.write_bytes(b"q" * 700)
    entries = [PlannedEntry("d", "dir", 0o755, 0, tmp_path)] + [
        PlannedEntry(f"d/{'x' * (i % 150)}{i:04}", "file", 0o644, 700, src) for i in range(300)
    ]
    toc, blob = _layer(entries)
    assert len(blob) > 300_000
    got, reader = walk(blob, known_size=False, window=window)
    assert got == list(toc.entries)
    # Ranges continue one another: nothing is fetched twice.
    ends = [o + n for o, n in reader.requests]
    assert all(o >= e for o, e in zip([o for o, _ in reader.requests[1:]], ends, strict=False))
    assert index_tar_stream(io.BytesIO(blob), read_size=window) == list(toc.entries)
