"""`kitfs info` and `kitfs diff` on ModelKits packed to a real registry and kit's local storage."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import kitfs, make_project, one_line_error
from kitfs.units import human_bytes
from registry import RegistryServer, free_port

#: make_project's Kitfile as kit prints it (yaml.v3, indent 2, `authors` in flow style).
V1_KITFILE = """\
manifestVersion: 1.0.0
package:
  name: tiny
  version: 0.1.0
  authors: [Ada, Grace]
model:
  name: tiny-llm
  path: ./model
  format: safetensors
datasets:
  - name: train
    path: ./data/train.csv
docs:
  - path: ./README.md
    description: model card
"""


@dataclass(frozen=True)
class Versions:
    home: Path
    v1: str
    v2: str
    v3: str
    local_v2: str
    digests: dict[str, str]


def _pack(project: Path, ref: str, home: Path) -> str:
    proc = kitfs("pack", str(project), "-t", ref, home=home)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1].rsplit("@", 1)[1]


@pytest.fixture(scope="module")
def versions(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> Versions:
    """v1: make_project. v2: new weights, a code layer, a new docs description (also in
    local storage). v3: v2 without its dataset."""
    root = tmp_path_factory.mktemp("versions")
    home = root / "home"
    project = make_project(root / "tiny", weight_bytes=64 << 10)
    base = f"{registry.host}/diff/tiny"
    digests = {"v1": _pack(project, f"{base}:v1", home)}
    (project / "model" / "model.safetensors").write_bytes(os.urandom(80 << 10))
    (project / "src").mkdir()
    (project / "src" / "serve.py").write_text("print('serving')\n")
    kitfile = project / "Kitfile"
    kitfile.write_text(kitfile.read_text().replace("model card", "the model card")
                       + "code:\n  - path: ./src\n")
    digests["v2"] = _pack(project, f"{base}:v2", home)
    digests["local_v2"] = _pack(project, "diff/tiny:v2", home)
    kitfile.write_text(kitfile.read_text().replace(
        "datasets:\n  - name: train\n    path: ./data/train.csv\n", ""))
    shutil.rmtree(project / "data")
    digests["v3"] = _pack(project, f"{base}:v3", home)
    return Versions(home, f"{base}:v1", f"{base}:v2", f"{base}:v3", "diff/tiny:v2", digests)



# -- info ----------------------------------------------------------------------------------


def test_info_prints_the_kitfile_as_kit_does(versions: Versions) -> None:
    proc = kitfs("info", versions.v1, home=versions.home)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == V1_KITFILE
    remote = kitfs("info", "--remote", versions.v1, home=versions.home)
    assert remote.returncode == 0 and remote.stdout == V1_KITFILE


def test_info_reads_kits_local_storage(versions: Versions) -> None:
    proc = kitfs("info", versions.local_v2, home=versions.home)
    assert proc.returncode == 0, proc.stderr
    assert "description: the model card\n" in proc.stdout
    assert "code:\n  - path: ./src\ndatasets:\n" in proc.stdout
    line = one_line_error(kitfs("info", "-r", versions.local_v2, home=versions.home), 2)
    assert "can not check remote" in line and "does not contain a registry" in line


@pytest.mark.parametrize(("fields", "expected"), [
    ("package.name", "tiny\n"),
    (".package.version", "0.1.0\n"),
    ("package.authors", "- Ada\n- Grace\n"),
    ("Package.License", '""\n'),
    ("manifestVersion", "1.0.0\n"),
    ("model", "name: tiny-llm\npath: ./model\nformat: safetensors\n"),
    ("model.parts", "[]\n"),
    ("model.parameters", "null\n"),
    ("dataSets", "- name: train\n  path: ./data/train.csv\n"),
    ("docs", "- path: ./README.md\n  description: model card\n"),
    ("code", "[]\n"),
])
def test_info_filter_selects_go_fields_as_kit(
    versions: Versions, fields: str, expected: str
) -> None:
    proc = kitfs("info", versions.v1, "--filter", fields, home=versions.home)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected


def test_info_filter_reaches_layer_digests(versions: Versions) -> None:
    inspect = kitfs("inspect", versions.v1, "--json", home=versions.home)
    layers = {row["type"]: row["digest"] for row in json.loads(inspect.stdout)["layers"]}
    proc = kitfs("info", versions.v1, "-f", "model.digest", home=versions.home)
    assert proc.returncode == 0 and proc.stdout == layers["model"] + "\n"


@pytest.mark.parametrize(("fields", "code", "needle"), [
    ("datasets", 1, "dataSets"),  # kit's Go field is DataSets: its fields are listed
    ("model.nope", 1, "cannot find required node"),
    ("code.path", 1, "array access is not supported"),
    ("docs[0]", 2, "array access using '[]'"),
    ("package..name", 2, "invalid filter"),
    ("package name", 2, "invalid filter"),
])
def test_info_filter_errors_are_one_line(
    versions: Versions, fields: str, code: int, needle: str
) -> None:
    line = one_line_error(kitfs("info", versions.v1, "-f", fields, home=versions.home), code)
    assert needle in line


def test_info_filter_of_what_a_kitfile_lacks(versions: Versions, tmp_path: Path) -> None:
    proc = kitfs("info", versions.v3, "-f", "dataSets", home=versions.home)
    assert proc.returncode == 0 and proc.stdout == "[]\n"
    docs_only = tmp_path / "docs-only"
    docs_only.mkdir()
    (docs_only / "README.md").write_text("# just docs\n")
    (docs_only / "Kitfile").write_text("manifestVersion: 1.0.0\ndocs:\n  - path: ./README.md\n")
    home = tmp_path / "home"
    _pack(docs_only, "docs/only:v1", home)
    assert kitfs("info", "docs/only:v1", "-f", "model", home=home).stdout == "null\n"
    assert kitfs("info", "docs/only:v1", "-f", "package", home=home).stdout == "{}\n"
    line = one_line_error(kitfs("info", "docs/only:v1", "-f", "model.name", home=home), 1)
    assert "cannot find required node" in line and "not set" in line


def test_info_errors_are_one_line(registry: RegistryServer, versions: Versions) -> None:
    missing = one_line_error(kitfs("info", f"{registry.host}/diff/tiny:nope",
                                   home=versions.home))
    assert "diff/tiny" in missing
    assert "not in kit's local storage" in one_line_error(
        kitfs("info", "nowhere/tiny:v1", home=versions.home))
    one_line_error(kitfs("info", "Bad/Ref:v1", home=versions.home), 2)
    extra = one_line_error(kitfs("info", f"{versions.v1},latest", home=versions.home), 2)
    assert "extra tags are not supported: latest" in extra
    dead = f"127.0.0.1:{free_port()}/nobody/home:v1"
    assert "127.0.0.1" in one_line_error(kitfs("info", dead, "--timeout", "3",
                                               home=versions.home))


# -- diff ----------------------------------------------------------------------------------


def test_diff_of_a_modelkit_with_itself(versions: Versions) -> None:
    proc = kitfs("diff", versions.v1, versions.v1, home=versions.home)
    assert proc.returncode == 0 and proc.stdout == "ModelKits are identical\n"
    # the same bytes in kit's local storage and in the registry: prefixes say where
    proc = kitfs("diff", f"local://{versions.local_v2}", f"remote://{versions.v2}",
                 home=versions.home)
    assert proc.returncode == 0, proc.stderr
    same = versions.digests["local_v2"] == versions.digests["v2"]
    assert (proc.stdout == "ModelKits are identical\n") is same


def test_diff_text_names_what_changed(versions: Versions) -> None:
    proc = kitfs("diff", versions.v1, versions.v2, home=versions.home)
    assert proc.returncode == 0, proc.stderr  # kit exits 0 when they differ too
    out = proc.stdout
    sections = ["Comparing:", "Configurations:", "Annotations:", "Kitfile:",
                "Shared Layers", "Changed Layers", "Unique Layers to ModelKit1",
                "Unique Layers to ModelKit2"]
    positions = [out.index(s) for s in sections]
    assert positions == sorted(positions)
    assert f"  ModelKit1: {versions.v1}\n  ModelKit2: {versions.v2}\n" in out
    assert "Configs differ:\n  ModelKit1 Config Digest: sha256:" in out
    assert "-    description: model card\n+    description: the model card\n" in out
    assert "+code:\n+  - path: ./src\n" in out
    assert "Layers: 2 shared, 1 changed, 0 only in ModelKit1, 1 only in ModelKit2" in out

    def section(title: str) -> list[str]:
        body = out[out.index(title):].split("\n\n", 1)[0]
        return body.splitlines()[2:]

    shared = section("Shared Layers")
    assert [row.split("|")[0].strip() for row in shared[1:]] == ["dataset", "docs"]
    assert "./data/train.csv" in shared[1] and "./README.md" in shared[2]
    changed = section("Changed Layers")
    assert len(changed) == 2 and changed[1].startswith("model ") and "./model" in changed[1]
    doc = json.loads(kitfs("diff", versions.v1, versions.v2, "--json",
                           home=versions.home).stdout)
    (pair,) = doc["layers"]["changed"]
    before, after = pair["modelkit1"], pair["modelkit2"]
    assert f"{before['digest'][:17]} -> {after['digest'][:17]}" in changed[1]
    assert f"{human_bytes(before['size'])} -> {human_bytes(after['size'])}" in changed[1]
    assert section("Unique Layers to ModelKit1") == ["<none>"]
    added = section("Unique Layers to ModelKit2")
    assert len(added) == 2 and added[1].startswith("code ") and "./src" in added[1]


def test_diff_json_lists_shared_changed_removed_added(versions: Versions) -> None:
    proc = kitfs("diff", versions.v2, versions.v3, "--json", home=versions.home)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["identical"] is False and doc["sameConfig"] is False
    assert doc["modelkit1"]["digest"] == versions.digests["v2"]
    assert doc["modelkit2"]["digest"] == versions.digests["v3"]
    layers = doc["layers"]
    assert [(x["type"], x["path"]) for x in layers["shared"]] == [
        ("model", "./model"), ("code", "./src"), ("docs", "./README.md")]
    assert layers["changed"] == [] and layers["added"] == []
    assert [(x["type"], x["path"]) for x in layers["removed"]] == [
        ("dataset", "./data/train.csv")]
    assert layers["removed"][0]["digest"].startswith("sha256:")
    assert "-datasets:\n-  - name: train\n-    path: ./data/train.csv\n" in doc["kitfileDiff"]
    # a changed layer carries both sides
    doc = json.loads(kitfs("diff", versions.v1, versions.v3, "--json",
                           home=versions.home).stdout)
    (changed,) = doc["layers"]["changed"]
    assert changed["type"] == "model" and changed["path"] == "./model"
    assert changed["modelkit1"]["digest"] != changed["modelkit2"]["digest"]
    assert changed["modelkit1"]["size"] < changed["modelkit2"]["size"]
    assert [x["path"] for x in doc["layers"]["removed"]] == ["./data/train.csv"]
    assert [x["path"] for x in doc["layers"]["added"]] == ["./src"]


def test_diff_errors_are_one_line(registry: RegistryServer, versions: Versions) -> None:
    line = one_line_error(kitfs("diff", versions.v1, f"{registry.host}/diff/tiny:gone",
                                home=versions.home))
    assert "diff/tiny" in line and "gone" in line
    # local:// looks only in kit's local storage, which never held v1
    line = one_line_error(kitfs("diff", f"local://{versions.v1}", versions.v2,
                                home=versions.home))
    assert "not in kit's local storage" in line
    one_line_error(kitfs("diff", "remote://diff/tiny:v2", versions.v2, home=versions.home), 2)
    one_line_error(kitfs("diff", "NOT/valid", versions.v2, home=versions.home), 2)
