"""The contenders of the harness: kitfs and what users do today to get a model's files.

Every contender runs the same phases on the same ModelKit in the same
registry (benchmarks/workload.py has the reads); each phase that is "cold"
starts with the page cache dropped and an empty cache of the contender's own:

- load:   start -> files listable -> first tensor -> every tensor loaded (mmap)
- seq:    fresh start, read every shard front to back (GB/s, not counting the
          start), then again from the page cache ("hot")
- random: fresh start, read a seeded sample of whole tensors in random order;
          bytes the registry served per byte read
- warm:   restart on the contender's populated disk cache, page cache dropped:
          mount + load every tensor, then sequential GB/s

A contender that cannot do a phase says why instead (`NA`), so the table
shows "n/a: why" rather than a blank.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import workload as w
from benchmarks.workload import Registry, ShardRef, Usage

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "benchmarks" / ".venv-tools" / "bin"
KITFS = [sys.executable, "-m", "kitfs.cli"]
GIB = 1 << 30


@dataclass(frozen=True)
class NA:
    """A figure a contender cannot produce, and why (shown as "n/a: why")."""

    why: str


Value = float | int | NA | None
Result = dict[str, Value]


@dataclass(frozen=True)
class ShardInfo:
    """One safetensors shard of the ModelKit: where kitfs ls says it lies in its layer."""

    path: str  # inside the ModelKit, e.g. model/model-00001-of-00004.safetensors
    layer: str
    offset: int
    size: int


@dataclass
class Scenario:
    """Everything the contenders share: the registry, the ModelKit, the local copy."""

    registry: Registry
    repo: str
    tag: str
    project: Path
    layers: list[dict[str, object]]  # the manifest's layer descriptors
    shards: list[ShardInfo]
    scratch: Path
    random_fraction: float
    picks: list[w.Pick] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    artifacts: Path | None = None  # where stall dumps go: <artifacts>-kitfs-stall-N.txt
    stalls: int = 0

    @property
    def ref(self) -> str:
        return f"{self.registry.host}/{self.repo}:{self.tag}"

    @property
    def model_layer(self) -> str:
        return self.shards[0].layer

    @property
    def model_layer_size(self) -> int:
        return next(int(str(x["size"])) for x in self.layers if x["digest"] == self.model_layer)

    def blob_url(self, digest: str) -> str:
        return f"http://{self.registry.host}/v2/{self.repo}/blobs/{digest}"

    def weight_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    def drop(self) -> None:
        why = w.drop_caches()
        if why and why not in self.notes:
            self.notes.append(why)

    def tempdir(self, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.scratch))


class Contender:
    """Base: a contender that shows the shards as files after some start-up."""

    name = "?"
    about = ""
    unavailable: str | None = None  # why this contender cannot run at all here

    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.phase = ""

    def phases(self) -> list[Callable[[], Result]]:
        return [self.load, self.seq, self.random, self.warm]

    def run_round(self) -> Result:
        """Every phase; one that fails is recorded as `error_<phase>` and the others still run."""
        out: Result = {}
        for phase in self.phases():
            self.phase = phase.__name__
            try:
                out.update(phase())
            except Exception as e:
                traceback.print_exc()
                out[f"error_{phase.__name__}"] = NA(f"{type(e).__name__}: "
                                                    f"{str(e).splitlines()[0][:200]}")
        return out

    # Each phase returns figures; the defaults say the contender cannot do it.
    def load(self) -> Result:
        return {}

    def seq(self) -> Result:
        return {}

    def random(self) -> Result:
        return {}

    def warm(self) -> Result:
        return {}


# -- local disk: the reference every ratio to "local" uses ----------------------------


class Local(Contender):
    name = "local disk"
    about = "the project's files on this machine's disk (the reference, not a contender)"

    def shards(self) -> list[ShardRef]:
        return [ShardRef(s.path, self.sc.project / s.path, 0, s.size) for s in self.sc.shards]

    def load(self) -> Result:
        self.sc.drop()
        t0 = time.perf_counter()
        w.first_tensor(self.shards()[0])
        first = time.perf_counter() - t0
        self.sc.drop()
        t0 = time.perf_counter()
        w.load_all(self.shards())
        return {"ready_s": 0.0, "first_tensor_s": first,
                "load_all_s": time.perf_counter() - t0,
                "served": NA("no network")}

    def seq(self) -> Result:
        self.sc.drop()
        t0 = time.perf_counter()
        n = w.sequential(self.shards())
        cold = n / (time.perf_counter() - t0) / 1e9
        t0 = time.perf_counter()
        n = w.sequential(self.shards())
        return {"seq_gbps": cold, "hot_gbps": n / (time.perf_counter() - t0) / 1e9}

    def random(self) -> Result:
        self.sc.drop()
        t0 = time.perf_counter()
        n = w.random_reads(self.shards(), self.sc.picks)
        return {"random_gbps": n / (time.perf_counter() - t0) / 1e9,
                "amplification": NA("no network")}


# -- curl: the limit of the path ------------------------------------------------------


class Curl(Contender):
    name = "curl"
    about = "curl -o /dev/null of the model layer blob: the limit of the network path"

    def seq(self) -> Result:
        self.sc.drop()
        mark = self.sc.registry.mark()
        t0 = time.perf_counter()
        use = w.run_measured(["curl", "-s", "-f", "-o", "/dev/null",
                              self.sc.blob_url(self.sc.model_layer)])
        el = time.perf_counter() - t0
        served = self.sc.registry.served(mark)
        na = NA("a blob, not files")
        return {"seq_gbps": self.sc.model_layer_size / el / 1e9, "ready_s": na,
                "first_tensor_s": na, "load_all_s": na, "random_gbps": na,
                "amplification": na, "weights_at_ready": na, "cpu_s": use.cpu_s,
                "seq_cpu_per_gib": use.cpu_s / (self.sc.model_layer_size / GIB),
                "peak_rss": use.peak_rss, "served": served.total}

    def phases(self) -> list[Callable[[], Result]]:
        return [self.seq]


# -- skopeo copy + untar: a full pull, as `kit pull && kit unpack` --------------------


class Pull(Contender):
    name = "pull + untar"
    about = ("skopeo copy docker://REF oci:DIR, then tar -xf every layer "
             "(standing in for kit pull && kit unpack)")

    def __init__(self, sc: Scenario) -> None:
        super().__init__(sc)
        if shutil.which("skopeo") is None:
            self.unavailable = "skopeo is not installed"

    def load(self) -> Result:
        self.sc.drop()
        work = self.sc.tempdir("pull-")
        mark = self.sc.registry.mark()
        try:
            t0 = time.perf_counter()
            use = w.run_measured([
                "skopeo", "copy", "-q", "--src-tls-verify=false",
                f"docker://{self.sc.ref}", f"oci:{work / 'oci'}:{self.sc.tag}"])
            t_copy = time.perf_counter() - t0
            out = work / "files"
            out.mkdir()
            for layer in self.sc.layers:
                hexd = str(layer["digest"]).split(":", 1)[1]
                use.add(w.run_measured(["tar", "-xf", str(work / "oci" / "blobs" / "sha256" / hexd),
                                        "-C", str(out)]))
            shards = [ShardRef(s.path, out / s.path, 0, s.size) for s in self.sc.shards]
            ready = time.perf_counter() - t0
            w.first_tensor(shards[0])
            first = time.perf_counter() - t0
            w.load_all(shards)
            load_all = time.perf_counter() - t0
            served = self.sc.registry.served(mark)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        picked = sum(p.tensor.nbytes for p in self.sc.picks)
        return {"ready_s": ready, "first_tensor_s": first, "load_all_s": load_all,
                "pull_copy_s": t_copy, "cpu_s": use.cpu_s, "peak_rss": use.peak_rss,
                "served": served.total, "weights_at_ready": NA("downloads everything first"),
                "seq_gbps": NA("reads local disk after the pull"),
                "amplification": served.total / picked if picked else None,
                "random_gbps": NA("needs the full pull first")}


# -- FUSE mounts ----------------------------------------------------------------------


@dataclass
class Mounted:
    shards: list[ShardRef]
    pid: int
    mark: int  # registry log position when the mount started
    t0: float  # perf_counter when the mount started
    ready_s: float = 0.0
    weights_at_ready: int = 0
    usage: Usage = field(default_factory=Usage)
    extra: Result = field(default_factory=dict)  # contender-specific figures at the end
    cache: Path | None = None  # the contender's own cache directory, if it has one

    def cpu_s(self) -> float:
        """CPU seconds the mount's process has used so far (read around a phase)."""
        return w.cpu_seconds(self.pid)


class Mounter(Contender):
    """A contender that mounts something; subclasses say how to start and stop it."""

    persistent_cache = False  # whether a restart can reuse what an earlier mount fetched
    no_warm_why = "no persistent cache: every mount fetches again"
    random_note: str | None = None

    @contextlib.contextmanager
    def mounted(self, cache: Path, *, random_access: bool = False) -> Iterator[Mounted]:
        raise NotImplementedError
        yield  # pragma: no cover

    def _ready(self, m: Mounted) -> None:
        m.ready_s = time.perf_counter() - m.t0
        served = self.sc.registry.served(m.mark, settle=0)
        m.weights_at_ready = served.by_blob.get(self.sc.model_layer, 0)

    @contextlib.contextmanager
    def cold(self, **kw: bool) -> Iterator[Mounted]:
        cache = self.sc.tempdir(f"{self.key()}-cache-")
        try:
            self.sc.drop()
            with self.mounted(cache, **kw) as m:
                m.cache = cache
                yield m
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    def key(self) -> str:
        return self.name.split()[0]

    def load(self) -> Result:
        with self.cold() as m:
            w.first_tensor(m.shards[0])
            first = time.perf_counter() - m.t0
            w.load_all(m.shards)
            load_all = time.perf_counter() - m.t0
        served = self.sc.registry.served(m.mark)
        return {"ready_s": m.ready_s, "first_tensor_s": first, "load_all_s": load_all,
                "weights_at_ready": m.weights_at_ready, "cpu_s": m.usage.cpu_s,
                "peak_rss": m.usage.peak_rss, "rss_anon": m.usage.rss_anon,
                "rss_file": m.usage.rss_file, "served": served.total,
                **{f"load_{k}": v for k, v in m.extra.items()}}

    def seq(self) -> Result:
        with self.cold() as m:
            c0, t0 = m.cpu_s(), time.perf_counter()
            n = w.sequential(m.shards)
            cold = n / (time.perf_counter() - t0) / 1e9
            cold_cpu = (m.cpu_s() - c0) / (n / GIB)
            # Bytes of the cache's files the page cache holds next to the mount's own
            # pages of the same data: a second copy of the model in memory.
            assert m.cache is not None
            resident = w.resident_bytes(w.cached_files(m.cache)) / n
            t0 = time.perf_counter()
            n = w.sequential(m.shards)
            hot = n / (time.perf_counter() - t0) / 1e9
        return {"seq_gbps": cold, "hot_gbps": hot, "seq_cpu_s": m.usage.cpu_s,
                "seq_cpu_per_gib": cold_cpu, "seq_cache_resident": resident,
                "peak_rss_seq": m.usage.peak_rss, "rss_anon_seq": m.usage.rss_anon,
                "rss_file_seq": m.usage.rss_file, **{f"seq_{k}": v for k, v in m.extra.items()}}

    def random(self) -> Result:
        with self.cold(random_access=True) as m:
            t0 = time.perf_counter()
            n = w.random_reads(m.shards, self.sc.picks)
            el = time.perf_counter() - t0
        served = self.sc.registry.served(m.mark)
        weights = served.by_blob.get(self.sc.model_layer, 0)
        sizes = sorted(served.sizes.get(self.sc.model_layer, [])) or [0]
        return {"random_gbps": n / el / 1e9, "amplification": weights / n,
                "random_requests": len(sizes), "random_request_median": sizes[len(sizes) // 2],
                "random_request_max": sizes[-1],
                **{f"random_{k}": v for k, v in m.extra.items()}}

    def warm(self) -> Result:
        if not self.persistent_cache:
            return {"warm_load_s": NA(self.no_warm_why), "warm_gbps": NA(self.no_warm_why)}
        cache = self.sc.tempdir(f"{self.key()}-warm-")
        try:
            self.sc.drop()
            with self.mounted(cache) as m:  # fill the cache
                w.sequential(m.shards)
            self.sc.drop()
            with self.mounted(cache) as m:
                w.load_all(m.shards)
                warm_load = time.perf_counter() - m.t0
            served = self.sc.registry.served(m.mark).by_blob.get(self.sc.model_layer, 0)
            # A fresh mount again: in the one above, a model smaller than the
            # daemon's memory tier would be read back from memory, not the disk cache.
            self.sc.drop()
            with self.mounted(cache) as m:
                c0, t0 = m.cpu_s(), time.perf_counter()
                n = w.sequential(m.shards)
                gbps = n / (time.perf_counter() - t0) / 1e9
                warm_cpu = (m.cpu_s() - c0) / (n / GIB)
            served += self.sc.registry.served(m.mark).by_blob.get(self.sc.model_layer, 0)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        return {"warm_load_s": warm_load, "warm_gbps": gbps, "warm_served": served,
                "warm_cpu_per_gib": warm_cpu}


def _stop_child(proc: subprocess.Popen[bytes], mnt: Path) -> Usage:
    """Unmount a foreground FUSE daemon we started; its CPU from wait4, its peak RSS from /proc."""
    peak = w.daemon_usage(proc.pid).peak_rss
    w.fusermount_u(mnt)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return Usage(ru.ru_utime + ru.ru_stime, peak)
        time.sleep(0.02)
    proc.kill()
    _, _, ru = os.wait4(proc.pid, 0)
    return Usage(ru.ru_utime + ru.ru_stime, peak)


class Kitfs(Mounter):
    name = "kitfs"
    about = "kitfs mount (default --prefetch model); random reads with --prefetch none"
    persistent_cache = True

    def __init__(self, sc: Scenario, prefetch: str | None = None) -> None:
        super().__init__(sc)
        self.prefetch = prefetch
        if prefetch:
            self.name = f"kitfs --prefetch {prefetch}"
            self.about = (f"kitfs mount --prefetch {prefetch}: the lazy path alone "
                          "(cold load and sequential read only)")
        self.last_pid = 0
        self.engine_counters = True

    def phases(self) -> list[Callable[[], Result]]:
        return super().phases() if self.prefetch is None else [self.load, self.seq]

    def key(self) -> str:
        return "kitfs"

    @contextlib.contextmanager
    def mounted(self, cache: Path, *, random_access: bool = False) -> Iterator[Mounted]:
        mnt = self.sc.tempdir("kitfs-mnt-")
        prefetch = "none" if random_access else self.prefetch
        extra = ["--prefetch", prefetch] if prefetch else []
        mark = self.sc.registry.mark()
        t0 = time.perf_counter()
        done = subprocess.run([*KITFS, "mount", self.sc.ref, str(mnt), "--cache-dir", str(cache),
                               *extra], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"kitfs mount failed: {done.stderr.strip()}")
        m = Mounted([ShardRef(s.path, mnt / s.path, 0, s.size) for s in self.sc.shards],
                    0, mark, t0)
        try:
            w.wait_for(lambda: m.shards[0].path.name in os.listdir(m.shards[0].path.parent),
                       30, "kitfs files")
            self._ready(m)
            m.pid = self.daemon_pid(mnt)
            self.last_pid = m.pid
            with self.watchdog(mnt, m.pid):
                yield m
            m.usage = w.daemon_usage(m.pid)
            if self.engine_counters:
                m.extra.update(self.engine_status(mnt, time.time()))
        finally:
            done = subprocess.run([*KITFS, "umount", str(mnt)], capture_output=True, text=True)
            if done.returncode != 0:
                w.fusermount_u(mnt)
            with contextlib.suppress(OSError):
                mnt.rmdir()

    @contextlib.contextmanager
    def watchdog(self, mnt: Path, pid: int, stall_s: float = 8.0) -> Iterator[None]:
        """Catch the daemon stalled: no progress in the reader and none in the daemon's
        counters for `stall_s`; then `py-spy dump` its threads once, for the report."""
        from kitfs.mounts import read_state

        stop = threading.Event()

        def counters() -> tuple[object, ...]:
            state = read_state(mnt)
            if state is None:
                return ()
            fs, eng = state.status.get("fs", {}), state.status.get("engine", {})
            return (fs.get("readBytes"), eng.get("bytes_fetched"), eng.get("bytes_served"))

        def watch() -> None:
            last = (w.PROGRESS[0], counters())
            since = time.monotonic()
            while not stop.wait(1.0):
                now = (w.PROGRESS[0], counters())
                if now != last:
                    last, since = now, time.monotonic()
                    continue
                if time.monotonic() - since >= stall_s:
                    self.dump_stall(pid, time.monotonic() - since)
                    return

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()

    def dump_stall(self, pid: int, idle: float) -> None:
        self.sc.stalls += 1
        where = (f"{self.sc.artifacts}-kitfs-stall-{self.sc.stalls}.txt"
                 if self.sc.artifacts else None)
        dump = "py-spy is not installed"
        if (TOOLS / "py-spy").exists():
            done = subprocess.run([str(TOOLS / "py-spy"), "dump", "--pid", str(pid)],
                                  capture_output=True, text=True, timeout=60)
            dump = done.stdout + done.stderr
        note = (f"kitfs stalled ({self.name}, phase {self.phase}): no read progress and no "
                f"daemon counter change for {idle:.0f} s")
        state = ""
        with contextlib.suppress(Exception):
            from kitfs.mounts import all_states

            docs = [s.status for s in all_states() if s.pid == pid]
            state = json.dumps(docs[0] if docs else {}, indent=1)
        if where:
            Path(where).write_text(note + "\n\n" + dump + "\nkitfs status of the daemon:\n"
                                   + state + "\n")
            note += f"; py-spy dump of the daemon: `{Path(where).name}`"
        self.sc.notes.append(note)

    @staticmethod
    def engine_status(mnt: Path, after: float) -> Result:
        """The daemon's own counters once its state file is refreshed (about every second)."""
        from kitfs.mounts import read_state

        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            state = read_state(mnt)
            if state is not None and state.updated > after:
                engine = state.status.get("engine", {})
                keys = ("bytes_fetched", "bytes_served", "bytes_cached_memory", "requests",
                        "misses", "memory_hits", "disk_hits")
                return {f"engine_{k}": engine[k] for k in keys
                        if isinstance(engine.get(k), int | float)}
            time.sleep(0.1)
        return {}

    @staticmethod
    def daemon_pid(mnt: Path) -> int:
        out = subprocess.run([*KITFS, "status", str(mnt), "--json"], capture_output=True,
                             text=True, check=True).stdout
        return int(json.loads(out)[0]["pid"])

    def random(self) -> Result:
        r = super().random()
        # The lazy path alone: mount with --prefetch none and an empty cache, stay idle,
        # count weight bytes. The page cache is not dropped first, so this mount's ready
        # time is the one without reading Python and its libraries back from disk.
        cache = self.sc.tempdir("kitfs-idle-")
        try:
            with self.mounted(cache, random_access=True) as m:
                time.sleep(0.5)
                served = self.sc.registry.served(m.mark, settle=0)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        r["weights_idle_s"] = served.by_blob.get(self.sc.model_layer, 0)
        r["ready_libs_cached_s"] = m.ready_s
        return r


class Ratarmount(Mounter):
    name = "ratarmount"
    about = "ratarmount over the layer blobs' HTTP URLs (fsspec), one union mount"

    def __init__(self, sc: Scenario) -> None:
        super().__init__(sc)
        if not (TOOLS / "ratarmount").exists():
            self.unavailable = "ratarmount is not installed (bash scripts/bench installs it)"

    @contextlib.contextmanager
    def mounted(self, cache: Path, *, random_access: bool = False) -> Iterator[Mounted]:
        mnt = self.sc.tempdir("rat-mnt-")
        urls = [self.sc.blob_url(str(x["digest"])) for x in self.sc.layers]
        mark = self.sc.registry.mark()
        t0 = time.perf_counter()
        log = (cache / "ratarmount.log").open("wb")
        proc = subprocess.Popen([str(TOOLS / "ratarmount"), "-f", *urls, str(mnt)],
                                stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, HOME=str(cache)))
        m = Mounted([ShardRef(s.path, mnt / s.path, 0, s.size) for s in self.sc.shards],
                    proc.pid, mark, t0)
        try:
            def up() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError("ratarmount exited: "
                                       + (cache / "ratarmount.log").read_text()[-1500:])
                return w.is_mounted(mnt) and m.shards[0].path.exists()

            w.wait_for(up, 120, "ratarmount")
            self._ready(m)
            yield m
        finally:
            m.usage = _stop_child(proc, mnt)
            log.close()
            with contextlib.suppress(OSError):
                mnt.rmdir()


class _Listing(http.server.BaseHTTPRequestHandler):
    """Serves a directory listing of the blobs, redirects everything else to the registry."""

    listing_path = ""
    listing = b""
    target = ""

    def do_GET(self) -> None:
        if self.path.rstrip("/") == self.listing_path.rstrip("/"):
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(self.listing)))
            self.end_headers()
            self.wfile.write(self.listing)
            return
        self.send_response(307)
        self.send_header("Location", self.target + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


class Rclone(Mounter):
    name = "rclone"
    about = ("rclone mount --vfs-cache-mode full over the blob URLs; its :http: backend needs an "
             "HTML listing that registries lack, so a loopback page lists the blobs and "
             "redirects every blob request to the registry; rclone shows blobs, not files: "
             "reads go to each file's offset in its layer blob")
    persistent_cache = True

    def __init__(self, sc: Scenario) -> None:
        super().__init__(sc)
        self.server: http.server.ThreadingHTTPServer | None = None
        if shutil.which("rclone") is None:
            self.unavailable = "rclone is not installed (apt-get install rclone)"

    def base_url(self) -> str:
        if self.server is None:
            path = f"/v2/{self.sc.repo}/blobs/"
            links = "".join(f'<a href="./{x["digest"]}">{x["digest"]}</a>\n'
                            for x in self.sc.layers)
            handler = type("Listing", (_Listing,), {
                "listing_path": path, "target": f"http://{self.sc.registry.host}",
                "listing": f"<html><body><pre>\n{links}</pre></body></html>\n".encode()})
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=self.server.serve_forever, daemon=True).start()
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/v2/{self.sc.repo}/blobs/"

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    @contextlib.contextmanager
    def mounted(self, cache: Path, *, random_access: bool = False) -> Iterator[Mounted]:
        mnt = self.sc.tempdir("rclone-mnt-")
        url = self.base_url()
        mark = self.sc.registry.mark()
        t0 = time.perf_counter()
        log = (cache / "rclone.log").open("wb")
        proc = subprocess.Popen(
            ["rclone", "mount", ":http:", str(mnt), "--http-url", url, "--read-only",
             "--vfs-cache-mode", "full", "--cache-dir", str(cache / "vfs"),
             "--dir-cache-time", "1000h", "--config", "/dev/null"],
            stdout=log, stderr=subprocess.STDOUT)
        blob = mnt / self.sc.model_layer
        m = Mounted([ShardRef(s.path, mnt / s.layer, s.offset, s.size) for s in self.sc.shards],
                    proc.pid, mark, t0)
        try:
            def up() -> bool:
                if proc.poll() is not None:
                    tail = (cache / "rclone.log").read_text()[-1500:]
                    raise RuntimeError("rclone exited: " + tail)
                return w.is_mounted(mnt) and blob.name in os.listdir(mnt)

            w.wait_for(up, 60, "rclone mount")
            self._ready(m)
            yield m
        finally:
            m.usage = _stop_child(proc, mnt)
            log.close()
            with contextlib.suppress(OSError):
                mnt.rmdir()


def all_contenders(sc: Scenario) -> list[Contender]:
    return [Local(sc), Curl(sc), Pull(sc), Ratarmount(sc), Rclone(sc), Kitfs(sc),
            Kitfs(sc, prefetch="none")]
