"""Attacks through the real user surfaces (FUSE mounts, the CLI, a shared cache), from a
third review, kept as tests: each asserts the safe behaviour, so a failing test is a
working attack.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from crafted import build_tar, craft_layer, kit_blobs, publish_kit, sha256, swap_files
from faultproxy import Corrupt, FaultProxy, Slow, Status
from opening import opened

from helpers import kitfs
from kitfs.engine.reader import EngineConfig
from kitfs.errors import IntegrityError
from kitfs.modelkit import mediatypes as mt
from kitfs.oci.client import ClientOptions, RegistryClient
from mounting import mounted
from registry import RegistryServer

A, B = os.urandom(300_000), os.urandom(300_000)


def status_json(mountpoint: Path) -> dict[str, Any]:
    proc = kitfs("status", str(mountpoint), "--json", timeout=30)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    return doc[0] if isinstance(doc, list) else doc  # type: ignore[no-any-return]


def states(mountpoint: Path) -> list[str]:
    return [layer["state"] for layer in status_json(mountpoint)["engine"]["layers"]] \
        if "engine" in status_json(mountpoint) else []


# -- a kitfs table of contents the registry withholds -----------------------------------


@pytest.mark.parametrize("withhold", ["500", "404", "replaced"])
async def test_a_withheld_table_of_contents_is_refused_or_checks_the_layer_whole(
    registry: RegistryServer, tmp_path: Path, withhold: str
) -> None:
    """A kitfs-packed layer; the registry withholds its table of contents (500, 404: what a
    copy made without referrers looks like) or serves other bytes for it, and flips a byte
    of the layer. Other bytes are refused. Withheld, the layer is checked as one `kit`
    wrote: strict mode never serves the flipped byte. Before: a table served with other
    bytes was ignored too (it raised an IntegrityError the fallback swallowed)."""
    data = os.urandom(3 << 20)
    tar = build_tar([("model/w.bin", data), ("model/config.json", b"{}\n")])
    layer = craft_layer(tar, chunk_size=1 << 20)
    ref = await publish_kit(registry.host, f"r3/withhold-{withhold}", "v1", [layer])
    _, _, toc_blob = kit_blobs([layer])
    assert toc_blob is not None
    flip = tar.index(data[:64]) + 4242
    strict = EngineConfig(chunk_size=1 << 20, prefetch="none", verify="strict", read_timeout=10)
    with FaultProxy(registry.host) as proxy:
        if withhold == "500":
            proxy.add(Status(500), path=sha256(toc_blob))
        elif withhold == "404":
            proxy.add(Status(404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}'), path=sha256(toc_blob))
        else:
            proxy.add(Corrupt([5]), path=sha256(toc_blob))
        proxy.add(Corrupt([flip]), path=layer.digest)
        via = ref.replace(registry.host, proxy.host)
        if withhold == "replaced":
            proc = kitfs("ls", via)
            assert proc.returncode == 1 and "digest" in proc.stderr, proc
            return
        async with opened(via, tmp_path / "cache", strict) as kit:
            node = kit.tree.nodes["model/w.bin"]
            with pytest.raises(IntegrityError):
                await kit.engine.read(node, 0, 8192)


# -- the CLI on hostile manifests --------------------------------------------------------


async def push_raw(host: str, repo: str, tag: str, manifest: dict[str, Any] | bytes,
                   blobs: list[bytes]) -> str:
    body = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    async with RegistryClient(host, ClientOptions()) as client:
        for blob in blobs:
            await client.push_blob_bytes(repo, sha256(blob), blob)
        await client.put_manifest(repo, tag, body, mt.OCI_MANIFEST)
    return f"{host}/{repo}:{tag}"


def one_line_failure(proc: subprocess.CompletedProcess[str]) -> None:
    err = proc.stderr.strip()
    assert proc.returncode not in (0, 70) and proc.returncode > 0, (proc.returncode, err)
    assert "Traceback" not in err and "ExceptionGroup" not in err, err
    assert len(err.splitlines()) == 1, err


def honest_parts() -> tuple[Any, dict[str, Any], bytes, bytes | None]:
    tar = build_tar([("model/a.bin", A), ("model/b.bin", B), ("model/config.json", b"{}\n")])
    layer = craft_layer(tar)
    manifest, config, toc_blob = kit_blobs([layer])
    return layer, json.loads(manifest), config, toc_blob


def hostile_cases() -> list[str]:
    return ["dup-layer", "two-sections", "config-not-json", "config-huge", "toc-at-layer",
            "toc-at-config", "toc-foreign-layer", "config-array", "layer-size-negative",
            "no-layers", "layer-media-odd", "toc-at-manifest-missing"]


async def build_hostile(host: str, case: str) -> str:
    layer, man, config, toc_blob = honest_parts()
    blobs = [config, layer.blob] + ([toc_blob] if toc_blob else [])
    ldesc = man["layers"][0]
    notes = man.setdefault("annotations", {})
    from kitfs.modelkit.toc import TOC_ANNOTATION
    if case == "dup-layer":
        man["layers"] = [ldesc, dict(ldesc)]
    elif case == "two-sections":
        doc = json.loads(config)
        doc["datasets"] = [{"name": "again", "path": doc["model"]["path"],
                            "digest": layer.digest}]
        config = json.dumps(doc).encode()
        blobs[0] = config
        man["config"]["digest"], man["config"]["size"] = sha256(config), len(config)
        second = dict(ldesc, mediaType=mt.layer_media_type("dataset", "tar"))
        man["layers"] = [ldesc, second]
    elif case == "config-not-json":
        config = b"\x00\xff not json at all"
        blobs[0] = config
        man["config"]["digest"], man["config"]["size"] = sha256(config), len(config)
    elif case == "config-array":
        config = b"[1,2,3]"
        blobs[0] = config
        man["config"]["digest"], man["config"]["size"] = sha256(config), len(config)
    elif case == "config-huge":
        config = b"{" + b" " * (40 << 20) + b"}"
        blobs[0] = config
        man["config"]["digest"], man["config"]["size"] = sha256(config), len(config)
    elif case == "toc-at-layer":
        notes[TOC_ANNOTATION] = layer.digest
    elif case == "toc-at-config":
        notes[TOC_ANNOTATION] = man["config"]["digest"]
    elif case == "toc-at-manifest-missing":
        notes[TOC_ANNOTATION] = "sha256:" + "0" * 64
    elif case == "toc-foreign-layer":
        assert toc_blob is not None
        toc = json.loads(toc_blob)
        other = dict(toc["layers"][0])
        other["digest"] = "sha256:" + "1" * 64
        toc["layers"].append(other)
        toc_blob = json.dumps(toc).encode()
        blobs[-1] = toc_blob
        notes[TOC_ANNOTATION] = sha256(toc_blob)
    elif case == "layer-size-negative":
        ldesc["size"] = -1
    elif case == "no-layers":
        man["layers"] = []
    elif case == "layer-media-odd":
        ldesc["mediaType"] = "application/vnd.kitops.modelkit.model.v1.tar+\u202egz"
    return await push_raw(host, "r3/hostile", case, man, blobs)


@pytest.mark.parametrize("case", hostile_cases())
async def test_hostile_manifests_end_in_one_line(
    registry: RegistryServer, tmp_path: Path, case: str
) -> None:
    """SAFE for ls, inspect and mount: exit 0 with sane output, or one line on stderr and
    a non-zero exit; never a traceback (exit 70), never a hang."""
    ref = await build_hostile(registry.host, case)
    results = {}
    for cmd in (["ls", ref], ["inspect", ref], ["inspect", ref, "--json"],
                ["ls", ref, "--json"]):
        proc = await trio.to_thread.run_sync(lambda c=cmd: kitfs(*c, timeout=60))
        results[" ".join(cmd[:1] + cmd[2:])] = proc
        if proc.returncode != 0:
            one_line_failure(proc)
        else:
            assert "Traceback" not in proc.stderr, proc.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = await trio.to_thread.run_sync(lambda: kitfs(
        "mount", ref, str(mnt), "--cache-dir", str(tmp_path / "cache"), timeout=60))
    try:
        if proc.returncode != 0:
            one_line_failure(proc)
        else:
            listing = await trio.to_thread.run_sync(lambda: sorted(
                str(p.relative_to(mnt)) for p in mnt.rglob("*")))
            results["mounted"] = listing  # type: ignore[assignment]
    finally:
        kitfs("umount", str(mnt), timeout=60)
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    print(case, {k: (v.returncode, v.stderr.strip()[:200]) if hasattr(v, "returncode") else v
                 for k, v in results.items()})


# -- real FUSE mounts ---------------------------------------------------------------------

MMAP_READER = r"""
import mmap, os, sys, signal
fd = os.open(sys.argv[1], os.O_RDONLY)
m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
first = m[0:65536]
print("first", first.hex()[:0], flush=True)
sys.stdin.readline()          # the test poisons the layer meanwhile
again = m[0:65536]
print("again", "same" if again == first else "changed", flush=True)
print("bytes", again[4096:4097].hex(), flush=True)
"""


async def kit_layer(registry: RegistryServer, name: str, size: int = 2 << 20
                    ) -> tuple[str, Any, bytes]:
    weights = os.urandom(size)
    tar = build_tar([("model/w.bin", weights), ("model/config.json", b"{}\n")])
    layer = craft_layer(tar)
    ref = await publish_kit(registry.host, f"r3/{name}", "v1", [layer], toc=None)
    return ref, layer, weights


def wait_state(mnt: Path, want: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        doc = status_json(mnt)
        text = json.dumps(doc)
        if f'"{want}"' in text:
            return doc
        assert time.monotonic() < deadline, doc
        time.sleep(0.1)


async def test_an_mmap_of_a_poisoned_layer_gives_no_wrong_byte(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """A process maps w.bin and touches its first 64 KiB (lazy: the registry's lie at 4096
    is in the page). The layer is then poisoned. SAFE: touching the mapping again gives the
    right byte or SIGBUS, never the lie."""
    ref, layer, weights = await kit_layer(registry, "mmap")
    node_off = build_tar([("model/w.bin", weights), ("model/config.json", b"{}\n")]).index(
        weights[:64])
    with FaultProxy(registry.host) as proxy:
        proxy.add(Corrupt([node_off + 4096]), path=layer.digest)
        via = ref.replace(registry.host, proxy.host)
        with mounted(via, tmp_path / "mnt", tmp_path / "cache", "--prefetch", "none") as mnt:
            reader = subprocess.Popen([sys.executable, "-c", MMAP_READER,
                                       str(mnt / "model" / "w.bin")], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert reader.stdout is not None and reader.stdin is not None
            assert reader.stdout.readline().startswith("first")
            with contextlib.suppress(OSError):
                (mnt / "model" / "w.bin").read_bytes()
            with contextlib.suppress(OSError):
                (mnt / "model" / "config.json").read_bytes()
            wait_state(mnt, "poisoned")
            time.sleep(0.5)
            out, err = reader.communicate("go\n", timeout=30)
            lied = format(weights[4096] ^ 0xFF, "02x")
            assert f"bytes {lied}" not in out, (out, err, reader.returncode)
            assert reader.returncode in (0, -7), (out, err)  # -7: SIGBUS


CAT_LOOP = r"""
import sys, hashlib
try:
    with open(sys.argv[1], "rb") as f:
        data = f.read()
    print(hashlib.sha256(data).hexdigest())
except OSError as e:
    print("err", e.errno)
"""


async def test_two_readers_while_the_layout_check_fails(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """A table of contents that swaps a.bin and b.bin; two processes read a.bin at once
    through the mount, many times. SAFE: each gets a.bin's bytes or EIO, never b.bin's."""
    import hashlib
    tar = build_tar([("model/a.bin", A), ("model/b.bin", B), ("model/config.json", b"{}\n")])
    layer = craft_layer(tar, chunk_size=1 << 20)
    toc = swap_files(layer.toc, "model/a.bin", "model/b.bin")
    ref = await publish_kit(registry.host, "r3/tworeaders", "v1", [layer], toc=[toc])
    with FaultProxy(registry.host) as proxy:
        proxy.add(Slow(2 << 20), path=layer.digest)
        via = ref.replace(registry.host, proxy.host)
        with mounted(via, tmp_path / "mnt", tmp_path / "cache", "--prefetch", "none") as mnt:
            procs = [subprocess.Popen([sys.executable, "-c", CAT_LOOP, str(mnt / "model" / n)],
                                      stdout=subprocess.PIPE, text=True)
                     for n in ("model/a.bin"[6:], "a.bin", "b.bin", "a.bin")]
            outs = [p.communicate(timeout=60)[0].strip() for p in procs]
            bad = {hashlib.sha256(B).hexdigest(): "b.bin's bytes as a.bin",
                   hashlib.sha256(A).hexdigest(): "a.bin's bytes as b.bin"}
            assert outs[2] != hashlib.sha256(A).hexdigest(), outs
            for o in (outs[0], outs[1], outs[3]):
                assert o != hashlib.sha256(B).hexdigest(), (bad, outs)
            doc = status_json(mnt)
            time.sleep(1.5)  # status is a snapshot refreshed every STATE_INTERVAL_S (1 s)
            doc = status_json(mnt)
            assert "poisoned" in json.dumps(doc), doc


@pytest.mark.parametrize("maker", ["kit", "kitfs"])
async def test_strict_mount_under_a_lying_proxy_serves_no_lie(
    registry: RegistryServer, tmp_path: Path, maker: str
) -> None:
    """--verify strict through a proxy that flips one byte of the layer on every answer.
    SAFE: reading w.bin gives its bytes or EIO, and status names the layer poisoned (kit)
    or not verified (kitfs: each chunk fails alone)."""
    weights = os.urandom(3 << 20)
    tar = build_tar([("model/w.bin", weights), ("model/config.json", b"{}\n")])
    layer = craft_layer(tar, chunk_size=1 << 20)
    ref = await publish_kit(registry.host, f"r3/strict-{maker}", "v1", [layer],
                            toc=None if maker == "kit" else "auto")
    flip = tar.index(weights[:64]) + (1 << 20) + 7
    with FaultProxy(registry.host) as proxy:
        via = ref.replace(registry.host, proxy.host)
        proxy.add(Corrupt([flip]), path=layer.digest)
        with mounted(via, tmp_path / "mnt", tmp_path / "cache", "--prefetch", "none",
                     "--verify", "strict", "--timeout", "5") as mnt:
            try:
                got = (mnt / "model" / "w.bin").read_bytes()
            except OSError:
                got = None
            assert got is None or got == weights
            doc = status_json(mnt)
            assert "verified\"" not in json.dumps(doc["engine"]["layers"]) if "engine" in doc \
                else True, doc


async def test_prefetch_all_with_a_lying_proxy_then_status(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """--prefetch all through a proxy that flips a byte: the layer is poisoned by the
    background hash with no reader at all. SAFE: status --json says poisoned, every read
    of w.bin fails (no page, no chunk of the lie left)."""
    ref, layer, _weights = await kit_layer(registry, "pfall", 3 << 20)
    with FaultProxy(registry.host) as proxy:
        proxy.add(Corrupt([100_000]), path=layer.digest)
        via = ref.replace(registry.host, proxy.host)
        with mounted(via, tmp_path / "mnt", tmp_path / "cache", "--prefetch", "all") as mnt:
            doc = wait_state(mnt, "poisoned")
            proxy.clear()
            with pytest.raises(OSError):
                (mnt / "model" / "w.bin").read_bytes()
            doc = status_json(mnt)
            assert "poisoned" in json.dumps(doc) and '"verified"' not in json.dumps(doc), doc


def umount_clean(mnt: Path, limit: float = 40) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = kitfs("umount", str(mnt), timeout=limit)
    return proc, time.monotonic() - started


@pytest.mark.parametrize("during", ["verification", "layout-check"])
async def test_unmount_while_a_check_runs(
    registry: RegistryServer, tmp_path: Path, during: str
) -> None:
    """The registry dribbles the layer; unmount while the whole-layer hash (prefetch all)
    or a table of contents' layout check is under way. SAFE: umount exits 0 quickly, no
    traceback in its output or the daemon's log, the mountpoint is gone."""
    weights = os.urandom(6 << 20)
    tar = build_tar([("model/w.bin", weights), ("model/config.json", b"{}\n")])
    layer = craft_layer(tar, chunk_size=1 << 20)
    ref = await publish_kit(registry.host, f"r3/umount-{during}", "v1", [layer],
                            toc=None if during == "verification" else "auto")
    with FaultProxy(registry.host) as proxy:
        proxy.add(Slow(64 << 10), path=layer.digest)
        via = ref.replace(registry.host, proxy.host)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        extra = ["--prefetch", "all"] if during == "verification" else ["--prefetch", "none"]
        proc = kitfs("mount", via, str(mnt), "--cache-dir", str(tmp_path / "cache"), *extra)
        assert proc.returncode == 0, proc.stderr
        log = Path(status_json(mnt)["log"])
        reader = None
        if during == "layout-check":
            reader = subprocess.Popen(["cat", str(mnt / "model" / "w.bin")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.5)
        try:
            done, took = umount_clean(mnt)
        finally:
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
            if reader is not None:
                reader.kill()
                reader.wait()
        text = log.read_text() if log.exists() else ""
        assert done.returncode == 0 and took < 20, (done.returncode, took, done.stderr)
        assert "Traceback" not in done.stderr + text, (done.stderr, text[-3000:])
        assert not os.path.ismount(mnt)


async def test_a_registry_that_dies_after_listing(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """The registry goes away right after the mount listed the kit. SAFE: reads fail with
    EIO within --timeout (no hang), status still answers, umount exits 0."""
    ref, _layer, _weights = await kit_layer(registry, "dies", 3 << 20)
    proxy = FaultProxy(registry.host)
    via = ref.replace(registry.host, proxy.host)
    with mounted(via, tmp_path / "mnt", tmp_path / "cache", "--prefetch", "none",
                 "--timeout", "4") as mnt:
        proxy.close()
        started = time.monotonic()
        with pytest.raises(OSError):
            await trio.to_thread.run_sync((mnt / "model" / "w.bin").read_bytes)
        assert time.monotonic() - started < 15
        assert status_json(mnt)["alive"]
        done, took = umount_clean(mnt)
        assert done.returncode == 0 and took < 20, (done.returncode, took, done.stderr)


async def test_two_daemons_one_cache_the_lying_ones_chunks_never_reach_the_honest_one(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """Same kit mounted twice at once on one cache dir: one through a proxy that flips a
    byte in chunk 1, one straight to the registry. The lying one reads first and writes its
    chunks; the honest one then reads (small memory, so it goes to disk); then the lying
    one reads again after the honest one verified and adopted. SAFE: the honest mount
    always serves the right bytes and verifies; the honest mount's later remount too."""
    ref, layer, weights = await kit_layer(registry, "twodaemons", 6 << 20)
    cache = tmp_path / "cache"
    node_off = build_tar([("model/w.bin", weights), ("model/config.json", b"{}\n")]).index(
        weights[:64])
    with FaultProxy(registry.host) as proxy:
        proxy.add(Corrupt([node_off + (1 << 20) + 11]), path=layer.digest)
        via = ref.replace(registry.host, proxy.host)
        small = ["--prefetch", "none", "--memory", "8M"]
        with mounted(via, tmp_path / "lie", cache, *small) as lie, \
                mounted(ref, tmp_path / "honest", cache, *small) as honest:
            with contextlib.suppress(OSError):
                (lie / "model" / "w.bin").read_bytes()
            got = (honest / "model" / "w.bin").read_bytes()
            assert got == weights
            (honest / "model" / "config.json").read_bytes()
            wait_state(honest, "verified")
            with contextlib.suppress(OSError):
                (lie / "model" / "w.bin").read_bytes()
            time.sleep(1.5)
            subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False)
            assert (honest / "model" / "w.bin").read_bytes() == weights
        with mounted(ref, tmp_path / "again", cache, *small) as again:
            assert (again / "model" / "w.bin").read_bytes() == weights


@pytest.mark.parametrize("ref", [
    "127.0.0.1:1/r@sha256:zz", "127.0.0.1:1/R/Upper:v1", "127.0.0.1:1/r:v1\n",
    "127.0.0.1:1/" + "a" * 5000 + ":v1", "127.0.0.1:1/a/../b:v1", "127.0.0.1:1/r:v1#x",
    "127.0.0.1:99999/r:v1", "[::1/r:v1", "127.0.0.1:1/r:v1@sha256:" + "0" * 64 + "?x",
    "127.0.0.1:1/r:\u202ev1", "127.0.0.1:1/r%2f..:v1", "", ":", "@",
])
def test_odd_references_end_in_one_line(ref: str, tmp_path: Path) -> None:
    for cmd in (["ls", ref], ["inspect", ref]):
        one_line_failure(kitfs(*cmd, "--timeout", "3", timeout=60))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = kitfs("mount", ref, str(mnt), "--cache-dir", str(tmp_path / "c"), "--timeout", "3",
                 timeout=60)
    subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    one_line_failure(proc)
