"""What every contender in the harness is made to do, and how its cost is counted.

The readers here are the model loader's access pattern, written once so that
every contender (local disk, a pulled copy, ratarmount, rclone, kitfs) gets
exactly the same reads: parse a safetensors header with two preads, map the
shard and copy every BF16 tensor out of the mapping (safetensors' numpy
framework cannot do BF16, and what matters is that every byte comes through
mmap, as it does for safetensors/vLLM/transformers), read shards front to back
in big buffers, and read a seeded sample of whole tensors in random order.

A shard is addressed as (path, base): base is 0 for a file, or the offset of
the file's data inside a layer blob when a contender (rclone) only exposes
blobs, so the blob is read exactly where the tar entry lies.

Costs are counted outside the contender where possible: bytes the registry
served come from its access log, CPU seconds and peak RSS from the kernel
(`wait4` for commands that exit, `/proc/<pid>` for daemons).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

import registry  # tests/registry.py: the callers put tests/ on sys.path
from registry import Served

READ_BUFFER = 8 << 20
PAGE = mmap.ALLOCATIONGRANULARITY
# Bumped by every read below: a watchdog tells a stalled reader from a finished one.
PROGRESS = [0]


@dataclass(frozen=True)
class Tensor:
    name: str
    start: int  # absolute offset of the data within the shard file (header included)
    nbytes: int


@dataclass(frozen=True)
class ShardRef:
    """Where a contender shows one shard: `path` holds its bytes from `base` on."""

    name: str
    path: Path
    base: int
    size: int


def read_header(fd: int, base: int) -> list[Tensor]:
    """The safetensors header, two preads, tensors in data order (the order loaders touch)."""
    (n,) = np.frombuffer(os.pread(fd, 8, base), dtype="<u8")
    header = json.loads(os.pread(fd, int(n), base + 8))
    data = 8 + int(n)
    tensors = [
        Tensor(name, data + int(meta["data_offsets"][0]),
               int(meta["data_offsets"][1]) - int(meta["data_offsets"][0]))
        for name, meta in header.items() if name != "__metadata__"
    ]
    return sorted(tensors, key=lambda t: t.start)


@contextlib.contextmanager
def mapped(shard: ShardRef) -> Iterator[tuple[mmap.mmap, int]]:
    """mmap of the shard's bytes (page-aligned below `base`), and where the shard starts in it."""
    fd = os.open(shard.path, os.O_RDONLY)
    try:
        aligned = shard.base - shard.base % PAGE
        mm = mmap.mmap(fd, shard.base - aligned + shard.size, prot=mmap.PROT_READ,
                       offset=aligned)
        try:
            yield mm, shard.base - aligned
        finally:
            mm.close()
    finally:
        os.close(fd)


def _copy_out(mm: mmap.mmap, at: int, t: Tensor) -> int:
    """Copy one BF16 tensor out of the mapping, as a loader builds a tensor from it."""
    arr = np.frombuffer(mm, dtype=np.uint16, count=t.nbytes // 2, offset=at + t.start)
    out = arr.copy()
    return int(out.nbytes)


def first_tensor(shard: ShardRef) -> tuple[str, int]:
    """Open a shard, read its header, and load its first tensor through mmap."""
    fd = os.open(shard.path, os.O_RDONLY)
    try:
        tensors = read_header(fd, shard.base)
    finally:
        os.close(fd)
    with mapped(shard) as (mm, at):
        return tensors[0].name, _copy_out(mm, at, tensors[0])


def load_all(shards: list[ShardRef]) -> int:
    """Load every tensor of every shard through mmap; returns the bytes copied."""
    total = 0
    for shard in shards:
        fd = os.open(shard.path, os.O_RDONLY)
        try:
            tensors = read_header(fd, shard.base)
        finally:
            os.close(fd)
        with mapped(shard) as (mm, at):
            for t in tensors:
                total += _copy_out(mm, at, t)
                PROGRESS[0] += 1
    return total


def sequential(shards: list[ShardRef]) -> int:
    """Read every shard front to back in 8 MiB preads (what cp or a hash does)."""
    buf = bytearray(READ_BUFFER)
    view = memoryview(buf)
    total = 0
    for shard in shards:
        fd = os.open(shard.path, os.O_RDONLY)
        try:
            pos, end = shard.base, shard.base + shard.size
            while pos < end:
                n = os.preadv(fd, [view[: min(READ_BUFFER, end - pos)]], pos)
                if n <= 0:
                    raise OSError(f"short read in {shard.path} at {pos}")
                pos += n
                total += n
                PROGRESS[0] += 1
        finally:
            os.close(fd)
    return total


@dataclass(frozen=True)
class Pick:
    shard: int
    tensor: Tensor


def pick_random(shards: list[ShardRef], fraction: float, seed: int = 11) -> list[Pick]:
    """A seeded sample of whole tensors, about `fraction` of the weight bytes, shuffled."""
    everything: list[Pick] = []
    for i, shard in enumerate(shards):
        fd = os.open(shard.path, os.O_RDONLY)
        try:
            everything += [Pick(i, t) for t in read_header(fd, shard.base)]
        finally:
            os.close(fd)
    rng = random.Random(seed)
    rng.shuffle(everything)
    want = fraction * sum(s.size for s in shards)
    picks: list[Pick] = []
    got = 0
    for p in everything:
        if got >= want:
            break
        picks.append(p)
        got += p.tensor.nbytes
    return picks


def random_reads(shards: list[ShardRef], picks: list[Pick]) -> int:
    """pread each picked tensor whole, in the shuffled order; returns the bytes read."""
    fds = [os.open(s.path, os.O_RDONLY) for s in shards]
    total = 0
    try:
        for p in picks:
            data = os.pread(fds[p.shard], p.tensor.nbytes, shards[p.shard].base + p.tensor.start)
            if len(data) != p.tensor.nbytes:
                raise OSError(f"short read of {p.tensor.name}")
            total += len(data)
            PROGRESS[0] += 1
    finally:
        for fd in fds:
            os.close(fd)
    return total


# -- the machine ----------------------------------------------------------------------


def drop_caches() -> str | None:
    """Drop the page cache (root only); returns why it failed, or None."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        return f"drop_caches failed: {e.strerror}"
    return None


def machine() -> dict[str, object]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": os.uname().release,
        "python": ".".join(map(str, os.sys.version_info[:3])),  # type: ignore[attr-defined]
    }


# -- processes ------------------------------------------------------------------------


@dataclass
class Usage:
    """CPU seconds and peak RSS of the process that served a contender."""

    cpu_s: float = 0.0
    peak_rss: int = 0
    rss_anon: int = 0  # at the end: heap and buffers
    rss_file: int = 0  # at the end: mapped file pages (counted in RSS, reclaimable)

    def add(self, other: Usage) -> None:
        self.cpu_s += other.cpu_s
        self.peak_rss = max(self.peak_rss, other.peak_rss)


def _proc_status(pid: int) -> dict[str, int]:
    """The memory lines of /proc/<pid>/status, in bytes."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _hwm(pid: int) -> int:
    """VmHWM: the peak RSS of the process's current image (not of the parent it forked from)."""
    return _proc_status(pid).get("VmHWM", 0)


def run_measured(cmd: list[str], **kw: object) -> Usage:
    """Run a command to completion: its CPU time (wait4, exact) and peak RSS (VmHWM, polled).

    wait4's ru_maxrss is no use here: Linux carries the high-water mark across
    exec, so every child would report the harness's own RSS at fork time.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]
    peak = 0
    stop = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _hwm(proc.pid))
            stop.wait(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    _, status, ru = os.wait4(proc.pid, 0)
    stop.set()
    poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({proc.returncode}): {err[-1500:]}")
    return Usage(ru.ru_utime + ru.ru_stime, peak)


def daemon_usage(pid: int) -> Usage:
    """CPU seconds (its own and its reaped children's) and memory of a live daemon."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return Usage()
    mem = _proc_status(pid)
    return Usage(t.user + t.system + t.children_user + t.children_system,
                 mem.get("VmHWM", 0), mem.get("RssAnon", 0), mem.get("RssFile", 0))


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system seconds of a live process and its reaped children, from /proc (0 if
    it is gone): read before and after a phase, the difference is that phase's CPU."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # after the ")" the state is field 3, so utime (14) .. cstime (17) are [11:15]
    return sum(int(x) for x in fields[11:15]) / _TICK


def cached_files(root: Path) -> list[Path]:
    """The regular files under a cache directory, temporary ones (dot names) left out."""
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def resident_bytes(paths: list[Path]) -> int:
    """How many bytes of these files the page cache holds (util-linux fincore)."""
    total = 0
    for i in range(0, len(paths), 500):
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                              *map(str, paths[i:i + 500])],
                             capture_output=True, text=True, check=True).stdout
        total += sum(int(x) for x in out.split())
    return total


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except OSError:
            pass
        time.sleep(0.005)
    raise TimeoutError(f"{what} not ready within {timeout:.0f} s")


def is_mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def fusermount_u(path: Path) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", str(path)], capture_output=True)
    if is_mounted(path):
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)


# -- the registry ---------------------------------------------------------------------

@dataclass
class Registry:
    """A Distribution registry on loopback whose access log counts every byte it serves.

    Started by tests/registry.py with its access log on; here the log is the
    neutral meter every contender is measured with.
    """

    server: registry.RegistryServer

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def log(self) -> Path:
        return self.server.log

    def stop(self) -> None:
        self.server.stop()

    def mark(self) -> int:
        return self.server.mark()

    def served(self, since: int, settle: float = 0.2) -> Served:
        """Bytes served since `mark()`; waits briefly: a line is written when a response ends."""
        time.sleep(settle)
        return self.server.served(since)


def start_registry(root: Path) -> Registry:
    """The tests' registry launcher, with its access log on: the meter for every contender."""
    return Registry(registry.start_registry(root, access_log=True))
