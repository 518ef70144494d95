"""Build a layer's table of contents from its tar headers, without reading file data.

`TarWalker` is a push parser for random-access sources (an uncompressed
layer blob in a registry): it says which byte range it needs next, is fed
those bytes, and jumps over file data. `index_tar_stream` drives it over a
sequential stream (a decompressed gzip/zstd layer), where data must be read
through anyway.

A mount must show exactly what `kit unpack` writes, and `kit unpack` reads
layers with Go's `archive/tar.Reader` (Go 1.22: `reader.go`, `strconv.go`,
`format.go`), so this parser accepts what that reader accepts and reads each
field as it does. Where Go's `Next()` fails, this raises `FormatError`:

- A header block is V7, USTAR/PAX (magic `ustar\\0`; prefix + name), STAR
  (`ustar\\0` and trailer `tar\\0`; shorter prefix) or GNU (`ustar ` + ` \\0`;
  no prefix, unless its atime/ctime fields do not parse: Go then reads them as
  a USTAR prefix, for tars that Go before 1.8 wrote). Its checksum is the
  unsigned or the signed byte sum. Every number Go parses must parse: mode,
  uid, gid, size, mtime; devmajor/devminor beyond V7; atime/ctime for STAR.
- Numbers are base-256 (high bit set; int64) or octal: spaces and NULs trimmed
  at both ends, up to the first NUL, then digits 0-7 only (Go's
  `strconv.ParseUint(s, 8, 64)`: no sign, `_`, `0o` or whitespace, which
  Python's `int()` would take).
- PAX `x` records (`"%d key=value\\n"`; a later `x` header replaces an earlier
  one) follow `parsePAXRecord`/`validPAXRecord`: the length and the integer
  records (`size`, `uid`, `gid`) are `strconv.ParseInt(s, 10, 64)` (an optional
  sign, ASCII digits, int64 range); times (`mtime`, `atime`, `ctime`) are
  `parsePAXTime`; a record with an empty value leaves the header's own field.
  GNU `L` long names win over PAX `path` (an empty one is ignored, as in Go).
- A negative size is refused unless the entry has no data (a directory);
  directories have no data whatever their size says. Old `\\0` entries whose
  name ends in `/` are directories.
- The archive ends at two zero blocks, at one zero block then EOF, or at EOF
  anywhere after an entry's data (at a header boundary or inside padding);
  an extended header the archive ends after is ignored, as Go does.

What `kit unpack` refuses (`pkg/cmd/unpack/unpack.go: extractTar` accepts only
`TypeDir` and `TypeReg`) raises `FormatError` naming the entry: links,
devices, FIFOs, PAX global headers, sparse files (old GNU `S`, and PAX
`GNU.sparse.*` where Go reads the entry as sparse); so do names that leave the
layer (absolute, or with a `..` component) and regular files named like
directories (a trailing `/`, a last component `.` or `..`: `kit unpack` cannot
create them).

Entry names are cleaned (no leading `./`, no trailing `/`); the archive's
root entry (`.` or `./`) is left out. `TocEntry.offset` is where the entry's
data starts in the uncompressed stream (just after its header, also for
directories), `mode` the permission bits (`& 0o7777`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from kitfs.errors import FormatError
from kitfs.modelkit.kitignore import go_clean
from kitfs.modelkit.toc import TocEntry

BLOCK_SIZE = 512
DEFAULT_WINDOW = 64 * 1024
MAX_SPECIAL_FILE_SIZE = 1 << 20  # Go's maxSpecialFileSize for PAX / GNU long-name data

_ZERO_BLOCK = bytes(BLOCK_SIZE)
_MAGIC_USTAR = b"ustar\x00"
_MAGIC_GNU = b"ustar "
_VERSION_GNU = b" \x00"
_TRAILER_STAR = b"tar\x00"
_INT64 = 1 << 63
_DECIMAL = re.compile(rb"[+-]?[0-9]+")

_REJECTED_TYPES = {
    ord("1"): "hard link",
    ord("2"): "symbolic link",
    ord("3"): "character device",
    ord("4"): "block device",
    ord("6"): "FIFO",
    ord("S"): "GNU sparse file",
}
#: Go's isHeaderOnlyType: entries without a data section (their size is not checked).
_HEADER_ONLY = frozenset(b"123456")
_REG, _DIR = ord("0"), ord("5")

#: Go's GNU sparse PAX keys that parsePAX folds into `GNU.sparse.map` (format 0.0).
_SPARSE_OFFSET = "GNU.sparse.offset"
_SPARSE_NUMBYTES = "GNU.sparse.numbytes"
_SPARSE_MAP = "GNU.sparse.map"


def _padded(n: int) -> int:
    return n + (-n % BLOCK_SIZE)


def _wrap64(x: int) -> int:
    """x as Go's int64 arithmetic leaves it (two's complement wrap-around)."""
    return (x + _INT64) % (2 * _INT64) - _INT64


# -- Go's archive/tar/strconv.go -----------------------------------------------------------


def _parse_string(b: bytes) -> bytes:
    """Go's parser.parseString: up to the first NUL."""
    i = b.find(b"\x00")
    return b if i < 0 else b[:i]


def _parse_octal(b: bytes) -> int:
    """Go's parser.parseOctal: trim spaces and NULs, cut at a NUL, `strconv.ParseUint(s, 8, 64)`."""
    b = _parse_string(b.strip(b" \x00"))
    if not b:
        return 0
    if b.translate(None, b"01234567"):
        raise ValueError(f"bad octal field {b!r}")
    x = int(b, 8)
    if x >> 64:
        raise ValueError(f"octal field {b!r} overflows uint64")
    return _wrap64(x)  # Go's int64(x)


def parse_numeric(b: bytes) -> int:
    """Go's parser.parseNumeric: base-256 (GNU, high bit set) or octal."""
    if b and b[0] & 0x80:
        inv = 0xFF if b[0] & 0x40 else 0x00
        x = 0
        for i, c in enumerate(b):
            c ^= inv
            if i == 0:
                c &= 0x7F
            if x >> 56:
                raise ValueError("base-256 field overflows int64")
            x = x << 8 | c
        if x >> 63:
            raise ValueError("base-256 field overflows int64")
        return ~x if inv else x
    return _parse_octal(b)


def parse_decimal(b: bytes) -> int:
    """Go's `strconv.ParseInt(s, 10, 64)`: an optional sign, ASCII digits, int64 range.

    Python's `int()` also takes `_` between digits, surrounding whitespace and
    non-ASCII digits; Go refuses them, so this does too.
    """
    if _DECIMAL.fullmatch(b) is None:
        raise ValueError(f"bad decimal number {b!r}")
    n = int(b)
    if not -_INT64 <= n < _INT64:
        raise ValueError(f"decimal number {b!r} overflows int64")
    return n


def parse_pax_time(value: bytes) -> int:
    """Seconds of a PAX time, as Go's parsePAXTime and then `Time.Unix()` give them.

    `secs[.frac]`: `secs` by `strconv.ParseInt`; `frac` ASCII digits only, of
    which the first nine are nanoseconds, negated when `secs` starts with `-`
    (so `-1.5` is 1.5 s before the epoch: -2 whole seconds, as time.Unix
    normalizes it).
    """
    ss, _, sn = value.partition(b".")
    secs = parse_decimal(ss)
    if not sn:
        return secs
    if sn.translate(None, b"0123456789"):
        raise ValueError(f"bad PAX time {value!r}")
    nsecs = int(sn[:9].ljust(9, b"0"))
    if ss.startswith(b"-") and nsecs:
        return _wrap64(secs - 1)
    return secs


def _valid_pax_record(key: bytes, value: bytes) -> bool:
    """Go's validPAXRecord."""
    if not key or b"=" in key:
        return False
    if key in (b"path", b"linkpath", b"uname", b"gname"):
        return b"\x00" not in value
    return b"\x00" not in key


def parse_pax_records(data: bytes) -> dict[str, bytes]:
    """Go's parsePAX: `"%d key=value\\n"` records; later keys win.

    GNU sparse 0.0 records (`GNU.sparse.offset`, `GNU.sparse.numbytes`) must
    alternate, offset first, without commas; they are joined into
    `GNU.sparse.map` as Go does.
    """
    records: dict[str, bytes] = {}
    sparse_map: list[bytes] = []
    rest = data
    while rest:
        sp = rest.find(b" ")
        if sp < 0:
            raise ValueError("PAX record without length")
        n = parse_decimal(rest[:sp])  # raises ValueError on a bad length
        if n < 5 or n > len(rest) or n <= sp + 1:
            raise ValueError("bad PAX record length")
        rec, nl, rest = rest[sp + 1 : n - 1], rest[n - 1 : n], rest[n:]
        if nl != b"\n":
            raise ValueError("PAX record does not end in newline")
        key_b, eq, value = rec.partition(b"=")
        if not eq:
            raise ValueError("PAX record without '='")
        if not _valid_pax_record(key_b, value):
            raise ValueError("invalid PAX record (empty key, or a NUL)")
        key = key_b.decode("utf-8", "surrogateescape")
        if key in (_SPARSE_OFFSET, _SPARSE_NUMBYTES):
            expected = _SPARSE_OFFSET if len(sparse_map) % 2 == 0 else _SPARSE_NUMBYTES
            if key != expected or b"," in value:
                raise ValueError("GNU sparse 0.0 records out of order")
            sparse_map.append(value)
        else:
            records[key] = value
    if sparse_map:
        records[_SPARSE_MAP] = b",".join(sparse_map)
    return records


def _is_gnu_sparse(pax: dict[str, bytes]) -> bool:
    """Go's readGNUSparsePAXHeaders: whether the records make the entry a sparse file.

    Other `GNU.sparse.*` records (an unknown version, a stray key) leave a
    regular file, which Go reads as one.
    """
    major, minor = pax.get("GNU.sparse.major", b""), pax.get("GNU.sparse.minor", b"")
    if (major, minor) in ((b"0", b"0"), (b"0", b"1"), (b"1", b"0")):
        return True
    if major or minor:
        return False
    return bool(pax.get(_SPARSE_MAP))


@dataclass(frozen=True)
class _PaxFields:
    """The records Go's mergePAX applies to a header; None keeps the header's own field."""

    path: bytes | None
    size: int | None
    mtime: int | None


def _merge_pax(pax: dict[str, bytes]) -> _PaxFields:
    """Go's mergePAX: empty values are skipped; every number it parses must parse."""
    for key in ("uid", "gid"):
        if pax.get(key):
            parse_decimal(pax[key])
    for key in ("atime", "ctime"):
        if pax.get(key):
            parse_pax_time(pax[key])
    return _PaxFields(
        path=pax.get("path") or None,
        size=parse_decimal(pax["size"]) if pax.get("size") else None,
        mtime=parse_pax_time(pax["mtime"]) if pax.get("mtime") else None,
    )


# -- Go's archive/tar/format.go and Reader.readHeader --------------------------------------


def _checksum_ok(block: bytes) -> bool:
    try:
        value = _parse_octal(block[148:156])
    except ValueError:
        return False
    rest = block[:148] + b"        " + block[156:]
    unsigned = sum(rest)
    signed = unsigned - 256 * sum(1 for c in rest if c >= 0x80)
    return value in (unsigned, signed)


def _block_format(block: bytes) -> str:
    """Go's block.getFormat, given a good checksum: "v7", "ustar" (or PAX), "star" or "gnu"."""
    magic, version = block[257:263], block[263:265]
    if magic == _MAGIC_USTAR:
        return "star" if block[508:512] == _TRAILER_STAR else "ustar"
    if magic == _MAGIC_GNU and version == _VERSION_GNU:
        return "gnu"
    return "v7"


@dataclass(frozen=True)
class _Header:
    """The fields of one header block that the walk uses."""

    name: bytes
    typeflag: int
    size: int
    mode: int
    mtime: int


def _field(block: bytes, what: str, start: int, end: int) -> int:
    try:
        return parse_numeric(block[start:end])
    except ValueError as exc:
        raise ValueError(f"bad {what} field: {exc}") from None


def _gnu_times_parse(block: bytes) -> bool:
    """Whether a GNU header's atime and ctime parse (Go skips a field starting with NUL)."""
    for start in (345, 357):
        field = block[start : start + 12]
        if field[0]:
            try:
                parse_numeric(field)
            except ValueError:
                return False
    return True


def _read_block(block: bytes) -> _Header:
    """Go's Reader.readHeader on a non-zero block; ValueError where Go returns ErrHeader."""
    if not _checksum_ok(block):
        raise ValueError("bad checksum")
    fmt = _block_format(block)
    name = _parse_string(block[0:100])
    size = _field(block, "size", 124, 136)
    mode = _field(block, "mode", 100, 108)
    _field(block, "uid", 108, 116)
    _field(block, "gid", 116, 124)
    mtime = _field(block, "mtime", 136, 148)
    if fmt != "v7":
        _field(block, "devmajor", 329, 337)
        _field(block, "devminor", 337, 345)
        prefix = b""
        if fmt == "ustar":
            prefix = _parse_string(block[345:500])
        elif fmt == "star":
            prefix = _parse_string(block[345:476])
            _field(block, "atime", 476, 488)
            _field(block, "ctime", 488, 500)
        elif not _gnu_times_parse(block):
            # Go reads a GNU header whose times do not parse as one that Go before
            # 1.8 wrote with a USTAR prefix there (golang.org/issue/21005).
            candidate = _parse_string(block[345:500])
            if all(c < 0x80 for c in candidate):
                prefix = candidate
        if prefix:
            name = prefix + b"/" + name
    return _Header(name, block[156], size, mode, mtime)


def _display(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")


class TarWalker:
    """Incremental tar header parser driven by range reads.

    Loop: `req = walker.next_request()`; stop at None; else fetch
    `length` bytes at `offset` (fewer only at the end of the blob) and
    `walker.feed(offset, data)`. The result is `walker.entries`.

    `size` is the blob's size when known: requests never go past it and a
    file running past it is an error. Without it, a feed shorter than the
    request marks the end of the blob. `window` is how much to ask for while
    entries are small (to read a run of small files' headers at once);
    after a large file only `min_request` bytes (a header) are asked for.
    """

    def __init__(
        self,
        size: int | None = None,
        *,
        window: int = DEFAULT_WINDOW,
        min_request: int = BLOCK_SIZE,
    ) -> None:
        if window < BLOCK_SIZE or min_request < BLOCK_SIZE:
            raise ValueError("window and min_request must be at least one block")
        self.entries: list[TocEntry] = []
        self.done = False
        self.archive_end: int | None = None  # offset just past the end-of-archive marker
        self._eof = size
        self._window = window
        self._min_request = min_request
        self._pos = 0  # offset of the next header block
        self._data_end = 0  # where the last header's data ends (its padding may be cut off)
        self._buf = memoryview(b"")  # bytes known from _pos on
        self._need = BLOCK_SIZE  # bytes needed from _pos to make progress
        self._small = True
        self._requested: tuple[int, int] | None = None
        self._pax: dict[str, bytes] = {}
        self._gnu_name = b""

    def next_request(self) -> tuple[int, int] | None:
        """The next (offset, length) to fetch, or None when the walk is over.

        The range starts where the bytes fed so far end (or at the next header,
        when file data is being jumped over).
        """
        if self.done:
            return None
        start = self._pos + len(self._buf)
        missing = max(self._need - len(self._buf), 0)
        length = max(missing, self._window if self._small else self._min_request)
        if self._eof is not None:
            length = max(0, min(length, self._eof - start))
        self._requested = (start, length)
        return self._requested

    def feed(self, offset: int, data: bytes) -> None:
        """Give the walker bytes at `offset`.

        They must cover the next header's offset, or continue the bytes fed
        before (as `next_request` asks). Fewer bytes than requested mean the
        blob ends there.
        """
        if self.done:
            return
        if self._requested is not None and self._requested[0] == offset:
            if len(data) < self._requested[1]:
                self._ended_at(offset + len(data), parse=False)
            self._requested = None
        end = self._pos + len(self._buf)
        if self._pos < offset <= end:
            if offset + len(data) > end:
                self._buf = memoryview(bytes(self._buf[: offset - self._pos]) + data)
        elif offset <= self._pos <= offset + len(data):
            fresh = memoryview(data)[self._pos - offset :]
            if len(fresh) > len(self._buf):
                self._buf = fresh
        else:
            raise ValueError(
                f"fed bytes {offset}..{offset + len(data)} miss the next header at {self._pos}"
            )
        self._parse()

    # -- parsing -------------------------------------------------------------------------

    def _ended_at(self, at: int, *, parse: bool = True) -> None:
        """The blob (or stream) is known to end at `at`."""
        self._eof = at if self._eof is None else min(self._eof, at)
        if parse and not self.done:
            self._parse()

    def _end(self, at: int) -> None:
        self.done = True
        self.archive_end = at
        self._buf = memoryview(b"")

    def _at_eof(self, n: int) -> bool:
        """True when the blob is known to end before _pos + n."""
        return self._eof is not None and self._pos + n > self._eof

    def _advance(self, n: int) -> None:
        self._pos += n
        self._buf = self._buf[n:]
        self._need = BLOCK_SIZE

    def _parse(self) -> None:
        while not self.done:
            if self._eof is not None and self._pos >= self._eof:
                # Go's Reader: EOF before a header, or inside the padding after the
                # last data, is the end of the archive; inside data it is not.
                if self._eof < self._data_end:
                    raise FormatError(f"tar stream truncated: data runs past the end ({self._eof})")
                self._end(self._eof)
                return
            if len(self._buf) < BLOCK_SIZE:
                if self._at_eof(BLOCK_SIZE):
                    raise FormatError(f"tar stream truncated inside a header at {self._pos}")
                self._need = BLOCK_SIZE
                return
            block = bytes(self._buf[:BLOCK_SIZE])
            if block == _ZERO_BLOCK:
                if len(self._buf) < 2 * BLOCK_SIZE:
                    if self._eof is not None and self._pos + BLOCK_SIZE == self._eof:
                        self._end(self._eof)
                        return
                    if self._at_eof(2 * BLOCK_SIZE):
                        raise FormatError(f"tar stream truncated at {self._pos}")
                    self._need = 2 * BLOCK_SIZE
                    return
                if bytes(self._buf[BLOCK_SIZE : 2 * BLOCK_SIZE]) != _ZERO_BLOCK:
                    raise FormatError(f"zero block followed by a header at {self._pos}")
                self._end(self._pos + 2 * BLOCK_SIZE)
                return
            if not self._parse_header(block):
                return

    def _parse_header(self, block: bytes) -> bool:
        """Handle the header at _pos; False when more bytes are needed."""
        pos = self._pos
        try:
            hdr = _read_block(block)
        except ValueError as exc:
            shown = _display(_parse_string(block[0:100]))
            raise FormatError(f"invalid tar header {shown!r} at offset {pos}: {exc}") from None
        name, typeflag, size = hdr.name, hdr.typeflag, hdr.size
        if size < 0 and typeflag not in _HEADER_ONLY:  # Go's handleRegularFile
            raise FormatError(f"tar entry {_display(name)!r} has negative size")

        if typeflag in (ord("x"), ord("g"), ord("L"), ord("K")):
            if typeflag == ord("g"):
                raise FormatError(
                    f"tar entry {_display(name)!r} is a PAX global header, which kit unpack rejects"
                )
            if size > MAX_SPECIAL_FILE_SIZE:
                raise FormatError(f"tar extended header {_display(name)!r} has bad size {size}")
            total = BLOCK_SIZE + _padded(size)
            if self._at_eof(BLOCK_SIZE + size):
                raise FormatError(f"tar stream truncated inside {_display(name)!r}")
            have = total if self._eof is None else min(total, self._eof - pos)
            if len(self._buf) < have:
                self._need = total + BLOCK_SIZE  # and the header it applies to
                return False
            data = bytes(self._buf[BLOCK_SIZE : BLOCK_SIZE + size])
            if typeflag == ord("x"):
                try:
                    self._pax = parse_pax_records(data)
                except ValueError as exc:
                    raise FormatError(f"bad PAX header {_display(name)!r}: {exc}") from None
            elif typeflag == ord("L"):
                self._gnu_name = _parse_string(data)
            self._data_end = pos + BLOCK_SIZE + size
            self._advance(total)
            return True

        pax, self._pax = self._pax, {}
        gnu_name, self._gnu_name = self._gnu_name, b""
        try:
            fields = _merge_pax(pax)
        except ValueError as exc:
            raise FormatError(f"bad PAX record for {_display(name)!r}: {exc}") from None
        name = fields.path if fields.path is not None else name
        size = fields.size if fields.size is not None else size
        mtime = fields.mtime if fields.mtime is not None else hdr.mtime
        if gnu_name:  # Go ignores an empty GNU long name
            name = gnu_name
        shown = _display(name)
        if typeflag == 0:
            typeflag = _DIR if name.endswith(b"/") else _REG
        if size < 0 and typeflag not in _HEADER_ONLY:
            raise FormatError(f"tar entry {shown!r} has negative size")
        if typeflag in _REJECTED_TYPES:
            what = _REJECTED_TYPES[typeflag]
            raise FormatError(f"tar entry {shown!r} is a {what}, which kit unpack rejects")
        if _is_gnu_sparse(pax):
            raise FormatError(f"tar entry {shown!r} is a sparse file, which kit unpack rejects")
        if typeflag not in (_REG, _DIR):
            raise FormatError(
                f"tar entry {shown!r} has type {chr(typeflag)!r}, which kit unpack rejects"
            )
        is_dir = typeflag == _DIR
        data_len = 0 if is_dir else size
        data_offset = pos + BLOCK_SIZE
        if self._eof is not None and data_offset + data_len > self._eof:
            raise FormatError(f"tar stream truncated inside {shown!r}")
        clean = _clean_name(name)
        if not is_dir and name.rsplit(b"/", 1)[-1] in (b"", b".", b".."):
            raise FormatError(
                f"tar entry {shown!r} is a regular file named like a directory, "
                "which kit unpack cannot create"
            )
        if clean is not None:
            self.entries.append(
                TocEntry(
                    clean,
                    "dir" if is_dir else "file",
                    hdr.mode & 0o7777,
                    data_len,
                    data_offset,
                    mtime,
                )
            )
        skip = BLOCK_SIZE + _padded(data_len)
        self._small = skip <= self._window
        self._data_end = data_offset + data_len
        self._advance(skip)
        return True



def _clean_name(raw: bytes) -> str | None:
    """The entry name as the table of contents keeps it; None for the archive root."""
    name = raw.decode("utf-8", "surrogateescape")
    if name == "" or name.startswith("/"):
        raise FormatError(f"tar entry {_display(raw)!r} has an absolute or empty name")
    clean = go_clean(name)
    if clean == ".":
        return None
    if clean == ".." or clean.startswith("../"):
        raise FormatError(f"tar entry {_display(raw)!r} points outside the layer")
    return clean


class SequentialWalk:
    """Walk the tar headers of a stream that goes by in order, holding only a header's bytes.

    For streams read through anyway (a gzip/zstd layer decompressing, a layer
    being hashed end to end): the walker's requests are served from the
    pieces as they pass, file data is skipped without being copied, and the
    walk sees exactly the bytes that were hashed. `feed` pieces in order,
    then `finish()` at the end of the stream; the result is `entries`.
    """

    def __init__(self, size: int | None = None) -> None:
        self.walker = TarWalker(size)
        self._at = 0  # stream offset of the next byte fed
        self._want: tuple[int, int] | None = None
        self._held = bytearray()  # bytes of the wanted range gathered so far

    @property
    def entries(self) -> list[TocEntry]:
        return self.walker.entries

    @property
    def done(self) -> bool:
        return self.walker.done

    def feed(self, piece: bytes | bytearray | memoryview) -> None:
        view = memoryview(piece).cast("B") if not isinstance(piece, bytes) else memoryview(piece)
        at = self._at
        self._at += len(view)
        while view and not self.walker.done:
            if self._want is None:
                self._want = self.walker.next_request()
                if self._want is None:
                    return
            offset, length = self._want
            if length == 0:  # the walker is told where the stream ends by a short feed
                self._give(offset)
                continue
            need = offset + len(self._held)  # the next stream byte the walker wants
            if at + len(view) <= need:
                return  # file data the walk jumps over
            if at < need:
                view, at = view[need - at :], need
            elif at > need:
                raise ValueError(f"stream skipped bytes {need}..{at}")
            take = min(len(view), length - len(self._held))
            self._held += view[:take]
            view, at = view[take:], at + take
            if len(self._held) == length:
                self._give(offset)

    def finish(self) -> None:
        """The stream ended: a walk still wanting bytes ends there (a short archive raises)."""
        while not self.walker.done:
            if self._want is None:
                self._want = self.walker.next_request()
                if self._want is None:
                    return
            offset = self._want[0]
            if self._at < offset:  # ended before the next header: inside data or padding
                self.walker._ended_at(self._at)
                if not self.walker.done:
                    raise FormatError(
                        f"tar stream truncated: ends at {self._at}, before offset {offset}")
                return
            self._give(offset)

    def _give(self, offset: int) -> None:
        data, self._held, self._want = bytes(self._held), bytearray(), None
        self.walker.feed(offset, data)


class Readable(Protocol):
    """Anything with a file-like `read`: a file, `gzip.GzipFile`, a zstd stream reader."""

    def read(self, size: int = -1, /) -> bytes: ...


def index_tar_stream(fileobj: Readable, *, read_size: int = 1 << 20) -> list[TocEntry]:
    """Index a tar read sequentially (e.g. from a gzip or zstd decompressor)."""
    walk = SequentialWalk()
    while not walk.done and (piece := fileobj.read(read_size)):
        walk.feed(piece)
    walk.finish()
    return walk.entries
