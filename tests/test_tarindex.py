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


# --- agreement with Go's archive/tar reader ------------------------------------------
# Each case is a header that Go's Reader (and so `kit unpack`) reads differently from
# Python's int() and friends; kitfs must refuse what Go refuses and read what it reads.

_FIELDS = {
    "name": (0, 100), "mode": (100, 108), "uid": (108, 116), "gid": (116, 124),
    "size": (124, 136), "mtime": (136, 148), "magic": (257, 263), "version": (263, 265),
    "devmajor": (329, 337), "devminor": (337, 345), "prefix": (345, 500),
    "gnu_atime": (345, 357), "gnu_ctime": (357, 369),
    "star_atime": (476, 488), "star_ctime": (488, 500), "trailer": (508, 512),
}


def _hdr(name: bytes, typeflag: bytes = b"0", size: int | bytes = 0, *,
         checksum: bytes | None = None, **fields: bytes) -> bytes:
    """One USTAR header block with any field overwritten by raw bytes (NUL-padded)."""
    block = bytearray(512)
    values = {
        "name": name, "mode": b"0000644\0", "uid": b"0000000\0", "gid": b"0000000\0",
        "size": size if isinstance(size, bytes) else b"%011o\0" % size,
        "mtime": b"00000000000\0", "magic": b"ustar\0", "version": b"00", **fields,
    }
    for key, value in values.items():
        start, end = _FIELDS[key]
        assert len(value) <= end - start, key
        block[start:end] = value.ljust(end - start, b"\0")
    block[156:157] = typeflag
    block[148:156] = b"        "
    block[148:156] = checksum if checksum is not None else b"%06o\0 " % sum(block)
    return bytes(block)


def _file(name: bytes, data: bytes = b"", **fields: bytes) -> bytes:
    return _hdr(name, b"0", len(data), **fields) + _pad(data)


def _pax(*records: bytes, raw: bytes | None = None) -> bytes:
    """A PAX 'x' header holding `records` (each `key=value`, length added) or `raw` data."""
    data = raw if raw is not None else b"".join(_record(r) for r in records)
    return _hdr(b"PaxHeaders/x", b"x", len(data)) + _pad(data)


def _record(kv: bytes) -> bytes:
    key, _, value = kv.partition(b"=")
    return format_pax_record(key.decode(), value)


def _both(blob: bytes) -> list[TocEntry]:
    """Walk by range reads and as a stream; both must agree."""
    entries, _ = walk(blob)
    assert index_tar_stream(io.BytesIO(blob)) == entries
    return entries


def _refused(blob: bytes, match: str | None = None) -> None:
    with pytest.raises(FormatError, match=match):
        walk(blob)
    with pytest.raises(FormatError, match=match):
        index_tar_stream(io.BytesIO(blob))


_END = bytes(1024)


@pytest.mark.parametrize("text", [b"1_0", b" 10", b"10 ", b"\t10", b"10\n", b"0x0a",
                                  b"\xd9\xa1\xd9\xa0", b"1e1", b"10.0", b"--10", b"+-10",
                                  b"9223372036854775808", b"-1"])
def test_pax_size_is_go_parseint(text: bytes) -> None:
    """Go's strconv.ParseInt refuses what Python's int() takes ("1_0", " 10", Arabic digits)."""
    _refused(_pax(b"size=" + text) + _file(b"m/f", b"0123456789") + _END)


@pytest.mark.parametrize(("text", "size"), [(b"+10", 10), (b"0010", 10), (b"", 3)])
def test_pax_size_go_accepts(text: bytes, size: int) -> None:
    """A sign and leading zeros parse; an empty value keeps the header's own size."""
    data = b"0123456789"[:size]
    blob = _pax(b"size=" + text) + _hdr(b"m/f", b"0", 3) + _pad(data) + _END
    assert _both(blob) == [TocEntry("m/f", "file", 0o644, size, 1536)]


def test_pax_record_length_is_go_parseint() -> None:
    assert parse_pax_records(b"+14 mtime=1.5\n") == {"mtime": b"1.5"}  # Go takes a sign
    assert parse_pax_records(b"014 mtime=1.5\n") == {"mtime": b"1.5"}
    for bad in (b"1_4 mtime=1.5\n", b"\t15 mtime=1.5\n", b"14\t mtime=1.5\n",
                b"6 =ab\n",  # empty key (validPAXRecord)
                b"99999999999999999999 a=b\n"):
        with pytest.raises(ValueError):
            parse_pax_records(bad)
        _refused(_pax(raw=bad) + _file(b"m/f") + _END, "PAX")


@pytest.mark.parametrize(("text", "mtime"), [
    (b"1700000000", 1700000000), (b"+5.5", 5), (b"5.", 5), (b"-1.5", -2), (b"-0.5", -1),
    (b"-1.0000000001", -1),  # Go reads only nine fractional digits
    (b"-1.000000000", -1), (b"1.1234567890123", 1), (b"", 0),
])
def test_pax_mtime_is_go_parsepaxtime(text: bytes, mtime: int) -> None:
    blob = _pax(b"mtime=" + text) + _file(b"f") + _END
    assert _both(blob) == [TocEntry("f", "file", 0o644, 0, 1536, mtime)]


@pytest.mark.parametrize("text", [b"1_0", b" 1", b"1 ", b".5", b"1.5x", b"1.-5", b"1.+5",
                                  b"1.1234567890x", b"1.5.5", b"x", b"-", b"9223372036854775808"])
def test_pax_times_go_refuses(text: bytes) -> None:
    for key in (b"mtime", b"atime", b"ctime"):
        _refused(_pax(key + b"=" + text) + _file(b"f") + _END, "PAX record")


def test_pax_uid_gid_are_parsed_like_go() -> None:
    """mergePAX parses uid and gid: a bad one is ErrHeader, so kit unpack fails."""
    for key in (b"uid", b"gid"):
        for bad in (b"1_0", b" 1", b"x", b"99999999999999999999"):
            _refused(_pax(key + b"=" + bad) + _file(b"f") + _END, "PAX record")
        assert _both(_pax(key + b"=-7", key + b"=") + _file(b"f") + _END)[0].name == "f"


def test_empty_pax_path_and_gnu_long_name_keep_the_header_name() -> None:
    empty_long = _hdr(b"././@LongLink", b"L", 1) + _pad(b"\0")
    blob = _pax(b"path=") + _file(b"hdr/name") + empty_long + _file(b"other") + _END
    assert [e.name for e in _both(blob)] == ["hdr/name", "other"]


@pytest.mark.parametrize(("field", "value"), [
    ("mode", b"0o644"), ("mode", b"+644"), ("mode", b"6_44"), ("mode", b"\t644"),
    ("uid", b"1_0"), ("uid", b"zz"), ("gid", b"0o7"), ("gid", b"-1"),
    ("mtime", b"1_000"), ("devmajor", b"0o1"), ("devminor", b"9"),
])
def test_numeric_fields_go_parses_must_be_octal(field: str, value: bytes) -> None:
    """parseOctal is strconv.ParseUint(s, 8, 64): digits 0-7 after trimming, nothing else."""
    _refused(_file(b"f", **{field: value}) + _END, f"bad {field} field")


def test_octal_trimming_like_go() -> None:
    """Spaces and NULs are trimmed at both ends; the number ends at a NUL."""
    blob = _file(b"f", mode=b" 0640 \0", uid=b"\0\0 12 ", gid=b"7\0junk") + _END
    assert _both(blob)[0].mode == 0o640
    assert parse_numeric(b"\0 755\0x") == 0o755


def test_device_numbers_are_not_parsed_in_v7_headers() -> None:
    """Go reads devmajor/devminor only beyond V7 (no magic): there they are ignored."""
    blob = _file(b"f", magic=b"", version=b"", devmajor=b"junk") + _END
    assert [e.name for e in _both(blob)] == ["f"]


def test_checksum_field_is_strict_octal_and_signed_sums_count() -> None:
    block = bytearray(_hdr(b"f"))
    good = int(bytes(block[148:154]), 8)
    block[148:156] = b"%d_%05o\0" % (good >> 15, good & 0o77777)  # Python int(.., 8) took this
    _refused(bytes(block) + _END, "checksum")
    # Sun tar's signed sum: name bytes >= 0x80 count negative.
    raw = bytearray(_hdr(b"\xe9t\xe9"))
    raw[148:156] = b"        "
    signed = sum(c - 256 if c >= 0x80 else c for c in raw)
    raw[148:156] = b"%06o\0 " % signed
    assert [e.name for e in _both(bytes(raw) + _END)] == ["\udce9t\udce9"]


def test_star_header_times_are_parsed_and_prefix_is_shorter() -> None:
    star = {"trailer": b"tar\0", "prefix": b"pre"}
    blob = _file(b"f", **star) + _END
    assert [e.name for e in _both(blob)] == ["pre/f"]
    _refused(_file(b"f", **star, star_atime=b"1_0") + _END, "bad atime field")
    _refused(_file(b"f", **star, star_ctime=b"x") + _END, "bad ctime field")


def test_gnu_header_with_unparsable_times_reads_them_as_a_prefix() -> None:
    """Go's fallback for tars that Go before 1.8 wrote (golang.org/issue/21005)."""
    gnu = {"magic": b"ustar ", "version": b" \0"}
    blob = _file(b"f", **gnu, gnu_atime=b"01234567") + _END
    assert [e.name for e in _both(blob)] == ["f"]  # times parse: no prefix
    blob = _file(b"f", **gnu, prefix=b"models/dir") + _END
    assert [e.name for e in _both(blob)] == ["models/dir/f"]
    blob = _file(b"f", **gnu, prefix=b"\xffmodels") + _END  # not ASCII: no prefix
    assert [e.name for e in _both(blob)] == ["f"]
    blob = _file(b"f", **gnu, gnu_atime=b"\0models") + _END  # a NUL first: not parsed
    assert [e.name for e in _both(blob)] == ["f"]


def test_negative_sizes_like_go() -> None:
    """Go refuses a negative size only where the entry has data (handleRegularFile)."""
    minus_one = b"\xff" * 12
    blob = _hdr(b"d", b"5", minus_one) + _pax(b"size=-5") + _hdr(b"e", b"5") + _END
    assert _both(blob) == [
        TocEntry("d", "dir", 0o644, 0, 512), TocEntry("e", "dir", 0o644, 0, 2048)]
    _refused(_hdr(b"f", b"0", minus_one) + _END, "negative size")
    _refused(_hdr(b"old/", b"\0", minus_one) + _END, "negative size")  # typeflag 0 has data
    _refused(_pax(b"size=-1") + _file(b"f") + _END, "negative size")
    _refused(_hdr(b"PaxHeaders/x", b"x", minus_one) + _END, "negative size")


def test_gnu_sparse_records_like_go() -> None:
    """Only what Go reads as a sparse file is one; stray GNU.sparse.* keys are ignored."""
    for records in ([b"GNU.sparse.major=1", b"GNU.sparse.minor=0"],
                    [b"GNU.sparse.major=0", b"GNU.sparse.minor=1", b"GNU.sparse.map=0,1"],
                    [b"GNU.sparse.map=0,1", b"GNU.sparse.numblocks=1"],
                    [b"GNU.sparse.offset=0", b"GNU.sparse.numbytes=1"]):
        _refused(_pax(*records) + _file(b"f", b"x") + _END, "sparse file")
    for records in ([b"GNU.sparse.major=2", b"GNU.sparse.minor=0", b"GNU.sparse.map=0,1"],
                    [b"GNU.sparse.realsize=9"], [b"GNU.sparse.map="], [b"GNU.sparse.x=1"]):
        assert _both(_pax(*records) + _file(b"f", b"x") + _END) == [
            TocEntry("f", "file", 0o644, 1, 1536)]
    # parsePAX: 0.0 records alternate, offset first, without commas.
    for records in ([b"GNU.sparse.numbytes=1"], [b"GNU.sparse.offset=0,1"],
                    [b"GNU.sparse.offset=0", b"GNU.sparse.offset=1"]):
        _refused(_pax(*records) + _file(b"f", b"x") + _END, "PAX header")


@pytest.mark.parametrize("name", [b"f/", b"d/f/", b".", b"./", b"d/.", b"d/..", b"d//"])
def test_regular_file_named_like_a_directory(name: bytes) -> None:
    """kit unpack opens the raw name with O_CREAT: a trailing '/', '.' or '..' fails."""
    _refused(_hdr(b"d", b"5") + _file(name, b"x") + _END, "named like a directory")
    _refused(_hdr(b"d", b"5") + _pax(b"path=" + name) + _file(b"ok", b"x") + _END,
             "named like a directory")


def test_archive_may_end_inside_padding_or_after_an_extended_header() -> None:
    """Go's Reader: EOF after an entry's data (in its padding, or at a header) ends the tar."""
    base = _hdr(b"d", b"5") + _file(b"d/f", b"abc")
    want = [TocEntry("d", "dir", 0o644, 0, 512), TocEntry("d/f", "file", 0o644, 3, 1024)]
    for cut in (1024 + 3, 1024 + 4, 1024 + 511):
        assert _both(base[:cut]) == want
        walker = TarWalker(cut)
        while (req := walker.next_request()) is not None:
            walker.feed(req[0], base[req[0] : req[0] + req[1]])
        assert walker.archive_end == cut
    _refused(base[: 1024 + 2], "truncated")  # inside the data
    pax = _pax(b"path=x")
    assert _both(base + pax) == want  # a dangling extended header
    assert _both(base + pax[:512 + len(_record(b"path=x")) + 7]) == want  # in its padding
    _refused(base + pax[:512 + 3], "truncated")  # inside its records
    _refused(base + pax[:512 + 3] + bytes(1024))  # padding with zeros is not records
    assert _both(base + _hdr(b"././@LongLink", b"L", 5) + _pad(b"long\0")) == want
