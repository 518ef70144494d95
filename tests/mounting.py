"""Mount and unmount ModelKits through the real `kitfs` command line, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

from helpers import kitfs


@contextlib.contextmanager
def mounted(ref: str, mountpoint: Path, cache: Path, *extra: str,
            home: Path | None = None, env: Mapping[str, str] | None = None) -> Iterator[Path]:
    """`kitfs mount` (in `env`, which its daemon inherits), yield the mountpoint, always
    unmount (lazily if a test left it busy)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = kitfs("mount", ref, str(mountpoint), "--cache-dir", str(cache), *extra, home=home,
                 env=env)
    assert proc.returncode == 0, proc.stderr
    try:
        yield mountpoint
    finally:
        done = kitfs("umount", str(mountpoint))
        if done.returncode != 0:
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)
