"""Bad input and hostile conditions: one clear line on stderr, non-zero exit, no traceback."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from helpers import kitfs, make_project
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
