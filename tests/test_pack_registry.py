"""pack -> push -> inspect/ls round trips against a real Distribution registry."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from helpers import LONG_NAME, kitfs, make_project, source_files
from kitfs.errors import IntegrityError
from kitfs.inspection import build_file_tree, inspect
from kitfs.modelkit import mediatypes as mt
from kitfs.modelkit.filters import FilterSet
from kitfs.modelkit.toc import TOC_ANNOTATION, TOC_ARTIFACT_TYPE
from kitfs.oci.client import ClientOptions, RegistryClient
from kitfs.oci.reference import parse_reference
from kitfs.oci.source import open_source
from registry import RegistryServer


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("proj") / "tiny")


def _pack(project: Path, ref: str, home: Path, *extra: str) -> str:
    proc = kitfs("pack", str(project), "-t", ref, *extra, home=home)
    assert proc.returncode == 0, proc.stderr
    digest_line = proc.stdout.strip().splitlines()[-1]
    return digest_line.rsplit("@", 1)[1]


async def _files_through_registry(ref: str) -> dict[str, str]:
    """Read every file of the tree with range requests and hash it."""
    source = open_source(parse_reference(ref), ClientOptions())
    try:
        ins = await inspect(source)
        tree = await build_file_tree(source, ins, FilterSet())
        out = {}
        for node in tree.files():
            if node.inline is not None:
                continue
            assert node.layer is not None
            data = await source.read_range(node.layer, node.offset, node.size) if node.size else b""
            out[node.path] = hashlib.sha256(data).hexdigest()
        return out
    finally:
        await source.aclose()


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
async def test_round_trip_every_byte_where_the_toc_says(
    registry: RegistryServer, project: Path, tmp_path: Path, compression: str
) -> None:
    ref = f"{registry.host}/roundtrip/{compression}:v1"
    digest = _pack(project, ref, tmp_path / "home", "--compression", compression)
    assert digest.startswith("sha256:")

    listing = kitfs("ls", ref, "--json")
    assert listing.returncode == 0, listing.stderr
    files = {e["path"]: e for e in json.loads(listing.stdout) if e["type"] == "file"}
    expected = source_files(project)
    assert set(files) == set(expected) | {"Kitfile"}
    assert f"model/nested/deeper/{LONG_NAME}" in files
    assert files["model/model.safetensors"]["size"] == 3 << 20

    if compression == "none":  # offsets are into the blob itself
        assert await _files_through_registry(ref) == expected


async def test_local_storage_ranges_read_both_ways(project: Path, tmp_path: Path) -> None:
    """A ModelKit in kit's local storage serves ranges as copies and into caller buffers."""
    home = tmp_path / "home"
    _pack(project, "org/local:v1", home)
    source = open_source(parse_reference("org/local:v1"), ClientOptions(kitops_home=str(home)))
    try:
        tree = await build_file_tree(source, await inspect(source), FilterSet())
        node = next(n for n in tree.files() if n.path == "model/model.safetensors")
        assert node.layer is not None
        whole = (project / node.path).read_bytes()
        assert await source.read_range(node.layer, node.offset + 5, 100) == whole[5:105]
        bufs = [bytearray(n) for n in (1, 1 << 20, 12345)]
        done: list[int] = []
        await source.read_range_into(
            node.layer, node.offset + 7, [memoryview(b) for b in bufs], done.append
        )
        assert b"".join(bufs) == whole[7 : 7 + sum(len(b) for b in bufs)]
        assert done == [0, 1, 2]
        size = node.offset + node.size + (1 << 20)  # past the end of the layer
        with pytest.raises(IntegrityError, match="shorter than expected"):
            await source.read_range_into(node.layer, size, [memoryview(bytearray(10))])
    finally:
        await source.aclose()


def test_inspect_shows_kitfile_layers_and_toc(
    registry: RegistryServer, project: Path, tmp_path: Path
) -> None:
    ref = f"{registry.host}/inspect/tiny:v1"
    digest = _pack(project, ref, tmp_path / "home")
    proc = kitfs("inspect", ref, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["digest"] == digest
    assert [(layer["type"], layer["path"]) for layer in doc["layers"]] == [
        ("model", "./model"), ("dataset", "./data/train.csv"), ("docs", "./README.md")]
    assert doc["manifest"]["mediaType"] == mt.OCI_MANIFEST
    assert doc["manifest"]["config"]["mediaType"] == mt.KITOPS_CONFIG
    assert doc["manifest"]["annotations"][TOC_ANNOTATION] == doc["tableOfContents"]
    assert doc["config"]["model"]["digest"] == doc["layers"][0]["digest"]
    assert "authors: [Ada, Grace]" in doc["kitfile"]
    human = kitfs("inspect", ref)
    assert human.returncode == 0 and digest in human.stdout and "./README.md" in human.stdout


def test_same_directory_same_digests(
    registry: RegistryServer, project: Path, tmp_path: Path
) -> None:
    for compression in ("none", "zstd"):
        a = _pack(project, f"{registry.host}/repro/a:{compression}", tmp_path / "h",
                  "--compression", compression)
        b = _pack(project, f"{registry.host}/repro/b:{compression}", tmp_path / "h",
                  "--compression", compression)
        local = _pack(project, f"repro/local:{compression}", tmp_path / "h",
                      "--compression", compression)
        assert a == b == local


async def test_toc_is_attached_as_a_referrer(
    registry: RegistryServer, project: Path, tmp_path: Path
) -> None:
    ref = f"{registry.host}/referrers/tiny:v1"
    digest = _pack(project, ref, tmp_path / "home")
    async with RegistryClient(registry.host, ClientOptions()) as client:
        manifest, _, _ = await client.get_manifest("referrers/tiny", digest)
        toc_digest = json.loads(manifest)["annotations"][TOC_ANNOTATION]
        found = await client.referrers("referrers/tiny", digest, TOC_ARTIFACT_TYPE)
        assert len(found) == 1
        referrer, _, _ = await client.get_manifest("referrers/tiny", found[0]["digest"])
        doc = json.loads(referrer)
        assert doc["subject"]["digest"] == digest
        assert doc["layers"][0]["digest"] == toc_digest
        # Distribution 2.8 has no referrers API: the fallback tag must exist
        assert digest.replace(":", "-") in await client.list_tags("referrers/tiny")


def test_skopeo_copies_what_kitfs_pushed(
    registry: RegistryServer, project: Path, tmp_path: Path
) -> None:
    """A third-party OCI client reads the ModelKit, and its layers untar to the source files."""
    ref = f"{registry.host}/skopeo/tiny:v1"
    digest = _pack(project, ref, tmp_path / "home")
    layout = tmp_path / "layout"
    subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}:v1"],
        check=True, capture_output=True, timeout=120,
    )
    index = json.loads((layout / "index.json").read_text())
    assert index["manifests"][0]["digest"] == digest
    manifest = json.loads((layout / "blobs" / "sha256" / digest[7:]).read_text())
    extracted = tmp_path / "unpacked"
    for layer in manifest["layers"]:
        with tarfile.open(layout / "blobs" / "sha256" / layer["digest"][7:]) as tar:
            tar.extractall(extracted, filter="data")
    assert source_files(extracted) == source_files(project)
