"""`mount -t fuse.kitfs` and fstab lines, through the real mount(8), umount(8) and FUSE.

mount(8) looks for its helper only at /sbin/mount.fuse.kitfs, so a session
fixture puts a small wrapper there that runs this checkout's helper with this
interpreter (no `scripts/setup` needed), and puts back whatever was there.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import kitfs, make_project, ok, one_line_error, source_files
from kitfs.errors import UsageError
from kitfs.mounthelper import kitfs_mount_argv, split_options
from kitfs.mounts import (
    find_mount,
    kept_log_path,
    log_path,
    process_start_time,
    read_state,
    state_path,
)
from registry import RegistryServer

HELPER = Path("/sbin/mount.fuse.kitfs")
REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.fuse,
    # /sbin/mount.fuse.kitfs is one file for the whole machine: one worker installs it
    pytest.mark.xdist_group("mount-helper"),
    pytest.mark.skipif(
        not os.path.exists("/dev/fuse") or shutil.which("mount") is None or os.geteuid() != 0,
        reason="needs /dev/fuse, util-linux mount and root (to write /sbin/mount.fuse.kitfs)",
    ),
]


#: Names the wrapper below: one left by a run that was killed is replaced, not refused.
WRAPPER_MARK = "written by tests/test_mount_helper.py"


@pytest.fixture(scope="session")
def helper_installed() -> Iterator[Path]:
    """/sbin/mount.fuse.kitfs running this checkout with this Python, for the session."""
    saved: str | None = None
    if HELPER.is_symlink():
        saved = os.readlink(HELPER)
    elif HELPER.exists() and WRAPPER_MARK not in HELPER.read_text(errors="replace"):
        pytest.fail(f"{HELPER} is a file this test would overwrite; move it away first")
    wrapper = (
        f"#!/bin/sh\n# {WRAPPER_MARK}; removed when the tests end\n"
        f'PYTHONPATH="{REPO}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{sys.executable}" '
        '-m kitfs.mounthelper "$@"\n'
    )
    tmp = HELPER.with_name(f".{HELPER.name}.{os.getpid()}")
    tmp.write_text(wrapper)
    tmp.chmod(0o755)
    os.replace(tmp, HELPER)
    try:
        yield HELPER
    finally:
        HELPER.unlink(missing_ok=True)
        if saved is not None:
            HELPER.symlink_to(saved)


@dataclass
class Kit:
    ref: str
    project: Path
    home: Path
    files: dict[str, str]


@pytest.fixture(scope="module")
def kit(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> Kit:
    root = tmp_path_factory.mktemp("helper-kit")
    project = make_project(root / "proj", weight_bytes=1 << 20)
    home = root / "home"
    home.mkdir()
    ref = f"{registry.host}/helper/tiny:v1"
    ok(kitfs("pack", str(project), "-t", ref, home=home))
    return Kit(ref, project, home, source_files(project))


def run(*cmd: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env)


@pytest.fixture
def mountpoint(tmp_path: Path, helper_installed: Path) -> Iterator[Path]:
    """An empty directory; whatever a test left mounted there is taken down after it."""
    path = tmp_path / "mnt"
    path.mkdir()
    try:
        yield path
    finally:
        state = read_state(path)
        if find_mount(path) is not None:
            run("umount", "-l", str(path))
        if state is not None and process_start_time(state.pid) is not None:
            os.kill(state.pid, signal.SIGKILL)
        for left in (state_path(path), log_path(path), kept_log_path(path)):
            left.unlink(missing_ok=True)  # a failed start keeps its log, for the user


def wait_gone(pid: int) -> bool:
    """The daemon has exited: umount(8) returns once the kernel mount is gone, and the
    daemon notices that a moment later. Bounded, so a daemon that stays fails the test."""
    deadline = time.monotonic() + 30
    while process_start_time(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def model_files(kit: Kit) -> dict[str, str]:
    return {f: d for f, d in kit.files.items() if f.startswith("model/")}


def seen_files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


def findmnt(path: Path) -> dict[str, str]:
    out = ok(run("findmnt", "--json", "-o", "TARGET,SOURCE,FSTYPE,OPTIONS", str(path)))
    fs: dict[str, str] = json.loads(out)["filesystems"][0]
    return fs


# -- the real mount(8) --------------------------------------------------------------


def test_mount_t_fuse_kitfs_serves_files_and_plain_umount_ends_the_daemon(
    kit: Kit, mountpoint: Path, tmp_path: Path,
) -> None:
    proc = run("mount", "-t", "fuse.kitfs", kit.ref, str(mountpoint), "-o",
               f"cache_dir={tmp_path / 'cache'},filter=model,prefetch=none,allow_other")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""  # as quiet as any mount

    # mount returned with the files there: no waiting
    assert seen_files(mountpoint) == model_files(kit)
    fs = findmnt(mountpoint)
    assert fs["fstype"] == "fuse.kitfs" and fs["source"] == kit.ref
    options = fs["options"].split(",")
    assert {"ro", "nosuid", "nodev", "allow_other"} <= set(options)
    state = read_state(mountpoint)
    assert state is not None and state.alive and state.filters == ["model"]
    assert state.cache_dir == str(tmp_path / "cache")
    assert "mounted" in ok(kitfs("status", str(mountpoint)))

    # plain umount(8), not kitfs umount: the daemon sees the kernel unmount and goes
    ok(run("umount", str(mountpoint)))
    assert wait_gone(state.pid)
    assert find_mount(mountpoint) is None
    assert not state_path(mountpoint).exists()
    assert "no kitfs mount" in one_line_error(kitfs("status", str(mountpoint)))
    assert not log_path(mountpoint).exists()  # a clean end leaves no log


def test_lazy_umount_lets_an_open_file_finish_then_the_daemon_goes(
    kit: Kit, mountpoint: Path, tmp_path: Path,
) -> None:
    ok(run("mount", "-t", "fuse.kitfs", kit.ref, str(mountpoint), "-o",
           f"cache_dir={tmp_path / 'cache'},prefetch=none"))
    state = read_state(mountpoint)
    assert state is not None
    with (mountpoint / "model" / "model.safetensors").open("rb") as f:
        head = f.read(4096)
        assert run("umount", str(mountpoint)).returncode != 0  # busy: a plain umount refuses
        ok(run("umount", "-l", str(mountpoint)))
        assert find_mount(mountpoint) is None
        data = head + f.read()  # the detached mount still serves the open file
        assert process_start_time(state.pid) is not None
    assert hashlib.sha256(data).hexdigest() == kit.files["model/model.safetensors"]
    assert wait_gone(state.pid)  # last file closed: the kernel ends the session
    assert not state_path(mountpoint).exists()


def test_fstab_line_mounts_with_mount_a_and_again_is_a_no_op(
    kit: Kit, mountpoint: Path, tmp_path: Path,
) -> None:
    fstab = tmp_path / "fstab"
    # filter="..." keeps kit's commas from fstab's; + is the other way to write one
    fstab.write_text(
        "# a comment line\n"
        f"{kit.ref} {mountpoint} fuse.kitfs "
        f'ro,_netdev,nofail,x-systemd.automount,cache_dir={tmp_path / "cache"},'
        f'filter="model,docs",filter=datasets+code,prefetch=model,verify=strict,timeout=20,'
        f"config={kit.home} 0 0\n"
    )
    ok(run("mount", "--fstab", str(fstab), str(mountpoint)))
    assert seen_files(mountpoint) == kit.files  # model, docs, datasets: all of it
    state = read_state(mountpoint)
    assert state is not None
    assert state.filters == ["model,docs", "datasets,code"]

    # the line is mounted: mount -a leaves it be (the source is the reference)
    ok(run("mount", "-a", "-T", str(fstab)))
    again = read_state(mountpoint)
    assert again is not None and again.pid == state.pid
    ok(run("umount", str(mountpoint)))
    assert wait_gone(state.pid) and not state_path(mountpoint).exists()

    ok(run("mount", "-a", "-T", str(fstab)))  # and mount -a mounts it
    assert seen_files(mountpoint) == kit.files
    ok(run("umount", str(mountpoint)))


def test_rw_is_mount8s_default_and_the_mount_stays_read_only(
    kit: Kit, mountpoint: Path, tmp_path: Path,
) -> None:
    # mount(8) passes `rw` to every helper unless `ro` is given, so it cannot be refused
    ok(run("mount", "-t", "fuse.kitfs", "-o", f"rw,cache_dir={tmp_path / 'cache'}",
           kit.ref, str(mountpoint)))
    assert "ro" in findmnt(mountpoint)["options"].split(",")
    with pytest.raises(OSError) as info:
        (mountpoint / "new.txt").write_text("x")
    assert info.value.errno == errno.EROFS
    ok(run("umount", str(mountpoint)))


def test_bare_environment_with_credentials_from_config(
    auth_registry: RegistryServer, mountpoint: Path, tmp_path: Path,
) -> None:
    """What systemd gives mount(8): PATH and little else (no HOME); credentials and the
    cache come from options."""
    home = tmp_path / "home"
    project = make_project(tmp_path / "proj", weight_bytes=64 << 10)
    ok(kitfs("login", auth_registry.host, "-u", "kitfs", "--password-stdin", home=home,
             stdin="s3cret-pw\n"))
    ref = f"{auth_registry.host}/private/tiny:v1"
    ok(kitfs("pack", str(project), "-t", ref, home=home))
    bare = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

    denied = run("mount", "-t", "fuse.kitfs", ref, str(mountpoint), "-o",
                 f"cache_dir={tmp_path / 'cache'}", env=bare)
    assert denied.returncode != 0 and "Traceback" not in denied.stderr
    assert find_mount(mountpoint) is None

    ok(run("mount", "-t", "fuse.kitfs", ref, str(mountpoint), "-o",
           f"cache_dir={tmp_path / 'cache'},config={home}", env=bare))
    seen = seen_files(mountpoint)
    assert seen.pop("Kitfile") and seen == source_files(project)
    state = read_state(mountpoint)
    assert state is not None and "s3cret" not in json.dumps(state.to_json())
    ok(run("umount", str(mountpoint)))


def test_defaults_under_systemds_bare_environment_are_roots() -> None:
    """No $HOME, no $KITOPS_HOME: root's kit home and the node's cache, as documented."""
    code = ("from kitfs.oci.credentials import kitops_home, docker_config_path\n"
            "from kitfs.mounts import default_cache_dir\n"
            "print(kitops_home()); print(docker_config_path()); print(default_cache_dir())")
    out = ok(run(sys.executable, "-c", code, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                  "PYTHONPATH": str(REPO)}))
    root = pwd.getpwuid(0).pw_dir
    assert out.split() == [f"{root}/.local/share/kitops", f"{root}/.docker/config.json",
                           "/var/cache/kitfs"]


def test_bad_input_is_one_line_and_nothing_is_mounted(
    kit: Kit, mountpoint: Path, tmp_path: Path,
) -> None:
    cache = f"cache_dir={tmp_path / 'cache'}"

    def mount(ref: str, options: str, *flags: str) -> str:
        proc = run("mount", *flags, "-t", "fuse.kitfs", ref, str(mountpoint), "-o", options)
        line = one_line_error(proc)
        assert find_mount(mountpoint) is None and not state_path(mountpoint).exists()
        return line

    assert "unknown mount option 'colour=blue'" in mount(kit.ref, f"{cache},colour=blue")
    assert "--prefetch" in mount(kit.ref, f"{cache},prefetch=sometimes")
    assert "needs a value" in mount(kit.ref, f"{cache},filter=")
    assert "filter" in mount(kit.ref, f"{cache},filter=weights")
    assert "credentials" in mount(kit.ref, f"{cache},proxy=http://u:pw@127.0.0.1:9")
    assert "noexec" in mount(kit.ref, f"{cache},noexec")
    assert "reference" in mount("Not A Reference!", cache).lower()
    assert "not found" in mount(kit.ref.replace(":v1", ":nope"), cache)
    # -s (sloppy): an unknown option is tolerated
    ok(run("mount", "-s", "-t", "fuse.kitfs", kit.ref, str(mountpoint), "-o",
           f"{cache},colour=blue"))
    ok(run("umount", str(mountpoint)))


def test_fake_mount_checks_but_mounts_nothing(
    kit: Kit, mountpoint: Path, tmp_path: Path,
) -> None:
    ok(run("mount", "-f", "-t", "fuse.kitfs", kit.ref, str(mountpoint), "-o",
           f"cache_dir={tmp_path / 'cache'},filter=model"))
    assert find_mount(mountpoint) is None and read_state(mountpoint) is None
    one_line_error(run("mount", "-f", "-t", "fuse.kitfs", kit.ref, str(mountpoint), "-o",
                       "memory=1k"))


def test_signature_options_are_enforced(kit: Kit, mountpoint: Path, tmp_path: Path) -> None:
    """fstab's signature_key=...,insecure_ignore_tlog: an unsigned ModelKit is not mounted."""
    from test_signatures_registry import keypair

    _, pub = keypair(tmp_path, "ecdsa")
    line = one_line_error(run("mount", "-t", "fuse.kitfs", kit.ref, str(mountpoint), "-o",
                              f"cache_dir={tmp_path / 'cache'},signature_key={pub},"
                              "insecure_ignore_tlog"))
    assert "refused, signature required by --signature-key" in line
    assert "no signatures found" in line
    assert find_mount(mountpoint) is None and read_state(mountpoint) is None


def test_verbose_says_what_was_mounted_and_kitfs_umount_works_too(
    kit: Kit, mountpoint: Path, tmp_path: Path,
) -> None:
    # by digest: `@` and `:` in the mount's source are fine
    digest = json.loads(ok(kitfs("inspect", "--json", kit.ref, home=kit.home)))["digest"]
    ref = kit.ref.removesuffix(":v1") + "@" + digest
    out = ok(run("mount", "-n", "-v", "-t", "fuse.kitfs", ref, str(mountpoint), "-o",
                 f"cache_dir={tmp_path / 'cache'}"))
    assert f"mounted {ref} at {mountpoint}" in out
    assert findmnt(mountpoint)["source"] == ref
    assert f"unmounted {mountpoint}" in ok(kitfs("umount", str(mountpoint)))
    assert find_mount(mountpoint) is None and not state_path(mountpoint).exists()


# -- the examples in systemd/ ---------------------------------------------------------


def test_fstab_example_lines_mount_as_written(kit: Kit, tmp_path: Path,
                                              helper_installed: Path) -> None:
    """systemd/fstab.example with its reference and paths swapped for this test's: the
    options a user copies work (x-systemd.automount is systemd's, taken out by mount)."""
    example = (REPO / "systemd" / "fstab.example").read_text()
    lines = [line.split() for line in example.splitlines() if line and not line.startswith("#")]
    assert len(lines) == 2 and all(fields[2] == "fuse.kitfs" for fields in lines)
    fstab = tmp_path / "fstab"
    points = []
    for i, (_, _, fstype, options, *rest) in enumerate(lines):
        point = tmp_path / f"mnt{i}"
        point.mkdir()
        points.append(point)
        options = options.replace("/var/cache/kitfs", str(tmp_path / "cache"))
        if "cache_dir=" not in options:
            options += f",cache_dir={tmp_path / 'cache'}"
        with fstab.open("a") as f:
            f.write(" ".join([kit.ref, str(point), fstype, options, *rest]) + "\n")
    try:
        ok(run("mount", "-a", "-T", str(fstab)))  # the noauto line stays unmounted
        assert find_mount(points[0]) is not None and find_mount(points[1]) is None
        assert seen_files(points[0]) == model_files(kit)
        ok(run("mount", "--fstab", str(fstab), str(points[1])))
        assert seen_files(points[1]) == {
            f: d for f, d in kit.files.items() if f.startswith("model/") or f == "README.md"}
    finally:
        for point in points:
            if find_mount(point) is not None:
                run("umount", str(point))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_mount_unit_example_is_valid() -> None:
    proc = run("systemd-analyze", "verify", "--man=no",
               str(REPO / "systemd" / "mnt-model.mount"))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


# -- option mapping (no mount) ------------------------------------------------------

FLAGS = frozenset({"--cache-dir", "--filter", "--proxy", "--allow-other", "--prefetch"})


def test_options_split_as_libmount_splits_them() -> None:
    assert split_options('rw,filter="model,docs:a,b",allow_other') == [
        "rw", "filter=model,docs:a,b", "allow_other"]
    assert split_options("ro,,x-systemd.automount") == ["ro", "x-systemd.automount"]
    with pytest.raises(UsageError, match="quote"):
        split_options('filter="model')


def test_options_map_to_kitfs_mount_flags() -> None:
    argv = kitfs_mount_argv(
        "r/x:v1", "/mnt/m",
        ["rw", "defaults", "_netdev", "comment=systemd.automount", "filter=model+docs",
         "allow_other", "proxy=http://proxy:3128"],
        known_flags=FLAGS)
    assert argv == ["mount", "r/x:v1", "/mnt/m", "--filter=model,docs", "--allow-other",
                    "--proxy=http://proxy:3128"]
    # '+' is a comma between type names only: names and paths keep theirs
    assert kitfs_mount_argv("r/x:v1", "/mnt/m", ["filter=model+code:src/c++/x.h"],
                            known_flags=FLAGS)[3:] == ["--filter=model,code:src/c++/x.h"]
    with pytest.raises(UsageError, match="has no --metrics-addr"):
        kitfs_mount_argv("r/x:v1", "/mnt/m", ["metrics_addr=127.0.0.1:9100"], known_flags=FLAGS)
    with pytest.raises(UsageError, match="allow_other"):
        kitfs_mount_argv("r/x:v1", "/mnt/m", ["allow_other=1"], known_flags=FLAGS)
    signed = kitfs_mount_argv(
        "r/x:v1", "/mnt/m", ["signature_identity=ci@example.com",
                             "signature_issuer=https://token.actions.githubusercontent.com",
                             "trusted_root=/etc/kitfs/trusted_root.json",
                             "insecure_ignore_tlog"],
        known_flags=FLAGS | {"--signature-identity", "--signature-issuer", "--trusted-root",
                             "--insecure-ignore-tlog"})
    assert signed[3:] == ["--signature-identity=ci@example.com",
                          "--signature-issuer=https://token.actions.githubusercontent.com",
                          "--trusted-root=/etc/kitfs/trusted_root.json",
                          "--insecure-ignore-tlog"]


def test_extra_tags_in_a_reference_cannot_reach_the_fuse_options(
    kit: Kit, mountpoint: Path, tmp_path: Path,
) -> None:
    """kit's references may carry extra tags after a comma; libfuse splits options at commas,
    so `repo:v1,suid` once dropped nosuid and `repo:v1,v2` could not mount at all."""
    for extra in ("suid", "dev"):
        proc = kitfs("mount", f"{kit.ref},{extra}", str(mountpoint), "--cache-dir",
                     str(tmp_path / "cache"), "--prefetch", "none", home=kit.home)
        assert proc.returncode == 0, proc.stderr
        try:
            fs = findmnt(mountpoint)
            assert fs["source"] == kit.ref
            assert {"ro", "nosuid", "nodev"} <= set(fs["options"].split(","))
            seen = seen_files(mountpoint)
            assert seen.pop("Kitfile") and seen == kit.files
        finally:
            ok(kitfs("umount", str(mountpoint)))


def test_a_value_starting_with_a_dash_stays_a_value() -> None:
    """`cache_dir=--allow-other` is a directory named so, not the switch (nor may it eat
    the next flag as its value)."""
    argv = kitfs_mount_argv("r/x:v1", "/mnt/m", ["cache_dir=--allow-other", "prefetch=none"],
                            known_flags=FLAGS)
    from kitfs.commands import mount

    parser = argparse.ArgumentParser()
    mount.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    assert args.cache_dir == "--allow-other" and not args.allow_other
    assert args.prefetch == "none"
