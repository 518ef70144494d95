"""A fleet of nodes cold-starting one ModelKit: origin egress and time-to-all-loaded.

    .venv/bin/python benchmarks/fleet.py --size 1G --nodes 1,4,8

Starts an origin registry (CNCF Distribution, its access log the meter of what
leaves it), packs a synthetic model into it, then for each way to reach it
and each fleet size N runs N kitfs "nodes" at once: N daemons, each with a
chunk cache of its own (as N machines have), all mounting the ModelKit and
reading every file to the end. Ways to reach the origin:

- direct: every node asks the origin;
- distribution: through Distribution's pull-through cache (its `proxy:` mode),
  named in each node's hosts.toml (kitfs's --hosts-dir, containerd's format);
- nginx: through deploy/mirror/nginx.conf (slice + proxy_cache), likewise.

Every mirror starts cold for each N. Reported per run: origin egress as a
multiple of the model's bytes, time-to-all-loaded (first mount started to
last byte read), the daemons' CPU seconds, and the mirror events kitfs
counted (ranges a pull-through cache answered with the whole blob). Results:
benchmarks/results/fleet.{json,md,png}.

All nodes share this machine's cores: on 2 cores, N daemons doing N times
the FUSE and hashing work cannot finish in the time one does, whatever the
network; the report gives CPU seconds per GiB so that the time a fleet of
separate machines would take can be worked out (see the Markdown report).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # registry.py and nginxmirror.py: the tests' launchers

from nginxmirror import start_mirror  # noqa: E402

import registry as registry_launcher  # noqa: E402
from benchmarks import workload as w  # noqa: E402
from benchmarks.synthmodel import make_model, parse_size  # noqa: E402
from kitfs.daemon import STATE_INTERVAL_S  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
REPO = "fleet/llm"
MODES = ("direct", "distribution", "nginx")


@dataclass
class Run:
    mode: str
    nodes: int
    model_bytes: int
    origin_bytes: int
    seconds: float
    cpu_seconds: float
    read_bytes: int
    mirror_full_answers: int = 0
    mirror_fallbacks: int = 0
    received_bytes: int = 0  # what the nodes' daemons received, from every host
    errors: list[str] = field(default_factory=list)

    @property
    def egress(self) -> float:
        return self.origin_bytes / self.model_bytes


def kitfs(*args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = None
    if home is not None:
        import os

        env = dict(os.environ, KITOPS_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "kitfs.cli", *args], capture_output=True,
                          text=True, env=env, check=False)


def hosts_dir(where: Path, origin: str, mirror: str | None) -> Path:
    """containerd's layout: DIR/HOST:PORT/hosts.toml, the mirror tried before the origin."""
    folder = where / origin
    folder.mkdir(parents=True, exist_ok=True)
    text = f'server = "http://{origin}"\n'
    if mirror is not None:
        text += f'\n[host."http://{mirror}"]\n  capabilities = ["pull", "resolve"]\n'
    (folder / "hosts.toml").write_text(text)
    return where


def mirror_counts(mountpoint: Path) -> tuple[int, int, int]:
    """(whole-blob answers to ranges, fallbacks, bytes received) kitfs counted for this
    mount: a whole blob sent for a range is hung up on, so it shows in the first, not in
    the last."""
    proc = kitfs("status", "--json", str(mountpoint))
    if proc.returncode != 0:
        return 0, 0, 0
    full = fallbacks = received = 0
    for doc in json.loads(proc.stdout):
        for reg in doc.get("status", {}).get("engine", {}).get("registry", []) or []:
            full += int(reg.get("mirror_full_answers", 0) or 0)
            fallbacks += int(reg.get("mirror_fallbacks", 0) or 0)
            received += int(reg.get("bytes_received", 0) or 0)
    return full, fallbacks, received


def one_run(mode: str, n: int, ref: str, model_bytes: int, origin: w.Registry,
            scratch: Path) -> Run:
    run_dir = scratch / f"{mode}-{n}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    mirror_host: str | None = None
    stop_mirror = None
    if mode == "distribution":
        cache = registry_launcher.start_registry(run_dir / "pull-through",
                                                 proxy=f"http://{origin.host}")
        mirror_host, stop_mirror = cache.host, cache.stop
    elif mode == "nginx":
        nginx = start_mirror(f"http://{origin.host}", run_dir / "nginx")
        mirror_host, stop_mirror = nginx.host, nginx.stop
    hosts = hosts_dir(run_dir / "certs.d", origin.host, mirror_host)
    mounts = [run_dir / f"node{i}" / "mnt" for i in range(n)]
    errors: list[str] = []
    mark = origin.mark()
    started = time.monotonic()
    try:
        launches = []
        for i, mnt in enumerate(mounts):
            mnt.mkdir(parents=True)
            launches.append(subprocess.Popen(
                [sys.executable, "-m", "kitfs.cli", "mount", ref, str(mnt), "--cache-dir",
                 str(run_dir / f"node{i}" / "cache"), "--hosts-dir", str(hosts),
                 "--prefetch", "model"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for proc in launches:
            _, err = proc.communicate()
            if proc.returncode != 0:
                errors.append(err.strip())
        readers = [subprocess.Popen(
            ["sh", "-c", f"find {mnt} -type f -exec cat {{}} + | wc -c"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for mnt in mounts]
        read_bytes = 0
        for reader in readers:
            out, err = reader.communicate()
            if reader.returncode != 0 or err.strip():
                errors.append(err.strip())
            read_bytes += int(out.strip() or 0)
        seconds = time.monotonic() - started
        time.sleep(STATE_INTERVAL_S + 0.5)  # the daemons' counters, as of after the reads
        cpu = 0.0
        full = fallbacks = received = 0
        for mnt in mounts:
            state = json.loads(kitfs("status", "--json", str(mnt)).stdout or "[]")
            for doc in state:
                cpu += w.daemon_usage(int(doc["pid"])).cpu_s
            f, b, r = mirror_counts(mnt)
            full, fallbacks, received = full + f, fallbacks + b, received + r
    finally:
        for mnt in mounts:
            kitfs("umount", str(mnt))
        if stop_mirror is not None:
            stop_mirror()
    served = origin.served(mark).total
    return Run(mode, n, model_bytes, served, seconds, cpu, read_bytes, full, fallbacks,
               received, errors)


def report(runs: list[Run], machine: dict[str, object], size: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"machine": machine, "size": size,
           "runs": [dict(asdict(r), egress=r.egress) for r in runs]}
    (RESULTS / "fleet.json").write_text(json.dumps(doc, indent=2) + "\n")
    base = {r.mode: r for r in runs if r.nodes == 1}
    lines = [
        f"# Fleet: N nodes cold-start one {size} ModelKit", "",
        f"Machine: {machine.get('cpus')} CPUs, {machine.get('kernel', '')}; every node is a "
        "kitfs daemon with its own cache on this one machine, the origin and mirrors on "
        "loopback.", "",
        "| way | N | origin egress (x model) | time-to-all-loaded | vs N=1 | daemon CPU s | "
        "CPU s/GiB read | received per node (x model) | whole-blob answers | fallbacks | "
        "errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        one = base.get(r.mode)
        ratio = f"{r.seconds / one.seconds:.2f}x" if one else "-"
        per_gib = r.cpu_seconds / (r.read_bytes / (1 << 30)) if r.read_bytes else 0.0
        lines.append(
            f"| {r.mode} | {r.nodes} | {r.egress:.2f}x | {r.seconds:.1f} s | {ratio} | "
            f"{r.cpu_seconds:.1f} | {per_gib:.2f} | "
            f"{r.received_bytes / r.model_bytes / r.nodes:.2f}x | {r.mirror_full_answers} | "
            f"{r.mirror_fallbacks} | {len(r.errors)} |")
    lines += ["", "Targets (issue 15): through the nginx mirror, origin egress <= 1.1x at "
              "N = 8 and time-to-all-loaded <= 1.5x N = 1; through Distribution's cache, "
              "correct bytes and at most one unasked full blob read per node.", ""]
    for r in runs:
        for e in r.errors[:3]:
            lines.append(f"- {r.mode} N={r.nodes}: {e}")
    (RESULTS / "fleet.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no fleet.png", file=sys.stderr)
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        mine = [r for r in runs if r.mode == mode]
        if not mine:
            continue
        left.plot([r.nodes for r in mine], [r.egress for r in mine], marker="o", label=mode)
        right.plot([r.nodes for r in mine], [r.seconds for r in mine], marker="o", label=mode)
    left.set(xlabel="nodes", ylabel="origin egress (x model size)", title="Origin egress")
    right.set(xlabel="nodes", ylabel="seconds", title="Time to all loaded")
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "fleet.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="model weight bytes (default 1G)")
    parser.add_argument("--nodes", default="1,4,8", help="fleet sizes (default 1,4,8)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"ways to reach the origin (default {','.join(MODES)})")
    args = parser.parse_args()
    sizes = [int(x) for x in args.nodes.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    scratch = Path(tempfile.mkdtemp(prefix="kitfs-fleet-"))
    origin = w.start_registry(scratch / "origin")
    try:
        project = make_model(scratch / "project", parse_size(args.size))
        ref = f"{origin.host}/{REPO}:v1"
        packed = kitfs("pack", str(project), "-t", ref, home=scratch / "home")
        if packed.returncode != 0:
            raise SystemExit(f"pack failed: {packed.stderr.strip()}")
        model_bytes = sum(p.stat().st_size for p in project.rglob("*") if p.is_file())
        runs = []
        for mode in modes:
            for n in sizes:
                run = one_run(mode, n, ref, model_bytes, origin, scratch)
                print(f"{mode:>12} N={n}: egress {run.egress:.2f}x, {run.seconds:.1f} s, "
                      f"CPU {run.cpu_seconds:.1f} s, errors {len(run.errors)}", flush=True)
                runs.append(run)
        report(runs, w.machine(), args.size)
    finally:
        origin.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
