"""The main job end to end on this machine, printing each kitfs command as a user would type it.

Starts a CNCF Distribution registry on a free loopback port (storage in a
temporary directory), writes a synthetic LLM project, packs and pushes it
with `kitfs pack`, shows it with `kitfs inspect` and `kitfs ls`, mounts it
with `kitfs mount`, reads every file through the mount (comparing each with
the source's sha256) and every tensor header of every safetensors shard,
shows `kitfs status`, and unmounts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks.synthmodel import make_model, parse_size  # noqa: E402
from registry import running_registry  # noqa: E402

KITFS = [sys.executable, "-m", "kitfs.cli"]


def run(*args: str, quiet: bool = False) -> str:
    print(f"\n$ kitfs {shlex.join(args)}", flush=True)
    proc = subprocess.run([*KITFS, *args], text=True, capture_output=True)
    if not quiet:
        print(proc.stdout, end="")
    if proc.returncode != 0:
        print(proc.stderr, end="", file=sys.stderr)
        raise SystemExit(f"demo failed: kitfs {args[0]} exited with {proc.returncode}")
    return proc.stdout


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def read_through_mount(mnt: Path, project: Path) -> None:
    files = sorted(p for p in mnt.rglob("*") if p.is_file() and p.name != "Kitfile")
    for path in files:
        rel = path.relative_to(mnt)
        if sha256_of(path) != sha256_of(project / rel):
            raise SystemExit(f"demo failed: {rel} read through the mount differs from the source")
    print(f"read {len(files)} files through the mount: every sha256 matches the source")
    tensors = 0
    for shard in sorted(mnt.glob("model/*.safetensors")):
        with shard.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        tensors += len([k for k in header if k != "__metadata__"])
    print(f"parsed the safetensors headers: {tensors} tensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256M", help="weight bytes of the sample model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kitfs-demo-") as tmp:
        work = Path(tmp)
        with running_registry(work / "registry") as reg:
            print(f"registry: CNCF Distribution at {reg.url}")
            project = make_model(work / "project", parse_size(args.size))
            print(f"sample project: {project} ({args.size} of BF16 safetensors shards)")
            ref = f"{reg.host}/demo/synthetic-llm:v1"
            home = str(work / "kitops-home")
            run("pack", str(project), "-t", ref, "--config", home)
            run("inspect", ref, "--config", home)
            run("ls", ref, "--config", home)
            mnt = work / "mnt"
            mnt.mkdir()
            start = time.monotonic()
            run("mount", ref, str(mnt), "--cache-dir", str(work / "cache"), "--config", home)
            print(f"mounted in {time.monotonic() - start:.2f} s")
            try:
                print(f"\n$ ls -l {mnt}/model")
                print(subprocess.run(["ls", "-l", str(mnt / "model")], text=True,
                                     capture_output=True).stdout, end="")
                read_through_mount(mnt, project)
                time.sleep(1.2)  # the daemon refreshes its status every second
                status = json.loads(run("status", str(mnt), "--json", quiet=True))[0]
                engine = status["status"]["engine"]
                print(f"the daemon fetched {engine['bytes_fetched']} bytes from the registry "
                      f"and served {engine['bytes_served']}; layers: "
                      + ", ".join(f"{layer['path']} {layer['state']}"
                                  for layer in engine["layers"]))
            finally:
                run("umount", str(mnt))
    print("\ndemo finished: packed, pushed, inspected, listed, mounted and read through a "
          "real registry")


if __name__ == "__main__":
    main()
