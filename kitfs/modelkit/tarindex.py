"""Build a layer's table of contents from its tar headers, without reading file data.

`TarWalker` is a push parser for random-access sources (an uncompressed
layer blob in a registry): it says which byte range it needs next, is fed
those bytes, and jumps over file data. `index_tar_stream` drives it over a
sequential stream (a decompressed gzip/zstd layer), where data must be read
through anyway.

Parsing follows Go's `archive/tar.Reader`, which `kit unpack` uses:
USTAR (prefix + name), PAX `x` records (`path`, `size`, `mtime`, `linkpath`;
a later `x` header replaces an earlier one), GNU `L`/`K` long names (which
win over PAX `path`), base-256 numbers, old-style `\\0` entries whose name
ends in `/` as directories, and the end of the archive at two zero blocks
(one zero block then EOF, or EOF at a header boundary, also end it). What
`kit unpack` refuses (`pkg/cmd/unpack/unpack.go: extractTar` accepts only
`TypeDir` and `TypeReg`) raises `FormatError` naming the entry: links,
devices, FIFOs, PAX global headers, sparse files; so do names that leave
the layer (absolute, or with a `..` component).

Entry names are cleaned (no leading `./`, no trailing `/`); the archive's
root entry (`.` or `./`) is left out. `TocEntry.offset` is where the entry's
data starts in the uncompressed stream (just after its header, also for
directories), `mode` the permission bits (`& 0o7777`).
"""

from __future__ import annotations

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

_REJECTED_TYPES = {
    ord("1"): "hard link",
    ord("2"): "symbolic link",
    ord("3"): "character device",
    ord("4"): "block device",
    ord("6"): "FIFO",
    ord("S"): "GNU sparse file",
}


def _padded(n: int) -> int:
    return n + (-n % BLOCK_SIZE)


def _parse_string(b: bytes) -> bytes:
    """Go's parser.parseString: up to the first NUL."""
    i = b.find(b"\x00")
    return b if i < 0 else b[:i]


def _parse_octal(b: bytes) -> int:
    b = _parse_string(b.strip(b" \x00"))
    if not b:
        return 0
    try:
        return int(b, 8)
    except ValueError:
        raise ValueError(f"bad octal field {b!r}") from None


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


def _checksum_ok(block: bytes) -> bool:
    try:
        value = _parse_octal(block[148:156])
    except ValueError:
        return False
    rest = block[:148] + b"        " + block[156:]
    unsigned = sum(rest)
    signed = unsigned - 256 * sum(1 for c in rest if c >= 0x80)
    return value in (unsigned, signed)


def parse_pax_records(data: bytes) -> dict[str, bytes]:
    """Go's parsePAX: `"%d key=value\\n"` records; later keys win."""
    records: dict[str, bytes] = {}
    rest = data
    while rest:
        sp = rest.find(b" ")
        if sp < 0:
            raise ValueError("PAX record without length")
        try:
            n = int(rest[:sp].decode("ascii"), 10)
        except (UnicodeDecodeError, ValueError):
            raise ValueError("bad PAX record length") from None
        if n < 5 or len(rest) < n or n <= sp + 1:
            raise ValueError("bad PAX record length")
        rec, nl, rest = rest[sp + 1 : n - 1], rest[n - 1 : n], rest[n:]
        if nl != b"\n":
            raise ValueError("PAX record does not end in newline")
        eq = rec.find(b"=")
        if eq < 0:
            raise ValueError("PAX record without '='")
        key_b, value = rec[:eq], rec[eq + 1 :]
        key = key_b.decode("utf-8", "surrogateescape")
        if b"\x00" in key_b or (key in ("path", "linkpath", "uname", "gname") and b"\x00" in value):
            raise ValueError("NUL in PAX record")
        records[key] = value
    return records


def _parse_pax_time(value: bytes) -> int:
    """Seconds of a PAX time (`secs[.frac]`), rounded down like Go's time.Unix()."""
    text = value.decode("ascii")
    secs_s, _, frac = text.partition(".")
    secs = int(secs_s, 10)
    if frac and not frac.isdigit():
        raise ValueError("bad PAX time")
    if frac.strip("0") and secs_s.startswith("-"):
        secs -= 1
    return secs


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
        self._buf = memoryview(b"")  # bytes known from _pos on
        self._need = BLOCK_SIZE  # bytes needed from _pos to make progress
        self._small = True
        self._requested: tuple[int, int] | None = None
        self._pax: dict[str, bytes] = {}
        self._gnu_name: bytes | None = None
        self._gnu_link: bytes | None = None

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
                end = offset + len(data)
                self._eof = end if self._eof is None else min(self._eof, end)
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
                if self._pos > self._eof:
                    raise FormatError(f"tar stream truncated: data runs past the end ({self._eof})")
                if self._pax or self._gnu_name is not None:
                    raise FormatError("tar stream ends after an extended header")
                self._end(self._pos)
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
        if not _checksum_ok(block):
            raise FormatError(f"invalid tar header (bad checksum) at offset {pos}")
        name = self._block_name(block)
        typeflag = block[156]
        try:
            size = parse_numeric(block[124:136])
            mode = parse_numeric(block[100:108])
            mtime = parse_numeric(block[136:148])
        except ValueError as exc:
            raise FormatError(f"invalid tar header for {_display(name)!r}: {exc}") from None

        if typeflag in (ord("x"), ord("g"), ord("L"), ord("K")):
            if typeflag == ord("g"):
                raise FormatError(
                    f"tar entry {_display(name)!r} is a PAX global header, which kit unpack rejects"
                )
            if size < 0 or size > MAX_SPECIAL_FILE_SIZE:
                raise FormatError(f"tar extended header {_display(name)!r} has bad size {size}")
            total = BLOCK_SIZE + _padded(size)
            if len(self._buf) < total:
                if self._at_eof(total):
                    raise FormatError(f"tar stream truncated inside {_display(name)!r}")
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
            else:
                self._gnu_link = _parse_string(data)
            self._advance(total)
            return True

        pax, self._pax = self._pax, {}
        gnu_name, self._gnu_name = self._gnu_name, None
        self._gnu_link = None
        try:
            if "path" in pax:
                name = pax["path"]
            if "size" in pax:
                size = int(pax["size"].decode("ascii"), 10)
            if "mtime" in pax:
                mtime = _parse_pax_time(pax["mtime"])
        except (UnicodeDecodeError, ValueError):
            raise FormatError(f"bad PAX record for {_display(name)!r}") from None
        if gnu_name is not None:
            name = gnu_name
        shown = _display(name)
        if size < 0:
            raise FormatError(f"tar entry {shown!r} has negative size")
        if typeflag == 0:
            typeflag = ord("5") if name.endswith(b"/") else ord("0")
        if typeflag in _REJECTED_TYPES:
            what = _REJECTED_TYPES[typeflag]
            raise FormatError(f"tar entry {shown!r} is a {what}, which kit unpack rejects")
        if any(k.startswith("GNU.sparse.") for k in pax):
            raise FormatError(f"tar entry {shown!r} is a sparse file, which kit unpack rejects")
        if typeflag not in (ord("0"), ord("5")):
            raise FormatError(
                f"tar entry {shown!r} has type {chr(typeflag)!r}, which kit unpack rejects"
            )
        is_dir = typeflag == ord("5")
        data_len = 0 if is_dir else size
        data_offset = pos + BLOCK_SIZE
        if self._eof is not None and data_offset + data_len > self._eof:
            raise FormatError(f"tar stream truncated inside {shown!r}")
        clean = _clean_name(name)
        if clean is not None:
            self.entries.append(
                TocEntry(
                    clean,
                    "dir" if is_dir else "file",
                    mode & 0o7777,
                    data_len,
                    data_offset,
                    mtime,
                )
            )
        skip = BLOCK_SIZE + _padded(data_len)
        self._small = skip <= self._window
        self._advance(skip)
        return True

    @staticmethod
    def _block_name(block: bytes) -> bytes:
        name = _parse_string(block[0:100])
        magic, version = block[257:263], block[263:265]
        prefix = b""
        if magic == _MAGIC_USTAR:
            if block[508:512] == _TRAILER_STAR:
                prefix = _parse_string(block[345:476])
            else:
                prefix = _parse_string(block[345:500])
        elif magic == _MAGIC_GNU and version == _VERSION_GNU:
            prefix = b""
        if prefix:
            name = prefix + b"/" + name
        return name


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
            if self._at < offset:
                raise FormatError(
                    f"tar stream truncated: ends at {self._at}, before offset {offset}")
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
