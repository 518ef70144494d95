"""Peak memory and speed of `kitfs pack` as the model grows: memory must stay flat.

For each size, writes a synthetic LLM project, then runs `kitfs pack` into a
loopback registry and into kit's local storage while sampling the process's
RSS; `tar -cf` of the same directory runs beside it as the reference for
what streaming the bytes through one process costs. Prints a Markdown table
and writes benchmarks/results/pack_memory.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks.synthmodel import make_model, parse_size  # noqa: E402
from registry import running_registry  # noqa: E402


def measure(cmd: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of a command, sampled every 20 ms."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, ps.memory_info().rss)
        time.sleep(0.02)
    if proc.returncode != 0:
        assert proc.stderr is not None
        raise SystemExit(f"{cmd[:3]} failed: {proc.stderr.read().decode()}")
    return time.monotonic() - start, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256M,2G")
    args = parser.parse_args()
    kitfs = [sys.executable, "-m", "kitfs.cli"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="kitfs-packmem-") as tmp, \
            running_registry(Path(tmp) / "registry") as reg:
        for size_text in args.sizes.split(","):
            project = make_model(Path(tmp) / f"p-{size_text}", parse_size(size_text))
            total = sum(p.stat().st_size for p in project.rglob("*") if p.is_file())
            home = Path(tmp) / "home"
            t_push, rss_push = measure(
                [*kitfs, "pack", str(project), "-t", f"{reg.host}/bench/m:{size_text}",
                 "--config", str(home), "--work-dir", str(Path(tmp) / "work")])
            t_local, rss_local = measure(
                [*kitfs, "pack", str(project), "-t", f"bench/m:{size_text}",
                 "--config", str(home)])
            t_tar, rss_tar = measure(["tar", "-cf", str(Path(tmp) / "x.tar"), "-C",
                                      str(project), "."])
            rows.append({"size": size_text, "bytes": total,
                         "push_s": t_push, "push_rss": rss_push,
                         "local_s": t_local, "local_rss": rss_local,
                         "tar_s": t_tar, "tar_rss": rss_tar})
            shutil.rmtree(project)
            shutil.rmtree(home, ignore_errors=True)
            (Path(tmp) / "x.tar").unlink()
    print("| model | pack+push | RSS | pack local | RSS | tar -cf | RSS | push GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['push_s']:.1f} s | {r['push_rss'] / 2**20:.0f} MiB "
              f"| {r['local_s']:.1f} s | {r['local_rss'] / 2**20:.0f} MiB "
              f"| {r['tar_s']:.1f} s | {r['tar_rss'] / 2**20:.0f} MiB "
              f"| {r['bytes'] / r['push_s'] / 1e9:.2f} |")
    out = ROOT / "benchmarks" / "results" / "pack_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": f"{psutil.cpu_count()} cpus, "
                               f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
