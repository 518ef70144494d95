"""`kitfs cache warm`, and a warmed ModelKit mounted with its registry down, as a user runs them.

Against a real registry whose access log counts what it served: a warm
fetches every selected layer once and verifies it, a second says it had it
all and fetches no blob byte, one after chunks went missing fetches only
those. Then the registry is stopped and the real FUSE mount serves every
file, byte for byte, saying the tag is as resolved when warmed; a reference
never warmed fails in one line, and a tag the registry says is gone is not
mounted from the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from crafted import CraftLayer, Member, build_tar, craft_layer, publish_kit
from crafted import sha256 as sha256_of
from faultproxy import FaultProxy, Hang, Slow

from helpers import kitfs, make_project, ok, one_line_error, source_files
from kitfs.cache.fileformat import BLOB_MAGIC, read_frame, write_frame
from registry import RegistryServer, start_registry

MiB = 1 << 20


@dataclass
class Kit:
    ref: str
    files: dict[str, str]  # path -> sha256 of what `kit unpack` writes (no Kitfile)
    blobs: list[str]  # layer digests


def _kit_made(registry: RegistryServer, repo: str) -> Kit:
    """As `kit` writes one: an uncompressed tar and a single gzip stream, no table of
    contents (the layers a warm must verify whole, one of them only by streaming it)."""
    weights = os.urandom(5 * MiB + 123)
    data = os.urandom(3 * MiB + 7)
    model = build_tar([Member("model/w.bin", weights), Member("model/config.json", b"{}\n")])
    dataset = craft_layer(build_tar([Member("data/d.bin", data)]), kind="dataset",
                          path="./data", compression="gzip", chunked=False)
    layers = [CraftLayer(model, path="./model"), dataset]
    ref = trio.run(lambda: publish_kit(registry.host, repo, "v1", layers, toc=None))
    files = {"model/w.bin": weights, "model/config.json": b"{}\n", "data/d.bin": data}
    return Kit(ref, {k: hashlib.sha256(v).hexdigest() for k, v in files.items()},
               [layer.digest for layer in layers])


def _kitfs_packed(registry: RegistryServer, root: Path, repo: str) -> Kit:
    """As `kitfs pack` writes one: a table of contents with a digest for every chunk."""
    project = make_project(root / "proj", weight_bytes=7 * MiB)
    home = root / "home"
    home.mkdir()
    ref = f"{registry.host}/{repo}:v1"
    ok(kitfs("pack", str(project), "-t", ref, home=home))
    manifest = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{registry.url}/v2/{repo}/manifests/v1",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})).read())
    return Kit(ref, source_files(project), [d["digest"] for d in manifest["layers"]])


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    server = start_registry(tmp_path_factory.mktemp("warm-registry"), access_log=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module", params=["kit", "kitfs"])
def kit(request: pytest.FixtureRequest, logged: RegistryServer,
        tmp_path_factory: pytest.TempPathFactory) -> Kit:
    if request.param == "kit":
        return _kit_made(logged, "warm/kitmade")
    return _kitfs_packed(logged, tmp_path_factory.mktemp("packed"), "warm/packed")


def warm(ref: str, cache: Path, *extra: str) -> dict[str, object]:
    doc: dict[str, object] = json.loads(ok(kitfs("cache", "warm", ref, "--cache-dir", str(cache),
                                                 "--json", *extra)))
    return doc


def blob_bytes(registry: RegistryServer, since: int, digests: list[str]) -> int:
    served = registry.served(since).by_blob
    return sum(served.get(d, 0) for d in digests)


def chunk_files(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "chunks").rglob("*") if p.is_file())


def test_warm_fetches_each_layer_once_then_nothing(kit: Kit, logged: RegistryServer,
                                                   tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    mark = logged.mark()
    first = warm(kit.ref, cache)
    assert first["already_cached"] == 0 and first["layers"] == len(kit.blobs)
    fetched = blob_bytes(logged, mark, kit.blobs)
    assert first["bytes"] <= fetched  # every layer came, verified (kitfs-packed gzip: twice)
    assert chunk_files(cache)

    mark = logged.mark()
    second = warm(kit.ref, cache)
    assert second["already_cached"] == second["bytes"] == first["bytes"]
    assert second["fetched"] == 0
    assert blob_bytes(logged, mark, kit.blobs) == 0  # resolved again, nothing else


def test_a_warm_after_chunks_went_missing_fetches_only_those(
        kit: Kit, logged: RegistryServer, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    warm(kit.ref, cache)
    files = chunk_files(cache)
    gone = files[::2]
    for path in gone:
        path.unlink()
    mark = logged.mark()
    again = warm(kit.ref, cache)
    assert 0 < int(again["already_cached"]) < int(again["bytes"])  # type: ignore[call-overload]
    served = blob_bytes(logged, mark, kit.blobs)
    # A streamed layer comes again whole; chunks of the others, only those removed.
    assert 0 < served < int(again["bytes"])  # type: ignore[call-overload]
    assert len(chunk_files(cache)) == len(files)
    mark = logged.mark()
    assert warm(kit.ref, cache)["fetched"] == 0
    assert blob_bytes(logged, mark, kit.blobs) == 0


def test_a_filter_warms_only_the_layers_it_selects(logged: RegistryServer,
                                                   tmp_path: Path) -> None:
    kit = _kit_made(logged, "warm/filtered")
    mark = logged.mark()
    # In a log (no terminal), progress is a line every $KITFS_PROGRESS_LINES seconds.
    proc = kitfs("cache", "warm", kit.ref, "--cache-dir", str(tmp_path / "cache"), "--json",
                 "--filter", "datasets", env=dict(os.environ, KITFS_PROGRESS_LINES="0.001"))
    doc = json.loads(ok(proc))
    assert doc["layers"] == 1
    assert re.search(r"^warming: +[\d.]+% .*/s eta", proc.stderr, re.M), proc.stderr
    served = logged.served(mark).by_blob
    assert served.get(kit.blobs[0], 0) == 0 and served.get(kit.blobs[1], 0) > 0


async def warm_offline(ref: str, cache: Path) -> str:
    """Whether a kitfs command (unpack: warm itself never falls back) would open `ref` with
    its registry down: "served" from what is kept, or "refused"."""
    with tempfile.TemporaryDirectory() as into:
        proc = await trio.run_process(
            [sys.executable, "-m", "kitfs.cli", "unpack", ref, "-d", into, "--cache-dir",
             str(cache), "--timeout", "5"], capture_stdout=True, capture_stderr=True,
            check=False)
    if proc.returncode == 0:  # with the registry down: from the kept record
        return "served"
    *said, error = proc.stderr.decode().strip().splitlines()
    assert error.startswith("kitfs: error: ") and "no usable record" in error, proc.stderr
    assert all("does not match its digest" in line for line in said), said  # why, if any
    return "refused"


def _read_all(root: Path, files: dict[str, str]) -> dict[str, str]:
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in files}


def test_a_warmed_modelkit_mounts_and_reads_everything_with_the_registry_down(
        tmp_path: Path) -> None:
    registry = start_registry(tmp_path / "registry")
    try:
        kits = [_kit_made(registry, "offline/kitmade"),
                _kitfs_packed(registry, tmp_path / "p", "offline/packed")]
        cache = tmp_path / "cache"
        for kit in kits:
            warm(kit.ref, cache)
    finally:
        registry.stop()
    for i, kit in enumerate(kits):
        mnt = tmp_path / f"mnt{i}"
        mnt.mkdir()
        proc = kitfs("mount", kit.ref, str(mnt), "--cache-dir", str(cache), "--timeout", "5")
        try:
            assert proc.returncode == 0, proc.stderr
            assert "registry unreachable" in proc.stdout and "as resolved on" in proc.stdout
            assert _read_all(mnt, kit.files) == kit.files
        finally:
            kitfs("umount", str(mnt))


def test_a_reference_never_warmed_or_tampered_with_fails_in_one_line_with_the_registry_down(
        tmp_path: Path) -> None:
    registry = start_registry(tmp_path / "registry")
    kit = _kit_made(registry, "offline/never")
    tampered = _kit_made(registry, "offline/tampered")
    cache = tmp_path / "cache"
    warm(tampered.ref, cache)
    registry.stop()
    proc = kitfs("unpack", kit.ref, "-d", str(tmp_path / "out"), "--cache-dir", str(cache),
                 "--timeout", "5")
    line = one_line_error(proc)
    assert "Connection refused" in line and "kitfs cache warm" in line
    # A kept manifest rewritten (a well-formed cache file, other bytes): not its digest,
    # so not used; nothing is mounted from it.
    assert trio.run(lambda: warm_offline(tampered.ref, cache)) == "served"
    for path in (cache / "blobs").iterdir():
        kept = bytes(read_frame(path, BLOB_MAGIC)[0])
        if b'"layers"' in kept:
            write_frame(path.parent, path.name, BLOB_MAGIC,
                        memoryview(kept.replace(b'"layers"', b'"layers" ')))
    assert trio.run(lambda: warm_offline(tampered.ref, cache)) == "refused"


def test_warm_with_the_registry_down_fails_and_never_warms_the_kept_record(
        tmp_path: Path) -> None:
    """warm fetches what the tag means now: with the registry unreachable it says so and
    exits non-zero, even though the record a mount would fall back on is there."""
    registry = start_registry(tmp_path / "registry")
    kit = _kit_made(registry, "offline/rewarm")
    cache = tmp_path / "cache"
    warm(kit.ref, cache)
    registry.stop()
    proc = kitfs("cache", "warm", kit.ref, "--cache-dir", str(cache), "--timeout", "5")
    line = one_line_error(proc)
    assert "Connection refused" in line and "no usable record" not in line, line
    assert "registry unreachable" not in proc.stdout + proc.stderr
    assert trio.run(lambda: warm_offline(kit.ref, cache)) == "served"  # the record is there


def test_a_deleted_tag_is_not_mounted_from_the_cache(registry: RegistryServer,
                                                     tmp_path: Path) -> None:
    kit = _kit_made(registry, f"offline/deleted-{tmp_path.name.lower()}")
    cache = tmp_path / "cache"
    warm(kit.ref, cache)
    repo = kit.ref.split("/", 1)[1].rsplit(":", 1)[0]
    head = urllib.request.urlopen(urllib.request.Request(
        f"{registry.url}/v2/{repo}/manifests/v1", method="HEAD",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}))
    digest = head.headers["Docker-Content-Digest"]
    urllib.request.urlopen(urllib.request.Request(
        f"{registry.url}/v2/{repo}/manifests/{digest}", method="DELETE"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = kitfs("mount", kit.ref, str(mnt), "--cache-dir", str(cache))
    if proc.returncode == 0:
        kitfs("umount", str(mnt))
    line = one_line_error(proc)
    assert "not found" in line.lower() or "unknown" in line.lower(), line


@pytest.mark.parametrize("args,needle", [
    (["cache", "warm"], "needs REF"),
    (["cache", "du", "localhost:5000/x:v1"], "takes no REF"),
    (["cache", "warm", "mymodel:v1"], "fetches from a registry"),
])
def test_bad_warm_arguments_are_one_line(args: list[str], needle: str, tmp_path: Path) -> None:
    line = one_line_error(kitfs(*args, "--cache-dir", str(tmp_path / "c")), 2)
    assert needle in line


def test_with_the_registry_up_a_warmed_mount_says_nothing_of_the_cache(
        registry: RegistryServer, tmp_path: Path) -> None:
    """The kept manifest is only a fallback: with the registry there it is not used."""
    kit = _kit_made(registry, f"offline/online-{tmp_path.name.lower()}")
    cache = tmp_path / "cache"
    warm(kit.ref, cache)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = kitfs("mount", kit.ref, str(mnt), "--cache-dir", str(cache))
    try:
        assert proc.returncode == 0, proc.stderr
        assert "warning" not in proc.stdout
        assert _read_all(mnt, kit.files) == kit.files
    finally:
        kitfs("umount", str(mnt))


def test_a_killed_warm_keeps_what_it_fetched_and_the_next_one_fetches_the_rest(
        logged: RegistryServer, tmp_path: Path) -> None:
    """kill -9 in the middle of a layer checked only whole: the chunks it had stay (by
    position, unverified), and the next warm fetches only the rest, then verifies it."""
    weights = os.urandom(24 * MiB)
    tar = build_tar([Member("model/w.bin", weights)])
    ref = trio.run(lambda: publish_kit(logged.host, "warm/killed", "v1",
                                       [CraftLayer(tar, path="./model")], toc=None))
    digest = sha256_of(tar)
    cache = tmp_path / "cache"
    prefix = digest.split(":")[1] + "-"

    def cached() -> int:  # the layer's chunk files by position, less their 32-byte header
        return sum(p.stat().st_size - 32 for p in (cache / "chunks").glob(f"*/{prefix}*")
                   if p.is_file())

    with FaultProxy(logged.host) as proxy:
        proxy.add(Slow(4 * MiB), path=digest)
        child = subprocess.Popen(
            [sys.executable, "-m", "kitfs.cli", "cache", "warm",
             ref.replace(logged.host, proxy.host, 1), "--cache-dir", str(cache)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not (cache / "chunks").is_dir() or cached() < len(tar) // 4:
                assert child.poll() is None, child.stderr.read() if child.stderr else ""
                assert time.monotonic() < deadline, "the warm made no progress"
                time.sleep(0.05)
            child.send_signal(signal.SIGKILL)
            child.wait()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    had = cached()
    assert 0 < had < len(tar)
    mark = logged.mark()
    doc = warm(ref, cache)
    present, total = int(str(doc["already_cached"])), int(str(doc["bytes"]))
    assert present == had and total == len(tar)
    fetched = logged.served(mark).by_blob.get(digest, 0)
    # Only what the cache did not hold, plus the tar headers read again to list the layer
    # (a window of 64 KiB and the archive's end: far less than one 2 MiB chunk).
    assert 0 < fetched <= total - present + 256 * 1024, (fetched, total, present)
    assert warm(ref, cache)["already_cached"] == total


def test_a_registry_that_stops_answering_falls_back_too(logged: RegistryServer,
                                                         tmp_path: Path) -> None:
    """Not refused but silent (a hung registry, a dropped route): past --timeout the mount
    falls back to what was warmed, and reads every file without another request."""
    kit = _kit_made(logged, "warm/silent")
    cache = tmp_path / "cache"
    with FaultProxy(logged.host) as proxy:
        ref = kit.ref.replace(logged.host, proxy.host, 1)
        warm(ref, cache)
        proxy.clear_log()
        proxy.add(Hang(60))  # every request: accepted, never answered
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        proc = kitfs("mount", ref, str(mnt), "--cache-dir", str(cache), "--timeout", "2")
        try:
            assert proc.returncode == 0, proc.stderr
            assert "registry unreachable" in proc.stdout, proc.stdout
            assert _read_all(mnt, kit.files) == kit.files
            assert not [s for s in proxy.requests() if "/blobs/" in s.path]
        finally:
            kitfs("umount", str(mnt))
        # With chunks gone from the cache, a read fails (EIO) without asking the registry
        # that did not answer: a mount from the cache does not wait on it read after read.
        for path in chunk_files(cache):
            path.unlink()
        proc = kitfs("mount", ref, str(mnt), "--cache-dir", str(cache), "--timeout", "2")
        try:
            assert proc.returncode == 0, proc.stderr
            with pytest.raises(OSError):
                (mnt / "model" / "w.bin").read_bytes()
            assert not [s for s in proxy.requests() if "/blobs/" in s.path]
        finally:
            kitfs("umount", str(mnt))
