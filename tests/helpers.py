"""Small builders shared by the integration tests."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from kitfs.modelkit import mediatypes as mt
from kitfs.modelkit.kitignore import KitIgnore
from kitfs.modelkit.layers import plan_layer
from kitfs.modelkit.tarwriter import write_layer
from kitfs.oci.client import ClientOptions, RegistryClient

LONG_NAME = "ünïcødé-" + "x" * 120 + ".bin"


def make_project(root: Path, *, weight_bytes: int = 3 << 20) -> Path:
    """A small but awkward project: shards, configs, a dataset, docs, odd names, ignored files."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model").mkdir()
    rnd = os.urandom(weight_bytes)
    (root / "model" / "model.safetensors").write_bytes(rnd)
    (root / "model" / "config.json").write_text('{"hidden_size": 64}\n')
    (root / "model" / "empty.txt").write_bytes(b"")
    (root / "model" / "scratch.tmp").write_text("ignored by .kitignore\n")
    (root / "model" / "nested" / "deeper").mkdir(parents=True)
    (root / "model" / "nested" / "deeper" / LONG_NAME).write_bytes(b"long name\n" * 100)
    (root / "data").mkdir()
    (root / "data" / "train.csv").write_text("a,b\n1,2\n" * 1000)
    (root / "README.md").write_text("# tiny model\n")
    # kit matches .kitignore like .dockerignore: patterns are anchored at the context root
    (root / ".kitignore").write_text("**/*.tmp\n")
    (root / "Kitfile").write_text(
        "manifestVersion: 1.0.0\n"
        "package:\n  name: tiny\n  version: 0.1.0\n  authors: [Ada, Grace]\n"
        "model:\n  name: tiny-llm\n  path: ./model\n  format: safetensors\n"
        "datasets:\n  - name: train\n    path: ./data/train.csv\n"
        "docs:\n  - path: ./README.md\n    description: model card\n"
    )
    return root


def source_files(root: Path, kitignore_suffix: str = ".tmp") -> dict[str, str]:
    """sha256 of every file a mount/unpack must show (relative path -> hex)."""
    out: dict[str, str] = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.endswith(kitignore_suffix) and rel not in (
            "Kitfile", ".kitignore"
        ):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def kitfs(*args: str, home: Path | None = None, stdin: str | None = None,
          timeout: float = 120, env: Mapping[str, str] | None = None,
          ) -> subprocess.CompletedProcess[str]:
    """Run the real `kitfs` command line in a subprocess (in `env`, else this environment)."""
    cmd = [sys.executable, "-m", "kitfs.cli", *args]
    if home is not None:
        cmd += ["--config", str(home)]
    return subprocess.run(cmd, capture_output=True, text=True, input=stdin, timeout=timeout,
                          env=env)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def kit_tar(context: Path, path: str, others: list[str]) -> bytes:
    """The uncompressed tar `kit pack` writes for one layer."""
    buf = io.BytesIO()
    entries = plan_layer(context, path, others, KitIgnore.from_context(context))
    write_layer(entries, buf, compression="none", media_type="x")
    return buf.getvalue()


async def push_manifest(registry_host: str, repo: str, manifest: dict[str, object],
                        blobs: list[bytes], tag: str = "v1") -> str:
    """Push these blobs and a hand-written manifest (any generation's shape); its digest."""
    async with RegistryClient(registry_host, ClientOptions()) as client:
        for blob in blobs:
            await client.push_blob_bytes(repo, sha(blob), blob)
        body = json.dumps(manifest).encode()
        digest, _ = await client.put_manifest(repo, tag, body, mt.OCI_MANIFEST)
        return digest


def layer_desc(media_type: str, blob: bytes, annotations: dict[str, str] | None = None
               ) -> dict[str, object]:
    """A manifest descriptor of `blob`."""
    d: dict[str, object] = {"mediaType": media_type, "digest": sha(blob), "size": len(blob)}
    if annotations:
        d["annotations"] = annotations
    return d


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    """The command's stdout, once it exited 0 (else its stderr says why)."""
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def one_line_error(proc: subprocess.CompletedProcess[str], exit_code: int | None = None) -> str:
    """The one line a failing command printed: non-zero exit, no traceback, and `exit_code`
    if given."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and len(lines) == 1, (
        proc.returncode, proc.stderr)
    if exit_code is not None:
        assert proc.returncode == exit_code, proc.stderr
    return lines[0]
