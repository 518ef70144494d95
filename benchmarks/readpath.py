"""The read path's cost per GiB, side by side with curl and cat, in one run (issue 12).

    .venv/bin/python benchmarks/readpath.py --sizes 1G,8G --rounds 3

One safetensors shard of each size is packed and pushed to a CNCF
Distribution registry on loopback. Each round, in rotated order:

- curl: the model layer's blob from the registry to /dev/null, page cache dropped;
- kitfs cold: a fresh mount (`--prefetch none`) on an empty cache, page cache
  dropped, `cat` of the shard; then `fincore` of the chunk files (how much of
  the model the page cache holds twice) and, once `status` says the layer
  verified, the daemon CPU of that end-to-end hash pass;
- kitfs warm: a new mount on that cache, page cache dropped, `cat` of the shard;
  then hot: the same `cat` again from the mount's page cache;
- cat of the chunk files the cold read wrote, page cache dropped: what the
  warm read could do at best.

Daemon CPU is user + system from /proc/<pid>/stat, read just before and just
after each `cat` (the daemon does nothing else then). Results: medians in
benchmarks/results/readpath.{md,json} with pass/fail against issue 12's targets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks import workload as w  # noqa: E402
from benchmarks.contenders import KITFS  # noqa: E402
from benchmarks.synthmodel import make_model, parse_size  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
GIB = 1 << 30


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def kitfs(*args: str) -> str:
    done = subprocess.run([*KITFS, *args], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"kitfs {args[0]} failed: {done.stderr.strip()}")
    return done.stdout


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


#: The registry's process, whose CPU during each read is recorded next to the daemon's
#: (on two cores they share the machine: the arithmetic of a ceiling needs both).
REGISTRY_PID = 0


def resident(cache: Path) -> int:
    """Bytes of the cache's chunk files in the page cache."""
    return w.resident_bytes(w.cached_files(cache / "chunks"))


class Model:
    def __init__(self, scratch: Path, reg: w.Registry, size: int, label: str) -> None:
        project = make_model(scratch / f"project-{label}", size, shards=1)
        self.ref = f"{reg.host}/bench/readpath:{label.lower()}"
        kitfs("pack", str(project), "-t", self.ref, "--config", str(scratch / "home"),
              "--work-dir", str(scratch / "work"))
        listing = json.loads(kitfs("ls", self.ref, "--json"))
        shard = next(e for e in listing if str(e["path"]).endswith(".safetensors"))
        self.path, self.size, self.layer = str(shard["path"]), int(shard["size"]), shard["layer"]
        self.url = f"http://{reg.host}/v2/bench/readpath/blobs/{self.layer}"
        shutil.rmtree(project)  # only the registry's copy is read
        self.scratch = scratch


class Mount:
    def __init__(self, model: Model, cache: Path) -> None:
        self.mnt = Path(tempfile.mkdtemp(prefix="readpath-mnt-", dir=model.scratch))
        kitfs("mount", model.ref, str(self.mnt), "--cache-dir", str(cache), "--prefetch", "none")
        w.wait_for(lambda: (self.mnt / model.path).exists(), 30, "mounted files")
        self.pid = int(json.loads(kitfs("status", str(self.mnt), "--json"))[0]["pid"])
        self.file = self.mnt / model.path
        self.registry_cpu = 0.0

    def cat(self, profile: Path | None = None) -> tuple[float, float]:
        """Seconds and daemon CPU seconds of one `cat` of the shard; with `profile`, a
        `perf` profile of the daemon's threads (kernel and user) during it."""
        perf = None
        if profile is not None:
            perf = subprocess.Popen(["perf", "record", "-q", "-F", "999", "-g", "-p",
                                     str(self.pid), "-o", str(profile.with_suffix(".data"))],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        c0, r0 = w.cpu_seconds(self.pid), w.cpu_seconds(REGISTRY_PID)
        s = timed(["cat", str(self.file)])
        cpu = w.cpu_seconds(self.pid) - c0
        self.registry_cpu = w.cpu_seconds(REGISTRY_PID) - r0
        if perf is not None and profile is not None:
            perf.send_signal(signal.SIGINT)
            perf.wait()
            report = subprocess.run(
                ["perf", "report", "-i", str(profile.with_suffix(".data")), "--no-children",
                 "--sort", "dso,symbol", "--stdio", "-g", "none", "--percent-limit", "0.7"],
                capture_output=True, text=True).stdout
            profile.write_text(report)
            profile.with_suffix(".data").unlink(missing_ok=True)
        return s, cpu

    def settle(self, timeout: float = 600) -> float:
        """Daemon CPU until its layers are verified and its writes flushed."""
        c0 = w.cpu_seconds(self.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = json.loads(kitfs("status", str(self.mnt), "--json"))[0]
            eng = st.get("status", st).get("engine", {})
            layers = eng.get("layers", [])
            if (layers and all(x["state"] in ("verified", "poisoned") for x in layers
                               if x.get("kind") == "model")
                    and not eng.get("pending_writes")):
                break
            time.sleep(0.2)
        return w.cpu_seconds(self.pid) - c0

    def close(self) -> None:
        done = subprocess.run([*KITFS, "umount", str(self.mnt)], capture_output=True)
        if done.returncode != 0:
            w.fusermount_u(self.mnt)
        shutil.rmtree(self.mnt, ignore_errors=True)


def one_round(model: Model, order: int, profile: str | None = None) -> dict[str, float]:
    r: dict[str, float] = {}
    gib = model.size / GIB

    def curl() -> None:
        w.drop_caches()
        t0, r0 = time.perf_counter(), w.cpu_seconds(REGISTRY_PID)
        use = w.run_measured(["curl", "-sf", "-o", "/dev/null", model.url])
        r["curl_s"] = time.perf_counter() - t0
        r["curl_cpu_per_gib"] = use.cpu_s / gib
        r["curl_registry_cpu_per_gib"] = (w.cpu_seconds(REGISTRY_PID) - r0) / gib

    cache = Path(tempfile.mkdtemp(prefix="readpath-cache-", dir=model.scratch))

    def kitfs_rounds() -> None:
        m = Mount(model, cache)
        try:
            w.drop_caches()
            s, cpu = m.cat(RESULTS / f"{profile}-cold.txt" if profile else None)
            r["cold_s"], r["cold_cpu_per_gib"] = s, cpu / gib
            r["cold_registry_cpu_per_gib"] = m.registry_cpu / gib
            r["cold_chunk_resident"] = resident(cache) / model.size
            r["verify_cpu_per_gib"] = m.settle() / gib
        finally:
            m.close()
        m = Mount(model, cache)
        try:
            w.drop_caches()
            s, cpu = m.cat(RESULTS / f"{profile}-warm.txt" if profile else None)
            r["warm_s"], r["warm_cpu_per_gib"] = s, cpu / gib
            r["warm_chunk_resident"] = resident(cache) / model.size
            s, cpu = m.cat()
            r["hot_s"], r["hot_cpu_per_gib"] = s, cpu / gib
        finally:
            m.close()
        files = w.cached_files(cache / "chunks")
        w.drop_caches()
        r["chunkcat_s"] = timed(["cat", *map(str, files)])

    steps: list[Callable[[], None]] = [curl, kitfs_rounds]
    for step in steps[order % 2:] + steps[:order % 2]:
        step()
    shutil.rmtree(cache, ignore_errors=True)
    return r


def summarize(label: str, size: int, rounds: list[dict[str, float]]) -> dict[str, float]:
    med = {k: statistics.median(x[k] for x in rounds) for k in rounds[0]}
    gb = size / 1e9
    out = dict(med)
    for k in ("curl", "cold", "warm", "hot", "chunkcat"):
        out[f"{k}_gbps"] = gb / med[f"{k}_s"]
    out["cold_vs_curl"] = out["cold_gbps"] / out["curl_gbps"]
    out["warm_vs_chunkcat"] = out["warm_gbps"] / out["chunkcat_gbps"]
    return out


TARGETS = [
    ("daemon CPU per GiB, cold <= 1.5 s", "cold_cpu_per_gib", lambda v: v <= 1.5, "{:.2f} s"),
    ("daemon CPU per GiB, warm <= 0.6 s", "warm_cpu_per_gib", lambda v: v <= 0.6, "{:.2f} s"),
    ("chunk-file pages resident after a cold read <= 10%", "cold_chunk_resident",
     lambda v: v <= 0.10, "{:.1%}"),
    ("cold sequential >= 0.5x curl", "cold_vs_curl", lambda v: v >= 0.5, "{:.2f}x"),
    ("warm sequential >= 0.9x cat of the chunk files", "warm_vs_chunkcat", lambda v: v >= 0.9,
     "{:.2f}x"),
]


def report(results: dict[str, dict[str, float]], rounds: int, started: float) -> str:
    m = w.machine()
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=ROOT).stdout.strip()
    lines = [
        "# kitfs read path: CPU per GiB and copies in memory (issue 12)", "",
        f"One safetensors shard per size in a CNCF Distribution registry on loopback; "
        f"`kitfs mount --prefetch none`, `cat` of the shard; {rounds} round(s), medians. "
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM, kernel "
        f"{m['kernel']}. kitfs {rev}. Ran {time.strftime('%Y-%m-%d %H:%M')} in "
        f"{time.time() - started:.0f} s. Made by `benchmarks/readpath.py`.", "",
        "Registry CPU per GiB served (its process, /proc): curl "
        + ", ".join(f"{k} {r['curl_registry_cpu_per_gib']:.2f} s" for k, r in results.items())
        + "; kitfs cold " + ", ".join(f"{k} {r['cold_registry_cpu_per_gib']:.2f} s"
                                     for k, r in results.items()) + ".", "",
        "| size | curl | kitfs cold | cold CPU/GiB | verify CPU/GiB | chunk pages resident "
        "| cat chunk files | kitfs warm | warm CPU/GiB | hot | hot CPU/GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, r in results.items():
        lines.append(
            f"| {label} | {r['curl_gbps']:.2f} GB/s ({r['curl_cpu_per_gib']:.2f} s/GiB) "
            f"| {r['cold_gbps']:.2f} GB/s ({r['cold_vs_curl']:.2f}x curl) "
            f"| {r['cold_cpu_per_gib']:.2f} s | {r['verify_cpu_per_gib']:.2f} s "
            f"| {r['cold_chunk_resident']:.1%} | {r['chunkcat_gbps']:.2f} GB/s "
            f"| {r['warm_gbps']:.2f} GB/s ({r['warm_vs_chunkcat']:.2f}x) "
            f"| {r['warm_cpu_per_gib']:.2f} s | {r['hot_gbps']:.2f} GB/s "
            f"| {r['hot_cpu_per_gib']:.2f} s |")
    lines += ["", "| target | " + " | ".join(results) + " |",
              "| --- |" + " --- |" * len(results)]
    for name, key, ok, fmt in TARGETS:
        cells = [f"{fmt.format(r[key])} {'pass' if ok(r[key]) else 'FAIL'}"
                 for r in results.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1G,8G")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="readpath")
    ap.add_argument("--profile", action="store_true",
                    help="record a perf profile of the daemon's cold and warm read in the "
                         "last round (results/<out>-<size>-cold.txt, -warm.txt)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (drops the page cache, mounts FUSE)")
    started = time.time()
    scratch = Path(tempfile.mkdtemp(prefix="kitfs-readpath-"))
    reg = w.start_registry(scratch / "registry")
    global REGISTRY_PID
    REGISTRY_PID = reg.server.process.pid
    results: dict[str, dict[str, float]] = {}
    raw: dict[str, list[dict[str, float]]] = {}
    try:
        for label in args.sizes.split(","):
            size = parse_size(label)
            log(f"{label}: making and pushing the model")
            model = Model(scratch, reg, size, label)
            raw[label] = []
            for i in range(args.rounds):
                log(f"{label}: round {i + 1}")
                last = args.profile and i == args.rounds - 1
                raw[label].append(one_round(model, i, f"{args.out}-{label}" if last else None))
                log(json.dumps({k: round(v, 3) for k, v in raw[label][-1].items()}))
            results[label] = summarize(label, model.size, raw[label])
    finally:
        reg.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    text = report(results, args.rounds, started)
    (RESULTS / f"{args.out}.md").write_text(text)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(
        {"machine": w.machine(), "rounds": raw, "medians": results}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
