"""Bad input and hostile conditions: one clear line on stderr, non-zero exit, no traceback."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import trio

from helpers import kitfs, make_project
from kitfs.modelkit import mediatypes as mt
from kitfs.oci.client import OCI_MANIFEST, RegistryClient
from registry import RegistryServer, free_port


def assert_one_line_error(proc: object, *needles: str) -> str:
    rc = getattr(proc, "returncode")  # noqa: B009
    err: str = getattr(proc, "stderr")  # noqa: B009
    assert rc != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj", weight_bytes=4096)


def test_unknown_kitfile_key(project: Path, tmp_path: Path) -> None:
    kitfile = project / "Kitfile"
    kitfile.write_text(kitfile.read_text() + "flavour: vanilla\n")
    proc = kitfs("pack", str(project), "-t", "x/y:v1", home=tmp_path / "h")
    assert_one_line_error(proc, "flavour", "Kitfile:")


def test_missing_layer_path(project: Path, tmp_path: Path) -> None:
    kitfile = project / "Kitfile"
    kitfile.write_text(kitfile.read_text().replace("./data/train.csv", "./data/missing.csv"))
    proc = kitfs("pack", str(project), "-t", "x/y:v1", home=tmp_path / "h")
    assert_one_line_error(proc, "missing.csv")


def test_no_kitfile(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = kitfs("pack", str(tmp_path / "empty"), "-t", "x/y:v1", home=tmp_path / "h")
    assert_one_line_error(proc, "no Kitfile")


@pytest.mark.parametrize("ref", ["Reg.io/UPPER:v1", "reg.io/x:-bad", "reg.io/x@sha256:12"])
def test_bad_reference(ref: str, tmp_path: Path) -> None:
    assert_one_line_error(kitfs("inspect", ref, home=tmp_path / "h"), ref.split("/")[0][:3])


def test_unreachable_registry_reported_within_seconds(project: Path, tmp_path: Path) -> None:
    ref = f"127.0.0.1:{free_port()}/nobody/home:v1"
    start = time.monotonic()
    proc = kitfs("inspect", ref, home=tmp_path / "h")
    assert_one_line_error(proc, "127.0.0.1")
    proc = kitfs("pack", str(project), "-t", ref, home=tmp_path / "h")
    assert_one_line_error(proc, "127.0.0.1")
    assert time.monotonic() - start < 20


def test_missing_tag(registry: RegistryServer, tmp_path: Path) -> None:
    proc = kitfs("inspect", f"{registry.host}/never/pushed:v1", home=tmp_path / "h")
    assert_one_line_error(proc, "never/pushed")


def test_auth_registry_login_pack_logout(
    auth_registry: RegistryServer, project: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    host = auth_registry.host
    ref = f"{host}/secure/tiny:v1"

    assert_one_line_error(kitfs("pack", str(project), "-t", ref, home=home), host)

    wrong = kitfs("login", host, "-u", "kitfs", "--password-stdin", home=home, stdin="nope\n")
    assert_one_line_error(wrong, host)
    assert not (home / "credentials.json").exists()

    ok = kitfs("login", host, "-u", "kitfs", "--password-stdin", home=home,
               stdin="s3cret-pw\n")
    assert ok.returncode == 0, ok.stderr
    creds = json.loads((home / "credentials.json").read_text())
    assert host in creds["auths"]
    assert (home / "credentials.json").stat().st_mode & 0o077 == 0

    packed = kitfs("pack", str(project), "-t", ref, home=home)
    assert packed.returncode == 0, packed.stderr
    listing = kitfs("ls", ref, home=home)
    assert listing.returncode == 0 and "model/model.safetensors" in listing.stdout

    out = kitfs("logout", host, home=home)
    assert out.returncode == 0
    assert_one_line_error(kitfs("inspect", ref, home=home), host)


def test_output_into_a_closed_pipe_is_quiet(tmp_path: Path, project: Path) -> None:
    import subprocess
    import sys

    rows = project / "data" / "rows"
    rows.mkdir()
    for i in range(1500):  # a listing far bigger than a pipe's buffer
        (rows / f"row-{i:05d}.txt").write_text("x")
    kitfile = project / "Kitfile"
    kitfile.write_text(kitfile.read_text().replace("./data/train.csv", "./data"))
    home = tmp_path / "h"
    assert kitfs("pack", str(project), "-t", "pipe/test:v1", home=home).returncode == 0
    proc = subprocess.run(
        f"{sys.executable} -m kitfs.cli ls pipe/test:v1 --json --config {home} | head -c 1",
        shell=True, capture_output=True, text=True, timeout=60)
    assert proc.stdout == "["
    assert proc.stderr == ""  # no "internal error: BrokenPipeError"


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _code_layer(names: list[str]) -> bytes:
    """A tar layer for `./src` whose files have these names, written as given (PAX headers
    carry names that are not UTF-8 as their raw bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      errors="surrogateescape") as tar:
        top = tarfile.TarInfo("src")
        top.type, top.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(top)
        for name in names:
            entry = tarfile.TarInfo(name)
            entry.size, entry.mode = 6, 0o644
            tar.addfile(entry, io.BytesIO(b"hello\n"))
    return buf.getvalue()


def push_code_kit(registry: RegistryServer, ref: str, names: list[str]) -> str:
    """Push a ModelKit by hand (as `kit` lays it out) with one code layer holding `names`."""
    layer = _code_layer(names)
    config = json.dumps({"manifestVersion": "1.0.0", "package": {}, "code": [
        {"path": "./src", "digest": _sha(layer), "diffId": _sha(layer)}]},
        separators=(",", ":")).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": mt.KITOPS_ARTIFACT_TYPE,
        "config": {"mediaType": mt.KITOPS_CONFIG, "digest": _sha(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.kitops.modelkit.code.v1.tar",
                    "digest": _sha(layer), "size": len(layer)}],
    }).encode()
    repo, _, tag = ref.partition("/")[2].partition(":")

    async def push() -> None:
        async with RegistryClient(registry.host) as c:
            await c.push_blob_bytes(repo, _sha(layer), layer)
            await c.push_blob_bytes(repo, _sha(config), config)
            await c.put_manifest(repo, tag, manifest, OCI_MANIFEST)

    trio.run(push)
    return ref


def strict_utf8_kitfs(*args: str, home: Path) -> subprocess.CompletedProcess[bytes]:
    """`kitfs` with a stdout that refuses what UTF-8 cannot encode, as a UTF-8 terminal's
    does (under the C locale Python lets surrogates through and hides the failure)."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    return subprocess.run([sys.executable, "-m", "kitfs.cli", *args, "--config", str(home)],
                          capture_output=True, env=env, timeout=60)


@pytest.mark.parametrize("bad", ["src/../../etc/passwd", "/etc/passwd", "../outside"])
def test_ls_of_a_layer_with_an_entry_outside_it_is_one_line(
    registry: RegistryServer, tmp_path: Path, bad: str
) -> None:
    name = hashlib.sha256(bad.encode()).hexdigest()[:8]
    ref = push_code_kit(registry, f"{registry.host}/bad/names-{name}:v1", ["src/ok.txt", bad])
    for command in (["ls"], ["ls", "-l"], ["ls", "--json"]):
        proc = kitfs(*command, ref, home=tmp_path / "h")
        line = assert_one_line_error(proc, "tar entry", bad)
        assert proc.returncode == 1 and "internal error" not in line


def test_ls_shows_names_that_are_not_utf8_or_hold_control_characters(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """Names are shown escaped, one per line, whatever the terminal's encoding: not
    UTF-8 as \\xNN, control characters (a newline, a terminal escape) as \\n, \\x1b."""
    ref = push_code_kit(registry, f"{registry.host}/bad/names-bytes:v1",
                        ["src/caf\udce9.bin", "src/two\nlines.txt", "src/\x1b[31mred.txt",
                         "src/ünïcødé.txt"])
    for command in (["ls"], ["ls", "-l"]):
        proc = strict_utf8_kitfs(*command, ref, home=tmp_path / "h")
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout.decode("utf-8")
        lines = out.splitlines()
        assert any(line.endswith("src/caf\\xe9.bin") for line in lines), out
        assert any(line.endswith("src/two\\nlines.txt") for line in lines), out
        assert any(line.endswith("src/\\x1b[31mred.txt") for line in lines), out
        assert any(line.endswith("src/ünïcødé.txt") for line in lines), out
        assert "\x1b" not in out and "4 files" not in out and "5 files" in out
    ascii_only = subprocess.run(
        [sys.executable, "-m", "kitfs.cli", "ls", ref, "--config", str(tmp_path / "h")],
        capture_output=True, env={**os.environ, "PYTHONIOENCODING": "ascii"}, timeout=60)
    assert ascii_only.returncode == 0, ascii_only.stderr
    assert b"src/\\xfcn\\xefc\\xf8d\\xe9.txt" in ascii_only.stdout
    proc = strict_utf8_kitfs("ls", "--json", ref, home=tmp_path / "h")
    assert proc.returncode == 0, proc.stderr
    paths = {entry["path"] for entry in json.loads(proc.stdout)}
    # JSON keeps the exact name: a Python reader gets the bytes back with os.fsencode
    assert "src/caf\udce9.bin" in paths and "src/two\nlines.txt" in paths
