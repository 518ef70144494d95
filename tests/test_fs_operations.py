"""The FUSE adapter without a mount: inodes, attributes, listings, errno mapping, bounds.

Handlers are called directly, as pyfuse3 would call them. File bytes come
from the session registry through a minimal FileReader that reads layer
ranges, so what is checked is real bytes at real offsets.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from helpers import kitfs, make_project, source_files
from kitfs.errors import IntegrityError, UnreachableError
from kitfs.fs.inodes import ROOT_INODE, InodeTable
from kitfs.fs.operations import FsConfig, KitfsOperations
from kitfs.inspection import build_file_tree, inspect
from kitfs.modelkit.filters import FilterSet
from kitfs.modelkit.tree import Node, Tree
from kitfs.oci.client import ClientOptions
from kitfs.oci.reference import parse_reference
from kitfs.oci.source import BlobSource, open_source
from registry import RegistryServer

CTX: Any = None  # handlers here never look at the request context
CONFIG = FsConfig(uid=1234, gid=567, time_ns=1_700_000_000 * 10**9, request_timeout=2.0,
                  read_timeout=2.0)


class RangeReader:
    """The smallest real FileReader: every read is one range request of the layer blob."""

    def __init__(self, source: BlobSource) -> None:
        self.source = source
        self.open: dict[str, int] = {}

    async def read(self, node: Node, offset: int, size: int,
                   cursor: object = None) -> bytes | memoryview:
        assert node.layer is not None
        return await self.source.read_range(node.layer, node.offset + offset, size)

    def opened(self, node: Node) -> None:
        self.open[node.path] = self.open.get(node.path, 0) + 1

    def released(self, node: Node) -> None:
        self.open[node.path] -= 1

    def trusted(self, node: Node) -> bool:
        return True

    def status(self) -> dict[str, Any]:
        return {}


class FailingReader(RangeReader):
    def __init__(self, source: BlobSource, error: BaseException | None) -> None:
        super().__init__(source)
        self.error = error
        self.calls = 0

    async def read(self, node: Node, offset: int, size: int,
                   cursor: object = None) -> bytes | memoryview:
        self.calls += 1
        if self.error is None:
            await trio.sleep_forever()
        raise self.error


@pytest.fixture(scope="module")
def packed(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("ops")
    project = make_project(root / "proj", weight_bytes=1 << 20)
    ref = f"{registry.host}/ops/tiny:v1"
    proc = kitfs("pack", str(project), "-t", ref, home=root / "home")
    assert proc.returncode == 0, proc.stderr
    return ref, project


@pytest.fixture
async def source(packed: tuple[str, Path]) -> AsyncIterator[BlobSource]:
    src = open_source(parse_reference(packed[0]), ClientOptions())
    try:
        yield src
    finally:
        await src.aclose()


async def make_tree(source: BlobSource, *filters: str) -> Tree:
    return await build_file_tree(source, await inspect(source), FilterSet.parse(list(filters)))


def inode_of(ops: KitfsOperations, path: str) -> int:
    inode = ROOT_INODE
    for part in path.split("/"):
        child = ops.inodes.child(inode, os.fsencode(part))
        assert child is not None, path
        inode = child
    return inode


async def read_all(ops: KitfsOperations, inode: int, step: int = 65536) -> bytes:
    info = await ops.open(inode, os.O_RDONLY, CTX)
    assert info.keep_cache and not info.direct_io
    out = bytearray()
    while chunk := await ops.read(info.fh, len(out), step):
        out += chunk
    await ops.release(info.fh)
    return bytes(out)


async def test_bytes_attributes_and_stable_inodes(
    source: BlobSource, packed: tuple[str, Path]
) -> None:
    _, project = packed
    tree = await make_tree(source)
    reader = RangeReader(source)
    ops = KitfsOperations(tree, reader, CONFIG)
    # one inode per node, numbered densely from the root, the same on every build
    assert len(ops.inodes) == len(tree.nodes)
    assert all(ops.inodes.get(i) is not None for i in range(1, len(tree.nodes) + 1))
    again = KitfsOperations(tree, reader, CONFIG)
    assert all(inode_of(ops, p) == inode_of(again, p) for p in tree.nodes if p)
    assert InodeTable(tree).get(ROOT_INODE) is not None and ops.inodes.get(0) is None

    for rel, digest in source_files(project).items():
        inode = inode_of(ops, rel)
        assert hashlib.sha256(await read_all(ops, inode, 300_001)).hexdigest() == digest, rel
        attr = await ops.getattr(inode, CTX)
        assert attr.st_size == (project / rel).stat().st_size
        assert stat.S_ISREG(attr.st_mode) and stat.S_IMODE(attr.st_mode) == 0o444
        assert (attr.st_uid, attr.st_gid, attr.st_nlink) == (1234, 567, 1)
        assert attr.st_mtime_ns == CONFIG.time_ns
    assert reader.open and not any(reader.open.values())  # every open was released

    kitfile = await read_all(ops, inode_of(ops, "Kitfile"), 7)  # inline: never the reader
    assert kitfile == tree.nodes["Kitfile"].inline

    root = await ops.getattr(ROOT_INODE, CTX)
    assert stat.S_ISDIR(root.st_mode) and stat.S_IMODE(root.st_mode) == 0o555
    assert root.st_nlink == 2 + 2  # data/ and model/
    model = inode_of(ops, "model")
    assert (await ops.lookup(model, b"..", CTX)).st_ino == ROOT_INODE
    assert (await ops.lookup(model, b".", CTX)).st_ino == model
    miss = await ops.lookup(model, b"nope.bin", CTX)
    assert miss.st_ino == 0 and miss.entry_timeout > 0  # negative entries are cached

    info = await ops.open(inode_of(ops, "README.md"), os.O_RDONLY, CTX)
    assert await ops.read(info.fh, 10**9, 4096) == b""
    assert await ops.read(info.fh, 5, 10**6) == (project / "README.md").read_bytes()[5:]

    vfs = await ops.statfs(CTX)
    assert vfs.f_files == len(tree.nodes) and vfs.f_bfree == 0
    assert vfs.f_blocks * vfs.f_frsize >= tree.total_size


async def test_readdir_resumes_where_the_kernel_stopped(
    source: BlobSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = KitfsOperations(await make_tree(source), RangeReader(source), CONFIG)
    model = inode_of(ops, "model")
    replies: list[tuple[bytes, int]] = []
    budget = [2]

    def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if budget[0] == 0:
            return False
        budget[0] -= 1
        replies.append((name, next_id))
        assert attr.st_ino == ops.inodes.child(model, name)
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    fh = await ops.opendir(model, CTX)
    start = 0
    while True:
        before = len(replies)
        budget[0] = 2
        await ops.readdir(fh, start, CTX)
        if len(replies) == before:
            break
        start = replies[-1][1]
    await ops.releasedir(fh)
    names = [name.decode() for name, _ in replies]
    assert names == sorted(["config.json", "empty.txt", "model.safetensors", "nested"])
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.opendir(inode_of(ops, "README.md"), CTX)
    assert info.value.errno == errno.ENOTDIR


async def test_writes_and_changes_are_erofs(source: BlobSource) -> None:
    ops = KitfsOperations(await make_tree(source), RangeReader(source), CONFIG)
    readme = inode_of(ops, "README.md")
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.open(readme, flags, CTX)
        assert info.value.errno == errno.EROFS
    calls = [
        ops.setattr(readme, pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(), None, CTX),
        ops.write(1, 0, b"x"),
        ops.create(ROOT_INODE, b"new", 0o644, os.O_WRONLY, CTX),
        ops.mknod(ROOT_INODE, b"node", 0o644, 0, CTX),
        ops.mkdir(ROOT_INODE, b"dir", 0o755, CTX),
        ops.unlink(ROOT_INODE, b"README.md", CTX),
        ops.rmdir(ROOT_INODE, b"data", CTX),
        ops.symlink(ROOT_INODE, b"link", b"README.md", CTX),
        ops.rename(ROOT_INODE, b"README.md", ROOT_INODE, b"x", 0, CTX),
        ops.link(readme, ROOT_INODE, b"hard", CTX),
        ops.setxattr(readme, b"user.x", b"1", CTX),
        ops.removexattr(readme, b"user.x", CTX),
    ]
    for call in calls:
        with pytest.raises(pyfuse3.FUSEError) as info:
            await call
        assert info.value.errno == errno.EROFS
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.access(readme, os.W_OK, CTX)
    assert info.value.errno == errno.EROFS
    assert await ops.access(readme, os.R_OK, CTX)
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.getxattr(readme, b"user.x", CTX)
    assert info.value.errno == pyfuse3.ENOATTR
    assert await ops.listxattr(readme, CTX) == []
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.getattr(10**6, CTX)
    assert info.value.errno == errno.ENOENT


@pytest.mark.parametrize("error", [
    IntegrityError("layer sha256:abc failed verification"),
    UnreachableError("registry 127.0.0.1:1 did not answer"),
    RuntimeError("a bug in the engine"),
    None,  # never answers: the handler's bound turns it into EIO
])
async def test_reader_failures_become_eio_logged_once(
    source: BlobSource, error: BaseException | None, caplog: pytest.LogCaptureFixture
) -> None:
    reader = FailingReader(source, error)
    config = FsConfig(uid=0, gid=0, time_ns=0, request_timeout=0.3, read_timeout=0.3)
    ops = KitfsOperations(await make_tree(source), reader, config)
    info = await ops.open(inode_of(ops, "model/model.safetensors"), os.O_RDONLY, CTX)
    caplog.set_level(logging.ERROR, logger="kitfs.fs.operations")
    for _ in range(5):
        start = trio.current_time()
        with pytest.raises(pyfuse3.FUSEError) as raised:
            await ops.read(info.fh, 0, 4096)
        assert raised.value.errno == errno.EIO
        assert trio.current_time() - start < 2
    assert reader.calls == 5
    records = [r for r in caplog.records if r.name == "kitfs.fs.operations"]
    assert len(records) == 1, [r.getMessage() for r in records]
    if error is not None and not isinstance(error, RuntimeError):
        assert str(error) in records[0].getMessage()
    if isinstance(error, RuntimeError):
        assert records[0].exc_info is not None  # a bug keeps its traceback
    assert ops.status()["errors"] == 5
    # the adapter is still alive: other files read fine
    assert await read_all(ops, inode_of(ops, "Kitfile"))
