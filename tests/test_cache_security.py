"""The shared cache is the daemon's alone: no other local user reads or plants in it.

Mount daemons run as root and share one cache of private models' bytes; what
is on disk is checked (ownership, modes, no symlinks, content against the
digest a key names) rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import pytest
import xxhash

from kitfs.cache import CacheError, ChunkStore, TocCache, chunk_key_for_position
from kitfs.cache.fileformat import CHUNK_MAGIC, TOC_MAGIC, write_frame
from kitfs.cache.keys import BadKeyError, chunk_key_for_digest

LAYER = "sha256:" + "ab" * 32
NOBODY = 65534


def sha_key(data: bytes) -> str:
    return chunk_key_for_digest("sha256:" + hashlib.sha256(data).hexdigest())


def b3_key(data: bytes) -> str:
    return chunk_key_for_digest("blake3:" + blake3.blake3(data).hexdigest())


def pos_key(i: int) -> str:
    return chunk_key_for_position(LAYER, 4096, i)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of everything under `root` (itself included), by relative path."""
    found = {".": stat.S_IMODE(root.lstat().st_mode)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            found[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return found


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    return ChunkStore(tmp_path / "cache", sync=False)


# -- permissions ---------------------------------------------------------------------


def test_every_directory_is_0700_and_every_file_0600(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = ChunkStore(root, budget=1 << 20, sync=False)
    tocs = TocCache(root, sync=False)
    for data in (b"one", b"two", b"three"):
        store.put(sha_key(data), data)
    store.put(pos_key(0), b"by position")
    tocs.put(LAYER, b"{}")
    tocs.put_verified(LAYER, b"{}")
    store.gc(0)  # creates the gc lock file
    store.put(pos_key(1), b"after gc")
    found = modes(root)
    dirs = {p for p in found if (root / p).is_dir()}
    assert {".", "chunks", "tocs", "verified", f"chunks/{pos_key(1)[:2]}"} <= dirs
    assert (root / "chunks" / ".gc.lock").exists()
    assert {p: m for p, m in found.items() if m != (0o700 if p in dirs else 0o600)} == {}


def _nobody_python() -> str | None:
    """An interpreter uid 65534 can run (ours may live under root's 0700 home), or None."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        probe = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             candidate, "-c", "pass"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return candidate
    return None


_AS_NOBODY = textwrap.dedent("""
    import errno, json, os, sys
    root, chunk, record = sys.argv[1:4]
    chunks = os.path.join(root, "chunks")
    shard = os.path.dirname(chunk)
    own = "/tmp/kitfs-nobody-%d" % os.getpid()
    with open(own, "wb") as f:
        f.write(b"planted")
    def attempt(name, op):
        try:
            op()
            results[name] = "ok"
        except OSError as exc:
            results[name] = errno.errorcode.get(exc.errno, str(exc.errno))
    def read(path):
        with open(path, "rb") as f:
            f.read()
    def create(path):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    results = {}
    attempt("read chunk", lambda: read(chunk))
    attempt("read toc record", lambda: read(record))
    attempt("list root", lambda: os.listdir(root))
    attempt("list chunks", lambda: os.listdir(chunks))
    attempt("list shard", lambda: os.listdir(shard))
    attempt("stat chunk", lambda: os.stat(chunk))
    attempt("create in chunks", lambda: create(os.path.join(chunks, "planted")))
    attempt("create in shard", lambda: create(os.path.join(shard, "planted")))
    attempt("create shard", lambda: os.mkdir(os.path.join(chunks, "00")))
    attempt("replace chunk", lambda: os.rename(own, chunk))
    attempt("symlink over chunk", lambda: os.symlink(own, chunk + ".x"))
    attempt("remove chunk", lambda: os.unlink(chunk))
    attempt("write chunk", lambda: os.open(chunk, os.O_WRONLY))
    attempt("replace toc record", lambda: os.rename(own, record))
    os.unlink(own)
    print(json.dumps(results))
""")


@pytest.fixture
def traversable_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is 0700 itself)."""
    base = Path(tempfile.mkdtemp(prefix="kitfs-sec-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def test_another_local_user_can_neither_read_nor_plant(traversable_dir: Path) -> None:
    """As uid 65534: reading a chunk or a record, listing, creating, replacing all fail.

    The cache sits in a directory anyone may enter, so the store's own modes
    are the only barrier (with the 0644/0755 of old, reads and listings succeed).
    """
    python = _nobody_python()
    if python is None:
        pytest.skip("needs root, setpriv and a python that uid 65534 can run")
    root = traversable_dir / "cache"
    store = ChunkStore(root, sync=False)
    data = os.urandom(10_000)
    store.put(sha_key(data), data)
    tocs = TocCache(root, sync=False)
    tocs.put(LAYER, b'{"private": "table of contents"}')
    record = root / "tocs" / f"{'ab' * 32}.json"
    assert record.is_file()
    run = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python,
         "-c", _AS_NOBODY, str(root), str(store.path(sha_key(data))), str(record)],
        capture_output=True, text=True, timeout=60, check=True)
    results = json.loads(run.stdout)
    assert len(results) == 14
    assert {op: r for op, r in results.items() if r not in ("EACCES", "EPERM")} == {}
    assert store.get(sha_key(data)) == data
    assert tocs.get(LAYER) == b'{"private": "table of contents"}'
    assert store.verify().bad == 0


# -- directories we are handed --------------------------------------------------------


@pytest.mark.parametrize(("mode", "who"), [(0o777, "other users"), (0o770, "its group"),
                                            (0o1777, "other users"), (0o720, "its group")])
def test_a_root_writable_by_others_is_refused(tmp_path: Path, mode: int, who: str) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    root.chmod(mode)
    with pytest.raises(CacheError) as info:
        ChunkStore(root)
    message = str(info.value)
    assert message == (f"cache directory {root} is writable by {who} (mode {mode:04o}): "
                       f"refusing to use it; chmod 700 {root} or pass --cache-dir")
    with pytest.raises(CacheError, match=f"writable by {who}"):
        TocCache(root).get(LAYER)
    with pytest.raises(CacheError, match=f"writable by {who}"):
        TocCache(root).put(LAYER, b"x")
    assert stat.S_IMODE(root.stat().st_mode) == mode  # refused, not "fixed"
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("sub", ["chunks", "tocs", "verified"])
def test_a_subdirectory_writable_by_others_is_refused(tmp_path: Path, sub: str) -> None:
    root = tmp_path / "cache"
    (root / sub).mkdir(parents=True)
    (root / sub).chmod(0o777)
    with pytest.raises(CacheError, match=re.escape(f"cache directory {root / sub} is writable")):
        ChunkStore(root)
        TocCache(root).get(LAYER)
        TocCache(root).get_verified(LAYER)


def test_a_root_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory away")
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    os.chown(root, NOBODY, NOBODY)
    with pytest.raises(CacheError) as info:
        ChunkStore(root)
    assert str(info.value) == (
        f"cache directory {root} belongs to uid {NOBODY}, not to uid 0 that kitfs runs as: "
        f"refusing to use it; chown 0 {root} or pass --cache-dir")
    with pytest.raises(CacheError, match="belongs to uid 65534"):
        TocCache(root).put(LAYER, b"x")


@pytest.mark.parametrize("sub", [".", "chunks", "tocs"])
def test_a_symlinked_cache_directory_is_refused(tmp_path: Path, sub: str) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    root = tmp_path / "cache"
    if sub == ".":
        root.symlink_to(real)
        link = root
    else:
        root.mkdir(mode=0o700)
        link = root / sub
        link.symlink_to(real)
    expected = (f"cache directory {link} is a symbolic link: refusing to follow it; "
                f"pass the real directory as --cache-dir")
    with pytest.raises(CacheError) as info:
        ChunkStore(root)
        TocCache(root).put(LAYER, b"x")
    assert expected in str(info.value)
    assert "\n" not in str(info.value)
    assert list(real.iterdir()) == []


def test_a_root_that_is_a_file_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.write_bytes(b"")
    with pytest.raises(CacheError, match=r"^cache directory .* is not a directory \(ENOTDIR\): "
                                         r"refusing to use it; remove it or pass --cache-dir$"):
        ChunkStore(root)


def test_a_0755_cache_from_an_older_kitfs_is_made_private(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "cache"
    old_umask = os.umask(0o022)
    try:
        for sub in ("chunks/ab", "tocs", "verified"):
            (root / sub).mkdir(parents=True, mode=0o755)
        write_frame(root / "chunks" / "ab", pos_key(1), CHUNK_MAGIC, memoryview(b"old chunk"))
        write_frame(root / "tocs", f"{'ab' * 32}.json", TOC_MAGIC, memoryview(b"old toc"))
    finally:
        os.umask(old_umask)
    for d in ("chunks/ab", "tocs", "verified", "."):
        (root / d).chmod(0o755)
    with caplog.at_level(logging.INFO, logger="kitfs.cache.ownership"):
        store = ChunkStore(root)
        tocs = TocCache(root)
        assert tocs.get(LAYER) == b"old toc"
        assert tocs.get_verified(LAYER) is None
    assert caplog.text.count("made it 0700") == 4  # root, chunks, tocs, verified
    assert f"cache directory {root} was readable by other users (mode 0755)" in caplog.text
    found = modes(root)
    assert {d: found[d] for d in (".", "chunks", "tocs", "verified")} == dict.fromkeys(
        (".", "chunks", "tocs", "verified"), 0o700)
    assert store.get(pos_key(1)) == b"old chunk"  # the chunks stay usable
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kitfs.cache.ownership"):
        ChunkStore(root)
    assert caplog.text == ""  # once


# -- no symlinks ----------------------------------------------------------------------


def test_a_chunk_replaced_by_a_symlink_reads_as_absent_and_verify_removes_it(
    store: ChunkStore, tmp_path: Path
) -> None:
    data = os.urandom(5000)
    for k in (pos_key(1), sha_key(data)):
        store.put(k, data if k == sha_key(data) else b"position")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for k in (pos_key(1), sha_key(data)):
        good = elsewhere / k
        shutil.copy(store.path(k), good)  # a good copy: only the link is wrong
        store.path(k).unlink()
        store.path(k).symlink_to(good)
        assert not store.contains(k)
        assert store.get(k) is None
        assert not os.path.lexists(store.path(k))  # the link is gone
        assert good.exists()  # what it pointed at is untouched
    assert store.stats().corrupt == 2

    store.path(pos_key(2)).symlink_to(elsewhere / pos_key(1))
    store.path(sha_key(data)).symlink_to(elsewhere / sha_key(data))
    result = store.verify()
    assert (result.bad, result.removed) == (2, 2)
    assert not os.path.lexists(store.path(pos_key(2)))
    assert not os.path.lexists(store.path(sha_key(data)))
    assert all((elsewhere / k).exists() for k in (pos_key(1), sha_key(data)))
    store.put(sha_key(data), data)  # and the real chunk can come back
    assert store.get(sha_key(data)) == data


def test_a_symlinked_shard_is_not_followed(store: ChunkStore, tmp_path: Path) -> None:
    data = b"chunk in someone else's directory"
    k = sha_key(data)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_frame(elsewhere, k, CHUNK_MAGIC, memoryview(data))
    shard = store.path(k).parent
    shard.symlink_to(elsewhere)
    assert store.path(k).is_file()  # following the link would find a good chunk
    assert not store.contains(k)
    assert not os.path.lexists(shard)  # the link was removed, not followed
    shard.symlink_to(elsewhere)
    assert store.get(k) is None
    assert not os.path.lexists(shard)
    shard.symlink_to(elsewhere)
    store.put(k, data)  # writes into a real shard of its own
    assert not shard.is_symlink() and shard.is_dir()
    assert store.get(k) == data
    assert store.remove(k)
    assert (elsewhere / k).exists()

    other = store.path(pos_key(3)).parent
    assert other != shard
    write_frame(elsewhere, pos_key(3), CHUNK_MAGIC, memoryview(b"not ours to delete"))
    other.symlink_to(elsewhere)
    assert store.remove_layer(LAYER) == 0  # does not list through the link
    result = store.verify()
    assert (result.bad, result.removed) == (1, 1)
    assert not os.path.lexists(other)
    other.symlink_to(elsewhere)
    assert not store.remove(pos_key(3))  # does not unlink through it either
    assert not os.path.lexists(other)
    assert sorted(p.name for p in elsewhere.iterdir()) == sorted([k, pos_key(3)])


def test_fifos_directories_and_sockets_in_a_chunks_place_are_misses(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FIFO would block the reader for good if it were opened like a file."""
    store.put(pos_key(9), b"makes the shard")
    os.mkfifo(store.path(pos_key(1)))
    store.path(pos_key(2)).mkdir()
    monkeypatch.chdir(store.path(pos_key(4)).parent)  # a socket path must be short
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(pos_key(4))
    started = time.monotonic()
    assert store.get(pos_key(1)) is None
    assert time.monotonic() - started < 5
    assert not os.path.lexists(store.path(pos_key(1)))
    assert store.get(pos_key(4)) is None  # open() says ENXIO
    assert not os.path.lexists(store.path(pos_key(4)))
    assert store.get(pos_key(2)) is None  # cannot be unlinked; still never read
    os.mkfifo(store.path(pos_key(3)))
    result = store.verify()
    assert result.bad == 2 and result.removed == 2  # the FIFO and the empty directory
    assert store.verify().bad == 0
    assert store.get(pos_key(9)) == b"makes the shard"


def test_a_toc_record_replaced_by_a_symlink_reads_as_absent(tmp_path: Path) -> None:
    tocs = TocCache(tmp_path / "cache", sync=False)
    tocs.put(LAYER, b"toc")
    tocs.put_verified(LAYER, b"verified")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for sub, getter in (("tocs", tocs.get), ("verified", tocs.get_verified)):
        record = tocs.root / sub / f"{'ab' * 32}.json"
        good = elsewhere / sub
        shutil.copy(record, good)
        record.unlink()
        record.symlink_to(good)
        assert getter(LAYER) is None
        assert not os.path.lexists(record)
        assert good.exists()
    fifo = tocs.root / "tocs" / f"{'ab' * 32}.json"
    os.mkfifo(fifo)
    assert tocs.get(LAYER) is None
    assert not os.path.lexists(fifo)


# -- content against the digest a key names ---------------------------------------------


@pytest.mark.parametrize("keyer", [sha_key, b3_key], ids=["sha256", "blake3"])
def test_a_planted_chunk_with_a_valid_frame_but_the_wrong_content_is_dropped(
    store: ChunkStore, keyer: Callable[[bytes], str], caplog: pytest.LogCaptureFixture
) -> None:
    good = os.urandom(3000)
    k = keyer(good)
    planted = b"evil weights" * 100
    store.put(pos_key(0), b"makes nothing special")
    shard = store.path(k).parent
    shard.mkdir(exist_ok=True)
    write_frame(shard, k, CHUNK_MAGIC, memoryview(planted))  # frame and xxh3 are fine
    assert store.contains(k)  # unchecked
    with caplog.at_level(logging.WARNING, logger="kitfs.cache.store"):
        assert store.get(k) is None
    assert "does not match its digest" in caplog.text
    assert not store.path(k).exists()
    assert store.stats().corrupt == 1
    store.put(k, good)
    assert store.get(k) == good

    write_frame(shard, k, CHUNK_MAGIC, memoryview(planted))
    result = store.verify()  # verify checks digests too
    assert (result.checked, result.bad, result.removed) == (2, 1, 1)


def test_a_position_key_is_checked_against_the_digest_the_caller_passes(
    store: ChunkStore,
) -> None:
    data = os.urandom(8000)
    other = os.urandom(8000)
    for algorithm, digest_of in (("blake3", lambda d: blake3.blake3(d).hexdigest()),
                                 ("sha256", lambda d: hashlib.sha256(d).hexdigest())):
        store.put(pos_key(1), data)
        assert store.get(pos_key(1), f"{algorithm}:{digest_of(data)}") == data
        assert store.get(pos_key(1)) == data  # no digest: the frame's xxh3 only
        assert store.get(pos_key(1), digest=f"{algorithm}:{digest_of(other)}") is None
        assert not store.contains(pos_key(1))
    assert store.stats().corrupt == 2
    for bad in ("md5:" + "0" * 32, "blake3:" + "0" * 63, "0" * 64, "sha256:" + "A" * 64):
        with pytest.raises(BadKeyError):
            store.get(pos_key(1), bad)


def test_a_digest_key_ignores_the_digest_argument(store: ChunkStore) -> None:
    data = b"named by its own digest"
    store.put(sha_key(data), data)
    wrong = "blake3:" + blake3.blake3(b"something else").hexdigest()
    assert store.get(sha_key(data), wrong) == data


class _HashCounter:
    """Counts xxh3 calls on more than a header's worth of bytes (payload checksums)."""

    def __init__(self) -> None:
        self.payloads = 0
        self.real = xxhash.xxh3_64_intdigest

    def __call__(self, data: memoryview | bytes) -> int:
        if len(data) > 24:
            self.payloads += 1
        return int(self.real(data))


@pytest.mark.parametrize("size", [5000, 2 << 20], ids=["buffered", "o_direct"])
def test_a_chunk_checked_by_digest_is_hashed_once(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    data = os.urandom(size)
    store.put(sha_key(data), data)
    store.put(pos_key(1), data)
    counter = _HashCounter()
    monkeypatch.setattr(xxhash, "xxh3_64_intdigest", counter)
    assert store.get(sha_key(data)) == data
    assert store.get(pos_key(1), "blake3:" + blake3.blake3(data).hexdigest()) == data
    assert counter.payloads == 0
    assert store.get(pos_key(1)) == data
    assert counter.payloads == 1
    raw = bytearray(store.path(sha_key(data)).read_bytes())
    raw[0] ^= 1  # the header is still checked
    store.path(sha_key(data)).write_bytes(raw)
    assert store.get(sha_key(data)) is None


# -- the command line -----------------------------------------------------------------


def test_cache_commands_refuse_a_cache_others_can_write(tmp_path: Path) -> None:
    from helpers import kitfs

    root = tmp_path / "cache"
    (root / "chunks").mkdir(parents=True)
    root.chmod(0o777)
    run = kitfs("cache", "du", "--cache-dir", str(root))
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"cache directory {root} is writable by other users (mode 0777)" in lines[0]


def test_a_cache_below_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    """Whoever can write a directory above the cache can swap the cache for their own after
    the check (planting verified records and chunks). Sticky directories (/tmp) are fine:
    others cannot rename what they do not own."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(CacheError, match=r"above cache directory .* writable by others"):
        ChunkStore(shared / "cache")
    os.chmod(shared, 0o1777)
    ChunkStore(shared / "cache")  # sticky: accepted
    os.chmod(shared, 0o755)
    os.chown(shared, 65534, 65534)
    with pytest.raises(CacheError, match="belongs to uid 65534"):
        ChunkStore(shared / "cache")
    os.chown(shared, 0, 0)
