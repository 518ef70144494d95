"""kit's local-storage verbs through the real command line: pull, push, tag, list, remove.

Against real Distribution registries (tests/registry.py) and ModelKits packed by
`kitfs pack`; what lands on disk is compared with what kit writes
(pkg/lib/repo/local), what push sends is read back by skopeo, an independent
OCI client.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from crafted import build_tar, craft_layer, publish_kit
from faultproxy import FaultProxy, Slow

from helpers import kitfs, make_project, ok, one_line_error, source_files
from kitfs.units import kit_bytes
from registry import RegistryServer, running_registry

pytestmark = pytest.mark.registry

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TOC = "dev.kitfs.toc.digest"




def pack(project: Path, ref: str, home: Path) -> str:
    """`kitfs pack`; the manifest digest."""
    return ok(kitfs("pack", str(project), "-t", ref, home=home)).strip().rsplit("@", 1)[1]


def key(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode()


def storage(home: Path) -> Path:
    return home / "storage"


def blob(home: Path, digest: str) -> Path:
    return storage(home) / "blobs" / "sha256" / digest.split(":", 1)[1]


def registry_manifest(host: str, repo: str, ref: str) -> bytes:
    request = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{ref}",
                                     headers={"Accept": OCI_MANIFEST})
    with urllib.request.urlopen(request, timeout=10) as response:
        body: bytes = response.read()
    return body


def needed_blobs(manifest: bytes) -> dict[str, int]:
    doc = json.loads(manifest)
    found = {d["digest"]: d["size"] for d in [doc["config"], *doc["layers"]]}
    toc = (doc.get("annotations") or {}).get(TOC)
    if toc:
        found[toc] = -1
    return found


def stored_blobs(home: Path) -> set[str]:
    root = storage(home) / "blobs" / "sha256"
    return {f"sha256:{p.name}" for p in root.iterdir()} if root.is_dir() else set()


# -- pull --------------------------------------------------------------------------------------


def test_pull_stores_as_kit_and_works_offline(tmp_path: Path) -> None:
    """kit's layout byte for byte, nothing fetched twice, and every local reader (inspect,
    ls, info, list, a mount) working with the registry gone."""
    project = make_project(tmp_path / "tiny", weight_bytes=3 << 20)
    home = tmp_path / "home"
    with running_registry(tmp_path / "registry") as reg:
        ref = f"{reg.host}/team/tiny:v1"
        digest = pack(project, ref, tmp_path / "packer")
        out = ok(kitfs("pull", ref, home=home))
        assert out.splitlines()[-1] == f"{reg.host}/team/tiny@{digest}"
        again = ok(kitfs("pull", ref, home=home))
        assert "0 B fetched" in again, again
        manifest = registry_manifest(reg.host, "team/tiny", "v1")
    # The registry is gone from here on.

    root = storage(home)
    desc = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest)}
    desc_json = json.dumps(desc, separators=(",", ":"))
    name = f"{reg.host}/team/tiny"
    # kit's localIndex.save and tagsIndex.save (json.Marshal), oras' index.json.
    assert (root / f"{key(name)}-index.json").read_text() == (
        '{"schemaVersion":2,"manifests":[' + desc_json + "]}")
    assert (root / f"{key(name)}-tags.json").read_text() == '{"v1":' + desc_json + "}"
    assert json.loads((root / "index.json").read_bytes()) == {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [desc]}
    assert (root / "oci-layout").read_bytes() == b'{"imageLayoutVersion":"1.0.0"}'
    wanted = {digest: len(manifest), **needed_blobs(manifest)}
    assert stored_blobs(home) == set(wanted), "config, layers, manifest and the kitfs TOC"
    for d, size in wanted.items():
        data = blob(home, d).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == d
        assert size in (-1, len(data))
        assert blob(home, d).stat().st_mode & 0o777 == 0o600, "kit pull's mode"
    assert not any((root / "ingest").iterdir()), "no download left behind"

    # Offline: local storage first, as kit inspect/unpack do.
    shown = ok(kitfs("inspect", ref, home=home))
    assert digest in shown and "kitfs table of contents" in shown
    listing = ok(kitfs("ls", ref, home=home))
    for rel in source_files(project):
        assert rel.split("/")[-1] in listing, rel
    assert "name: tiny" in ok(kitfs("info", ref, home=home))
    rows = ok(kitfs("list", home=home)).splitlines()
    assert rows[1].split() == [name, "v1", "Ada", "tiny",
                               *kit_bytes(sum(json.loads(manifest)["layers"][i]["size"]
                                              for i in range(3))).split(), digest]
    line = one_line_error(kitfs("inspect", "--remote", ref, "--timeout", "2", home=home))
    assert reg.host in line

    ok(kitfs("tag", ref, "tiny:v1", home=home))
    assert digest in ok(kitfs("inspect", "tiny:v1", home=home))
    if not Path("/dev/fuse").exists() or shutil.which("fusermount3") is None:
        return
    from mounting import mounted

    for mount_ref in ("tiny:v1", ref):  # a pulled registry name is served from disk too
        with mounted(mount_ref, tmp_path / "mnt", tmp_path / "cache", "--timeout", "2",
                     home=home) as mnt:
            for rel, sha in source_files(project).items():
                assert hashlib.sha256((mnt / rel).read_bytes()).hexdigest() == sha, rel


def test_killed_pull_leaves_no_partial_blob_and_resumes(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """kill -9 mid-download: no blob under its final name is partial, nothing is listed;
    the rerun asks only for the bytes that were missing (a Range from where it stopped)."""
    project = make_project(tmp_path / "big", weight_bytes=24 << 20)
    digest = pack(project, f"{registry.host}/resume/big:v1", tmp_path / "packer")
    manifest = registry_manifest(registry.host, "resume/big", "v1")
    model = json.loads(manifest)["layers"][0]
    home = tmp_path / "home"
    with FaultProxy(registry.host) as proxy:
        ref = f"{proxy.host}/resume/big:v1"
        slow = proxy.add(Slow(4 << 20), path=model["digest"])
        cmd = [sys.executable, "-m", "kitfs.cli", "pull", ref, "--config", str(home)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ingest = storage(home) / "ingest" / model["digest"].split(":")[1]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
                not ingest.exists() or ingest.stat().st_size < 8 << 20):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        partial = ingest.stat().st_size
        assert 0 < partial < model["size"]
        assert not blob(home, model["digest"]).exists()
        for path in (storage(home) / "blobs" / "sha256").iterdir():
            assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == \
                f"sha256:{path.name}", "a blob under its final name is always whole"
        assert "REPOSITORY" in ok(kitfs("list", home=home))
        assert len(ok(kitfs("list", home=home)).splitlines()) == 1, "nothing listed yet"

        proxy.remove(slow)
        before = len(proxy.requests("GET", model["digest"]))
        out = ok(kitfs("pull", ref, home=home))
        assert out.splitlines()[-1].endswith(digest)
        gets = proxy.requests("GET", model["digest"])[before:]
        assert [g.range for g in gets] == [f"bytes={partial}-"], gets
        assert sum(g.sent for g in gets) <= model["size"] - partial + 4096
    data = blob(home, model["digest"]).read_bytes()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == model["digest"]
    assert not ingest.exists()


def test_a_damaged_download_is_thrown_away(registry: RegistryServer, tmp_path: Path) -> None:
    """Bytes left in an ingest file that do not fit the digest are not trusted: the blob
    is fetched whole again and stored only once it matches."""
    project = make_project(tmp_path / "p", weight_bytes=1 << 20)
    ref = f"{registry.host}/resume/damaged:v1"
    pack(project, ref, tmp_path / "packer")
    model = json.loads(registry_manifest(registry.host, "resume/damaged", "v1"))["layers"][0]
    home = tmp_path / "home"
    ingest = storage(home) / "ingest" / model["digest"].split(":")[1]
    ingest.parent.mkdir(parents=True)
    ingest.write_bytes(os.urandom(model["size"] // 2))
    ok(kitfs("pull", ref, home=home))
    data = blob(home, model["digest"]).read_bytes()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == model["digest"]
    assert not ingest.exists()


async def test_pull_follows_parent_modelkits(registry: RegistryServer, tmp_path: Path) -> None:
    """A Kitfile whose model.path names another ModelKit has it pulled too (stored under
    its own name, where unpack and mount look for it); a cycle is one line."""
    base = f"{registry.host}/parents/base:v1"
    base_digest = pack(make_project(tmp_path / "base", weight_bytes=64 << 10), base,
                       tmp_path / "packer")
    docs = craft_layer(build_tar([("README.md", b"child\n")]), kind="docs", path="./README.md")

    def kitfile(parent: str) -> dict[str, object]:
        return {"manifestVersion": "1.0.0", "package": {"name": "child"},
                "model": {"path": parent}, "docs": [{"path": "./README.md"}]}

    child = await publish_kit(registry.host, "parents/child", "v1", [docs], kitfile(base))
    home = tmp_path / "home"
    out = ok(kitfs("pull", child, home=home))
    assert f"pulled parent {base}" in out
    names = [row.split()[0] for row in ok(kitfs("list", home=home)).splitlines()[1:]]
    assert names == [f"{registry.host}/parents/base", f"{registry.host}/parents/child"]
    assert base_digest in ok(kitfs("inspect", base, "--timeout", "2", home=home))

    loop = f"{registry.host}/parents/loop:v1"
    await publish_kit(registry.host, "parents/loop", "v1", [docs], kitfile(loop))
    line = one_line_error(kitfs("pull", loop, home=tmp_path / "home2"))
    assert "found cycle in modelkit references" in line


# -- push --------------------------------------------------------------------------------------


def test_push_keeps_the_digest_and_skopeo_reads_it(
    registry: RegistryServer, tmp_path: Path
) -> None:
    project = make_project(tmp_path / "p", weight_bytes=2 << 20)
    source = f"{registry.host}/push/source:v1"
    digest = pack(project, source, tmp_path / "packer")
    home = tmp_path / "home"
    ok(kitfs("pull", source, home=home))
    local = blob(home, digest).read_bytes()

    # Pulled, then pushed to another repository of the same registry: the blobs are
    # mounted from where they came, the manifest is the same bytes.
    dest = f"{registry.host}/push/copy:v2"
    out = ok(kitfs("push", source, dest, home=home))
    assert out.splitlines()[-1] == f"{dest}@{digest}"
    assert "0 B uploaded" in out, out
    assert registry_manifest(registry.host, "push/copy", "v2") == local

    # Packed into local storage, tagged with a registry's name, pushed with one argument.
    packed = pack(project, "mine/tiny:v1", home)
    assert packed == digest, "the same directory packs to the same ModelKit"
    ok(kitfs("tag", "mine/tiny:v1", f"{registry.host}/push/tagged:v1,latest", home=home))
    out = ok(kitfs("push", f"{registry.host}/push/tagged:v1", home=home))
    assert out.splitlines()[-1] == f"{registry.host}/push/tagged:v1@{digest}"
    remote = ok(kitfs("inspect", "--remote", f"{registry.host}/push/copy:v2", home=home))
    assert "kitfs table of contents" in remote, "the TOC went along and mounts use it"

    skopeo = shutil.which("skopeo")
    if skopeo is None:
        pytest.skip("skopeo is not installed (scripts/setup installs it)")
    raw = subprocess.run([skopeo, "inspect", "--raw", "--tls-verify=false",
                          f"docker://{dest}"], capture_output=True, timeout=60, check=True).stdout
    assert raw == local and "sha256:" + hashlib.sha256(raw).hexdigest() == digest
    target = tmp_path / "skopeo-dir"
    subprocess.run([skopeo, "copy", "--src-tls-verify=false", f"docker://{dest}",
                    f"dir:{target}"], capture_output=True, timeout=120, check=True)
    assert (target / "manifest.json").read_bytes() == local
    for d, size in needed_blobs(local).items():
        if size < 0:
            continue  # the TOC hangs off an annotation: kit and skopeo ignore it
        copied = (target / d.split(":")[1]).read_bytes()
        assert len(copied) == size and "sha256:" + hashlib.sha256(copied).hexdigest() == d


# -- tag, list, remove -------------------------------------------------------------------------


def test_tag_list_remove_round_trip(registry: RegistryServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    project = make_project(tmp_path / "p", weight_bytes=256 << 10)
    v1 = pack(project, "rt/model:v1", home)
    (project / "model" / "model.safetensors").write_bytes(os.urandom(300 << 10))
    v2 = pack(project, "rt/model:v2", home)
    v1_blobs = needed_blobs(blob(home, v1).read_bytes())
    v2_blobs = needed_blobs(blob(home, v2).read_bytes())

    ok(kitfs("tag", "rt/model:v1", "rt/model:stable,prod", home=home))
    ok(kitfs("tag", "rt/model:v1", "rt/other:x", home=home))
    table = ok(kitfs("list", home=home)).splitlines()
    header = table[0]
    assert header.split() == ["REPOSITORY", "TAG", "MAINTAINER", "NAME", "SIZE", "DIGEST"]
    # Go's tabwriter: every column as wide as its widest cell plus 3 spaces.
    columns = [m.start() for m in re.finditer(r"\S+", header)]
    for row in table[1:]:
        assert [row[c - 1] == " " for c in columns[1:]] == [True] * 5, row
    rows = [row.split() for row in table[1:]]
    ordered = sorted([v1, v2])
    v1_rows = [["rt/model", t, "Ada", "tiny"] for t in ("prod", "stable", "v1")]
    v2_rows = [["rt/model", "v2", "Ada", "tiny"]]
    expected = (v1_rows + v2_rows) if ordered[0] == v1 else (v2_rows + v1_rows)
    assert [r[:4] for r in rows] == [*expected, ["rt/other", "x", "Ada", "tiny"]]
    assert rows[-1][-1] == v1
    records = json.loads(ok(kitfs("list", "--format", "json", home=home)))
    assert [r["tags"] for r in records] == [
        ["prod", "stable", "v1"] if r["digest"] == v1 else ["v2"] for r in records[:2]
    ] + [["x"]]
    assert set(records[0]) == {"repo", "digest", "tags", "modelName", "size", "author"}
    only = ok(kitfs("list", "rt/model:v2", "--format", "{{ .Repo }} {{ .Tags }}", home=home))
    assert only == "rt/model [v2]\n"

    # By tag with other tags left: only the tag goes.
    assert f"Removed rt/model:stable (digest {v1})" in ok(kitfs("remove", "rt/model:stable",
                                                               home=home))
    assert blob(home, v1).exists()
    # The last tags: rt/model forgets the manifest, rt/other still lists it, blobs stay.
    ok(kitfs("remove", "rt/model:v1,prod", home=home))
    assert set(v1_blobs) <= stored_blobs(home)
    line = one_line_error(kitfs("remove", "rt/model:v1", home=home), 1)
    assert "rt/model:v1 is not in kit's local storage" in line
    # The last repository: the manifest and the blobs only it needed go.
    ok(kitfs("remove", "rt/other:x", home=home))
    assert stored_blobs(home) == {v2, *v2_blobs}
    assert not (storage(home) / f"{key('localhost/rt/other')}-index.json").exists()

    # An untagged ModelKit (pulled by digest) goes with -a; -a -f takes the rest.
    remote = f"{registry.host}/rt/remote"
    pushed = pack(project, f"{remote}:v9", tmp_path / "packer")
    ok(kitfs("pull", f"{remote}@{pushed}", home=home))
    untagged_row = [r.split() for r in ok(kitfs("list", home=home)).splitlines()
                    if r.startswith(remote)]
    assert untagged_row == [[remote, "<none>", "Ada", "tiny", *untagged_row[0][4:6], pushed]]
    untagged = [r for r in json.loads(ok(kitfs("list", "--format", "json", home=home)))
                if r["tags"] is None]
    assert [r["digest"] for r in untagged] == [pushed]
    out = ok(kitfs("remove", "--all", home=home))
    assert out == f"Removed {remote}@{pushed}\n"
    assert len(ok(kitfs("list", home=home)).splitlines()) == 2, "v2 is tagged: kept"
    out = ok(kitfs("remove", "-a", "-f", home=home))
    assert out.splitlines() == ["Untagged rt/model:v2", f"Removed rt/model@{v2}"]
    assert stored_blobs(home) == set()
    assert [p.name for p in storage(home).iterdir() if p.name.endswith(".json")] == [
        "index.json"]
    assert json.loads((storage(home) / "index.json").read_bytes())["manifests"] == []


def test_list_and_remove_a_registry_repository(registry: RegistryServer, tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", weight_bytes=128 << 10)
    repo = f"{registry.host}/remote/list"
    v1 = pack(project, f"{repo}:v1,latest", tmp_path / "packer")
    (project / "README.md").write_text("# v2\n")
    v2 = pack(project, f"{repo}:v2", tmp_path / "packer")
    home = tmp_path / "home"

    rows = [r.split() for r in ok(kitfs("list", repo, home=home)).splitlines()[1:]]
    # every tag, not the `sha256-<hex>` referrers tags pack made (not ModelKits)
    assert sorted((r[0], r[1], r[-1]) for r in rows) == [
        ("remote/list", "latest", v1), ("remote/list", "v1", v1), ("remote/list", "v2", v2)]
    records = json.loads(ok(kitfs("list", f"{repo}:v2", "--format", "json", home=home)))
    assert [(r["tags"], r["digest"], r["modelName"]) for r in records] == [(["v2"], v2, "tiny")]

    out = ok(kitfs("remove", "--remote", f"{repo}:v1", home=home))
    assert out == f"Removed {repo}:v1 (digest {v1})\n"
    tags = json.loads(urllib.request.urlopen(
        f"http://{registry.host}/v2/remote/list/tags/list", timeout=10).read())["tags"]
    assert sorted(tags) == ["sha256-" + v2.split(":")[1], "v2"], \
        "v1, latest and v1's referrers tag are gone"
    line = one_line_error(kitfs("remove", "-r", f"{repo}:v1", home=home), 1)
    assert "not found" in line


# -- errors ------------------------------------------------------------------------------------


def test_bad_input_is_one_line(registry: RegistryServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    dead = "127.0.0.1:1/x/y:v1"
    cases = [
        (("pull", "mymodel:v1"), 2, "registry is required when pulling"),
        (("pull", "Bad/Ref:v1"), 2, "must be lowercase"),
        (("pull", f"{registry.host}/a:v1,v2"), 2, "multiple tags"),
        (("pull", dead, "--timeout", "2"), 1, "cannot connect"),
        (("pull", f"{registry.host}/nothing/here:v1"), 1, "not found"),
        (("push", "mymodel:v1"), 2, "registry is required when pushing"),
        (("push", "mymodel:v1", f"{registry.host}/x:v1"), 1, "not in kit's local storage"),
        (("tag", "nope:v1", "other:v1"), 1, "nope:v1 is not in kit's local storage"),
        (("tag", "nope:v1", "other@sha256:" + "0" * 64), 2, "cannot tag with a digest"),
        (("list", dead.rsplit(":", 1)[0], "--timeout", "2"), 1, "cannot connect"),
        (("list", "--format", "{{ .Nope }}"), 2, "unknown field"),
        (("remove",), 2, "modelkit is required"),
        (("remove", "-a", "x:v1"), 2, "should not be specified"),
        (("remove", "-r", "-a"), 2, "cannot use --all or --force with --remote"),
        (("remove", "gone:v1"), 1, "gone:v1 is not in kit's local storage"),
        (("remove", "-r", dead, "--timeout", "2"), 1, "cannot connect"),
        (("pull", "--concurrency", "0", dead), 2, "concurrency"),
    ]
    for args, code, text in cases:
        line = one_line_error(kitfs(*args, home=home), code)
        assert text in line, (args, line)


def test_a_full_disk_is_one_line_and_the_next_pull_completes(
    registry: RegistryServer, tmp_path: Path
) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    project = make_project(tmp_path / "p", weight_bytes=6 << 20)
    ref = f"{registry.host}/full/disk:v1"
    digest = pack(project, ref, tmp_path / "packer")
    home = tmp_path / "home"
    home.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(home)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        line = one_line_error(kitfs("pull", ref, home=home), 1)
        assert "No space left on device" in line, line
        for path in (storage(home) / "blobs" / "sha256").iterdir():
            assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == \
                f"sha256:{path.name}"
        subprocess.run(["mount", "-o", "remount,size=32m", str(home)], check=True)
        assert ok(kitfs("pull", ref, home=home)).splitlines()[-1].endswith(digest)
    finally:
        subprocess.run(["umount", "-l", str(home)], capture_output=True)
