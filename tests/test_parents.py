"""Parent ModelKits: a Kitfile whose `model.path` names another ModelKit (kitfs/parents.py).

Against real Distribution registries (tests/registry.py), with ModelKits packed by
`kitfs pack` and, for what no pack would write (cycles, chains too long, a parent
that is not a ModelKit), manifests pushed as they are (tests/crafted.py). What kit
does, and where in its source: kitfs/parents.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio
from crafted import CraftLayer, build_tar, craft_layer, publish_kit, sha256
from opening import opened, read_file

from helpers import LONG_NAME, kitfs, make_project, ok, one_line_error
from kitfs.errors import IntegrityError
from kitfs.modelkit import mediatypes as mt
from kitfs.oci.client import ClientOptions, RegistryClient
from mounting import mounted
from registry import RegistryServer, running_registry

pytestmark = pytest.mark.registry

#: The files of make_project's model layer (its `model.path`, ./model), as the parent holds them.
PARENT_MODEL_FILES = {"model/model.safetensors", "model/config.json", "model/empty.txt",
                      f"model/nested/deeper/{LONG_NAME}"}




def pack(project: Path, ref: str, home: Path) -> str:
    """`kitfs pack`; the manifest digest."""
    return ok(kitfs("pack", str(project), "-t", ref, home=home)).strip().rsplit("@", 1)[1]


def child_project(root: Path, parent: str) -> Path:
    """A project built on `parent`: its own docs and code (the whole context, as `code: .`
    takes it), beside files at the parent's paths that kit pack must leave out."""
    root.mkdir(parents=True)
    (root / "CHILD.md").write_text("# fine-tuned on top of the parent\n")
    (root / "src").mkdir()
    (root / "src" / "serve.py").write_text("print('serving')\n")
    # At the parent's model, dataset and docs paths: the parent provides these.
    (root / "model").mkdir()
    (root / "model" / "leftover.bin").write_bytes(b"stale weights\n")
    (root / "data").mkdir()
    (root / "data" / "train.csv").write_text("stale\n")
    (root / "README.md").write_text("stale\n")
    (root / "Kitfile").write_text(
        "manifestVersion: 1.0.0\n"
        "package:\n  name: child\n  version: 0.2.0\n"
        f"model:\n  name: child-llm\n  path: {parent}\n"
        "code:\n  - path: .\n"
        "docs:\n  - path: ./CHILD.md\n"
    )
    return root


def digests(root: Path, names: set[str]) -> dict[str, str]:
    return {n: hashlib.sha256((root / n).read_bytes()).hexdigest() for n in names}


def listed(ref: str, home: Path, *extra: str) -> dict[str, dict[str, object]]:
    doc = json.loads(ok(kitfs("ls", ref, "--json", *extra, home=home)))
    return {e["path"]: e for e in doc if e["type"] == "file"}


@pytest.fixture(scope="module")
def chain(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[str, str, str, Path, Path]:
    """(parent ref, its digest, child ref, parent project, child project): the parent packed to
    one repository, the child (model.path: the parent) packed by kitfs to another."""
    tmp = tmp_path_factory.mktemp("chain")
    base = f"{registry.host}/parents/base:v1"
    base_project = make_project(tmp / "base", weight_bytes=3 << 20)
    base_digest = pack(base_project, base, tmp / "packer")
    child = f"{registry.host}/parents/child:v1"
    project = child_project(tmp / "child", base)
    pack(project, child, tmp / "packer")
    return base, base_digest, child, base_project, project


def test_pack_keeps_the_reference_and_leaves_the_parents_paths_out(
    registry: RegistryServer, chain: tuple[str, str, str, Path, Path], tmp_path: Path
) -> None:
    """As kit pack: no model layer (the parent's is not copied), model.path stays the
    reference in the config, and nothing at a path the parent's Kitfile names is packed."""
    base, _, child, _, _ = chain
    home = tmp_path / "home"
    doc = json.loads(ok(kitfs("inspect", child, "--json", home=home)))
    assert [layer["type"] for layer in doc["layers"]] == ["code", "docs"]
    assert doc["config"]["model"] == {"name": "child-llm", "path": base}
    own = set(listed(child, home, "--filter", "code,docs,kitfile"))
    assert own == {"Kitfile", "CHILD.md", "src/serve.py"}


async def test_a_child_lists_inspects_and_mounts_with_its_parents_weights(
    chain: tuple[str, str, str, Path, Path], tmp_path: Path
) -> None:
    base, base_digest, child, base_project, project = chain
    home = tmp_path / "home"
    files = listed(child, home)
    # The parent's model layer where kit unpack writes it (the parent's model.path); not
    # the parent's dataset, docs or Kitfile; the child's stale copies left out by pack.
    assert set(files) == {"Kitfile", "CHILD.md", "src/serve.py"} | PARENT_MODEL_FILES
    assert files["model/model.safetensors"]["size"] == 3 << 20

    # Filters reach the parent as kit passes them on: model (ids included) only.
    assert set(listed(child, home, "--filter", "model")) == PARENT_MODEL_FILES
    assert set(listed(child, home, "--filter", "model:tiny-llm")) == PARENT_MODEL_FILES
    assert set(listed(child, home, "--filter", "model:other")) == set()
    assert set(listed(child, home, "--filter", "docs,kitfile")) == {"Kitfile", "CHILD.md"}

    doc = json.loads(ok(kitfs("inspect", child, "--json", home=home)))
    [parent] = doc["parents"]
    assert parent["reference"] == base and parent["digest"] == base_digest
    assert [(la["type"], la["path"]) for la in parent["layers"]] == [("model", "./model")]
    text = ok(kitfs("inspect", child, home=home))
    assert f"Parents     {base} (via model.path: 1 model layer, 3.0 MiB)" in text
    assert f"Model layers of parent {base} ({base_digest})" in text

    # Mounted through the real command line: the parent's weights are read through the
    # child's mount, from the parent's repository, byte for byte.
    with mounted(child, tmp_path / "mnt", tmp_path / "cache", home=home) as mnt:
        expected = digests(base_project, PARENT_MODEL_FILES) | digests(project, {"CHILD.md"})
        got = await trio.to_thread.run_sync(digests, mnt, set(expected))
        assert got == expected
        kitfile = (mnt / "Kitfile").read_text()
        assert f"path: {base}" in kitfile and "name: child" in kitfile
        assert not (mnt / "model" / "leftover.bin").exists()
        # kit pack keeps the directory (no layer path is a prefix of "data"), not the file
        assert (mnt / "data").is_dir() and not (mnt / "data" / "train.csv").exists()


async def test_every_parent_layer_is_checked_against_its_digest(
    tmp_path: Path, kitops_home: Path
) -> None:
    """A parent's layer that lies fails its reads as the child's own would: its chunks are
    checked against the parent's table of contents, whichever repository serves it."""
    with running_registry(tmp_path / "registry") as server:
        base = f"{server.host}/lie/base:v1"
        pack(make_project(tmp_path / "base", weight_bytes=3 << 20), base, tmp_path / "packer")
        child = f"{server.host}/lie/child:v1"
        pack(child_project(tmp_path / "child", base), child, tmp_path / "packer")
        async with RegistryClient(server.host, ClientOptions()) as client:
            body, _, _ = await client.get_manifest("lie/base", "v1")
        model = json.loads(body)["layers"][0]
        assert model["mediaType"] == mt.layer_media_type("model", "tar", "none")
        hexpart = model["digest"].split(":")[1]
        data = (server.root / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256"
                / hexpart[:2] / hexpart / "data")
        blob = bytearray(data.read_bytes())
        blob[(2 << 20) + (256 << 10)] ^= 0xFF  # in the weights' second 2 MiB chunk, same size
        data.write_bytes(bytes(blob))

        async with opened(child, tmp_path / "cache") as kit:  # kitops_home: empty storage
            assert kit.tree.nodes["model/model.safetensors"].layer == model["digest"]
            assert await read_file(kit, "CHILD.md") == b"# fine-tuned on top of the parent\n"
            assert await read_file(kit, "model/config.json") == b'{"hidden_size": 64}\n'
            with pytest.raises(IntegrityError):
                await read_file(kit, "model/model.safetensors")


def test_a_pulled_chain_mounts_with_the_registry_gone(tmp_path: Path) -> None:
    """Parents are looked for as the ModelKit is: kit's local storage first, so a chain
    pulled with `kitfs pull` lists and mounts offline."""
    home = tmp_path / "home"
    base_project = make_project(tmp_path / "base", weight_bytes=1 << 20)
    with running_registry(tmp_path / "registry") as server:
        base = f"{server.host}/offline/base:v1"
        child = f"{server.host}/offline/child:v1"
        pack(base_project, base, tmp_path / "packer")
        pack(child_project(tmp_path / "child", base), child, tmp_path / "packer")
        ok(kitfs("pull", child, home=home))
    assert set(listed(child, home, "--timeout", "2")) >= PARENT_MODEL_FILES
    with mounted(child, tmp_path / "mnt", tmp_path / "cache", "--timeout", "2",
                 home=home) as mnt:
        name = "model/model.safetensors"
        assert digests(mnt, {name}) == digests(base_project, {name})


# -- one-line errors ----------------------------------------------------------------------


def docs_kit(name: str, model_path: str) -> tuple[list[CraftLayer], dict[str, Any]]:
    docs = craft_layer(build_tar([("README.md", f"{name}\n".encode())]), kind="docs",
                       path="./README.md")
    return [docs], {"manifestVersion": "1.0.0", "package": {"name": name},
                    "model": {"path": model_path}, "docs": [{"path": "./README.md"}]}


async def publish_child(host: str, repo: str, parent: str) -> str:
    layers, kitfile = docs_kit(repo, parent)
    return await publish_kit(host, repo, "v1", layers, kitfile)


async def publish_image(host: str, repo: str) -> str:
    """A container image's manifest: an OCI image, but not a ModelKit."""
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha256(config), "size": len(config)},
        "layers": [],
    }).encode()
    async with RegistryClient(host, ClientOptions()) as client:
        await client.push_blob_bytes(repo, sha256(config), config)
        await client.put_manifest(repo, "v1", manifest, mt.OCI_MANIFEST)
    return f"{host}/{repo}:v1"


@pytest.fixture(scope="module")
def broken(registry: RegistryServer) -> dict[str, tuple[str, str]]:
    """name -> (a ModelKit whose chain is broken that way, what its one line must say)."""
    host = registry.host

    async def publish() -> dict[str, tuple[str, str]]:
        a, b = f"{host}/broken/cycle-a:v1", f"{host}/broken/cycle-b:v1"
        await publish_child(host, "broken/cycle-a", b)
        await publish_child(host, "broken/cycle-b", a)
        absent = f"{host}/broken/absent:v1"
        missing = await publish_child(host, "broken/missing", absent)
        image = await publish_image(host, "broken/image")
        not_kit = await publish_child(host, "broken/not-kit", image)
        return {
            "cycle": (a, f"found cycle in modelkit references: [{a}=>{b}=>{a}]"),
            "missing": (missing, f"parent ModelKit {absent} (the model.path of {missing})"),
            "not a ModelKit": (not_kit, f"parent ModelKit {image} (the model.path of "
                               f"{not_kit}): not a ModelKit"),
        }

    return trio.run(publish)


@pytest.mark.parametrize("case", ["cycle", "missing", "not a ModelKit"])
def test_a_broken_chain_is_one_line_for_every_verb(
    broken: dict[str, tuple[str, str]], case: str, tmp_path: Path
) -> None:
    ref, says = broken[case]
    home = tmp_path / "home"
    for verb in (["ls", ref], ["inspect", ref]):
        assert says in one_line_error(kitfs(*verb, "--timeout", "5", home=home)), verb

    # mount: the error comes before anything is mounted.
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    line = one_line_error(kitfs("mount", ref, str(mnt), "--cache-dir", str(tmp_path / "cache"),
                                "--timeout", "5", home=home))
    assert says in line
    assert not os.path.ismount(mnt) and not list(mnt.iterdir())

    # pack of a Kitfile naming it: refused before a layer is written or pushed.
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("x\n")
    (project / "Kitfile").write_text(f"manifestVersion: 1.0.0\nmodel:\n  path: {ref}\n"
                                     "docs:\n  - path: ./README.md\n")
    line = one_line_error(kitfs("pack", str(project), "-t", "broken/packed:v1", home=home))
    assert says in line or "found cycle in modelkit references" in line
    assert "broken/packed" not in kitfs("list", home=home).stdout

    # info shows the ModelKit alone, as kit's does: it still works.
    assert "model:" in ok(kitfs("info", ref, home=home))


def test_at_most_ten_parents(registry: RegistryServer, tmp_path: Path) -> None:
    """kit unpack and pack follow up to ten parents (constants.MaxModelRefChain) and
    refuse an eleventh; the farthest ancestor's weights (a layer with no kitfs table of
    contents: its tar headers are read from its own repository) are where kit puts them."""
    host = registry.host
    weights = os.urandom(4096)
    model = craft_layer(build_tar([("weights/w.bin", weights)]), kind="model", path="./weights")

    async def publish() -> list[str]:
        refs = [await publish_kit(host, "deep/d11", "v1", [model], {
            "manifestVersion": "1.0.0", "package": {"name": "d11"},
            "model": {"name": "root-weights", "path": "./weights"}}, toc=None)]
        for i in range(10, -1, -1):
            refs.insert(0, await publish_child(host, f"deep/d{i}", refs[0]))
        return refs

    refs = trio.run(publish)
    home = tmp_path / "home"
    files = listed(refs[1], home)  # ten parents
    assert set(files) == {"Kitfile", "README.md", "weights/w.bin"}
    assert files["weights/w.bin"]["size"] == len(weights)
    line = one_line_error(kitfs("ls", refs[0], home=home))  # eleven
    assert line.endswith(f"reached maximum number of model references: [{'=>'.join(refs)}]")


def test_a_child_unpacks_with_its_parents_weights(
    chain: tuple[str, str, str, Path, Path], tmp_path: Path
) -> None:
    """`kitfs unpack` of a child writes what kit unpack writes: the parent's model files at
    the parent's model.path first, then the child's Kitfile and layers; `--model` reaches
    the parent as kit passes filters on."""
    base, _, child, base_project, project = chain
    home = tmp_path / "home"
    out = tmp_path / "out"
    ok(kitfs("unpack", child, "-d", str(out), "--cache-dir", str(tmp_path / "cache"),
             home=home))
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert written == {"Kitfile", "CHILD.md", "src/serve.py"} | PARENT_MODEL_FILES
    assert digests(out, PARENT_MODEL_FILES) == digests(base_project, PARENT_MODEL_FILES)
    assert digests(out, {"CHILD.md"}) == digests(project, {"CHILD.md"})
    assert f"path: {base}" in (out / "Kitfile").read_text()
    only_model = tmp_path / "only-model"
    ok(kitfs("unpack", child, "-d", str(only_model), "--model",
             "--cache-dir", str(tmp_path / "cache"), home=home))
    assert {str(p.relative_to(only_model)) for p in only_model.rglob("*")
            if p.is_file()} == PARENT_MODEL_FILES
