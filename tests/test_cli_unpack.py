"""`kitfs unpack` against a real registry, as a user runs it.

For every generation of ModelKit kitfs reads, the unpacked tree (names,
kinds, modes, bytes) must be what `tar -x` of the same layers gives, plus the
Kitfile `kit` writes; filters and kit's shorthand flags pick what kit picks;
existing files are refused, skipped (-i) or replaced (-o); an unpack killed
with -9 and run again fetches only what it had not (the registry's own
access log counts the bytes); one that fails or is interrupted leaves no
temporary file and says why in one line.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pty
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard
from crafted import CraftLayer, Member, build_tar, publish_kit
from faultproxy import Corrupt, FaultProxy, Reset, Slow, Status

from helpers import kit_tar, kitfs, layer_desc, make_project, push_manifest, sha
from kitfs.modelkit import mediatypes as mt
from kitfs.modelkit.kitfile import config_json, kitfile_from_config, kitfile_to_yaml, load_kitfile
from kitfs.oci.client import ClientOptions, RegistryClient
from kitfs.unpack import TEMP_PREFIX
from registry import RegistryServer, start_registry

MiB = 1 << 20


@pytest.fixture(autouse=True)
def umask_022() -> Iterator[None]:
    """kit unpack's modes are the tar's less the umask; tests fix it so `tar -x` (root keeps
    a tar's modes whole) and unpack agree on every mode used here."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def logged_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A registry of this module's own whose access log counts the bytes it serves."""
    server = start_registry(tmp_path_factory.mktemp("logged-registry"), access_log=True)
    try:
        yield server
    finally:
        server.stop()


# -- ModelKits of every generation, and what tar makes of them -------------------------


@dataclass
class Layer:
    blob: bytes
    media_type: str
    annotations: dict[str, str] = field(default_factory=dict)
    root: str = ""  # where its entries are rooted (pre-v0.5 ModelKits): "" for the top


@dataclass
class Kit:
    ref: str
    layers: list[Layer]
    kitfile: bytes | None  # the Kitfile unpack writes; None: it writes none


def kitfile_yaml(config: bytes) -> bytes:
    return kitfile_to_yaml(kitfile_from_config(config).without_layer_digests()).encode()


def project_with_modes(root: Path) -> Path:
    """make_project, with modes tar keeps and the umask does not touch."""
    project = make_project(root, weight_bytes=3 * MiB + 777)
    os.chmod(project / "model" / "config.json", 0o600)
    os.chmod(project / "model" / "nested", 0o750)
    os.chmod(project / "data" / "train.csv", 0o640)
    return project


async def kit_1_7(registry: RegistryServer, tmp: Path) -> Kit:
    """kit <= 1.7: uncompressed tars, no manifest mediaType, no table of contents."""
    project = project_with_modes(tmp / "p")
    paths = ["./model", "./data/train.csv", "./README.md"]
    tars = [kit_tar(project, p, paths) for p in paths]
    kf = load_kitfile((project / "Kitfile").read_bytes())
    config = config_json(kf.with_layer_digests([(sha(t), sha(t)) for t in tars]))
    kinds = ["model", "dataset", "docs"]
    layers = [Layer(t, mt.layer_media_type(k)) for k, t in zip(kinds, tars, strict=True)]
    manifest = {"schemaVersion": 2, "config": layer_desc(mt.KITOPS_CONFIG, config),
                "layers": [layer_desc(x.media_type, x.blob) for x in layers],
                "annotations": {mt.ANNOTATION_CLI_VERSION: "1.7.0"}}
    repo = f"unpack/kit17-{tmp.name}"
    await push_manifest(registry.host, repo, manifest, [config, *tars])
    return Kit(f"{registry.host}/{repo}:v1", layers, kitfile_yaml(config))


def newer_project(root: Path) -> Path:
    (root / "weights").mkdir(parents=True)
    (root / "weights" / "a.bin").write_bytes(os.urandom(70000))
    os.chmod(root / "weights" / "a.bin", 0o640)
    (root / "src").mkdir()
    (root / "src" / "train.py").write_text("print('hi')\n")
    os.chmod(root / "src" / "train.py", 0o755)
    (root / "data").mkdir()
    (root / "data" / "x.txt").write_text("x" * 5000)
    (root / "README.md").write_text("# newer\n")
    (root / "prompts").mkdir()
    (root / "prompts" / "system.md").write_text("be kind\n")
    (root / "model.gguf").write_bytes(os.urandom(12345))
    (root / "Kitfile").write_text(
        "manifestVersion: 1.0.0\n"
        "package:\n  name: newer\n"
        "model:\n  name: m\n  path: ./model.gguf\n"
        "  parts:\n    - name: w\n      path: ./weights\n"
        "code:\n  - path: ./src\n"
        "datasets:\n  - name: d\n    path: ./data\n"
        "docs:\n  - path: ./README.md\n"
        "prompts:\n  - name: sys\n    path: ./prompts\n"
    )
    return root


async def newer_kit(registry: RegistryServer, tmp: Path) -> Kit:
    """Newer kit: a raw model layer (file metadata), gzip and zstd layers as kit compresses
    them (one stream), code, docs, and prompts as code layers with their subtype."""
    project = newer_project(tmp / "p")
    others = ["./model.gguf", "./weights", "./src", "./data", "./README.md", "./prompts"]
    raw = (project / "model.gguf").read_bytes()
    part = gzip.compress(kit_tar(project, "./weights", others), mtime=0)
    code = kit_tar(project, "./src", others)
    data = zstandard.ZstdCompressor().compress(kit_tar(project, "./data", others))
    docs = kit_tar(project, "./README.md", others)
    prompts = kit_tar(project, "./prompts", others)
    meta = json.dumps({"name": "model.gguf", "mode": 0o640, "uid": 0, "gid": 0,
                       "size": len(raw), "mtime": "1970-01-01T00:00:00Z", "typeflag": 48})
    layers = [
        Layer(raw, mt.layer_media_type("model", "raw"),
              {mt.ANNOTATION_FILEPATH: "model.gguf", mt.ANNOTATION_FILE_METADATA: meta}),
        Layer(part, mt.layer_media_type("modelpart", "tar", "gzip"),
              {mt.ANNOTATION_FILEPATH: "weights"}),
        Layer(code, mt.layer_media_type("code"), {mt.ANNOTATION_FILEPATH: "src"}),
        Layer(data, mt.layer_media_type("dataset", "tar", "zstd"),
              {mt.ANNOTATION_FILEPATH: "data"}),
        Layer(docs, mt.layer_media_type("docs"), {mt.ANNOTATION_FILEPATH: "README.md"}),
        Layer(prompts, mt.layer_media_type("code"),
              {mt.ANNOTATION_FILEPATH: "prompts",
               mt.ANNOTATION_LAYER_SUBTYPE: mt.LAYER_SUBTYPE_PROMPT}),
    ]
    kf = load_kitfile((project / "Kitfile").read_bytes())
    config = config_json(kf.with_layer_digests(
        [(sha(x.blob), sha(uncompressed(x))) for x in layers]))
    manifest = {
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "artifactType": mt.KITOPS_ARTIFACT_TYPE,
        "config": layer_desc(mt.KITOPS_CONFIG, config),
        "layers": [layer_desc(x.media_type, x.blob, x.annotations) for x in layers],
        "annotations": {mt.ANNOTATION_CLI_VERSION: "1.9.0"},
    }
    repo = f"unpack/newer-{tmp.name}"
    await push_manifest(registry.host, repo, manifest, [config, *(x.blob for x in layers)])
    return Kit(f"{registry.host}/{repo}:v1", layers, kitfile_yaml(config))


async def modelpack(registry: RegistryServer, tmp: Path, *, with_kitfile: bool = True) -> Kit:
    """A ModelPack of raw layers; kit writes the Kitfile its annotation holds, or none."""
    weights, cfg = os.urandom(4096), b'{"architectures": ["X"]}'
    kitfile = {"manifestVersion": "1.0.0", "package": {"name": "mp"},
               "model": {"name": "mp", "path": "model.safetensors",
                         "parts": [{"path": "config/config.json"}]}}
    model_config = json.dumps({"descriptor": {"name": "mp"}, "modelfs": {
        "type": "layers", "diffIds": [sha(weights), sha(cfg)]}}).encode()
    layers = [
        Layer(weights, "application/vnd.cncf.model.weight.v1.raw",
              {mt.ANNOTATION_FILEPATH: "model.safetensors"}),
        Layer(cfg, "application/vnd.cncf.model.weight.config.v1.raw",
              {mt.ANNOTATION_FILEPATH: "config/config.json"}),
    ]
    manifest: dict[str, object] = {
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "artifactType": mt.MODELPACK_ARTIFACT_TYPE,
        "config": layer_desc(mt.MODELPACK_CONFIG, model_config),
        "layers": [layer_desc(x.media_type, x.blob, x.annotations) for x in layers],
    }
    if with_kitfile:
        manifest["annotations"] = {mt.ANNOTATION_KITFILE: json.dumps(kitfile)}
    repo = f"unpack/modelpack-{tmp.name}"
    await push_manifest(registry.host, repo, manifest, [model_config, weights, cfg])
    written = kitfile_yaml(json.dumps(kitfile).encode()) if with_kitfile else None
    return Kit(f"{registry.host}/{repo}:v1", layers, written)


async def modelpack_derived(registry: RegistryServer, tmp: Path) -> Kit:
    return await modelpack(registry, tmp, with_kitfile=False)


async def pre_v0_5(registry: RegistryServer, tmp: Path) -> Kit:
    """Before kit v0.5 entries were rooted at the parent of the layer path."""
    project = tmp / "p"
    (project / "models").mkdir(parents=True)
    (project / "models" / "bert.pkl").write_bytes(os.urandom(3000))
    os.chmod(project / "models" / "bert.pkl", 0o600)
    tar = kit_tar(project / "models", "./bert.pkl", ["./bert.pkl"])
    config = json.dumps({"manifestVersion": "1.0.0", "package": {},
                         "model": {"name": "bert", "path": "models/bert.pkl"}}).encode()
    layers = [Layer(tar, mt.layer_media_type("model"), root="models")]
    manifest = {"schemaVersion": 2, "config": layer_desc(mt.KITOPS_CONFIG, config),
                "layers": [layer_desc(layers[0].media_type, tar)]}
    repo = f"unpack/legacy-{tmp.name}"
    await push_manifest(registry.host, repo, manifest, [config, tar])
    return Kit(f"{registry.host}/{repo}:v1", layers, kitfile_yaml(config))


def kitfs_packed(compression: str) -> Callable[[RegistryServer, Path], Awaitable[Kit]]:
    async def build(registry: RegistryServer, tmp: Path) -> Kit:
        project = project_with_modes(tmp / "p")
        ref = f"{registry.host}/unpack/kitfs-{compression}-{tmp.name}:v1"
        proc = kitfs("pack", str(project), "-t", ref, "--compression", compression,
                     home=tmp / "home")
        assert proc.returncode == 0, proc.stderr
        return await published(ref)
    return build


async def published(ref: str) -> Kit:
    """A kit as the registry holds it (for ModelKits `kitfs pack` wrote)."""
    host, _, rest = ref.partition("/")
    repo, _, tag = rest.rpartition(":")
    async with RegistryClient(host, ClientOptions()) as client:
        body, _, _ = await client.get_manifest(repo, tag)
        manifest = json.loads(body)
        config = await client.get_blob(repo, manifest["config"]["digest"])
        layers = [Layer(await client.get_blob(repo, d["digest"], 1 << 30), d["mediaType"],
                        d.get("annotations") or {}) for d in manifest["layers"]]
    return Kit(ref, layers, kitfile_yaml(config))


BUILDERS: dict[str, Callable[[RegistryServer, Path], Awaitable[Kit]]] = {
    "kit-1.7": kit_1_7,
    "newer-kit": newer_kit,
    "modelpack": modelpack,
    "modelpack-no-kitfile": modelpack_derived,
    "pre-v0.5": pre_v0_5,
    "kitfs": kitfs_packed("none"),
    "kitfs-gzip": kitfs_packed("gzip"),
    "kitfs-zstd": kitfs_packed("zstd"),
}


def uncompressed(layer: Layer) -> bytes:
    compression = mt.parse_layer_media_type(layer.media_type).compression
    if compression == "gzip":
        return gzip.decompress(layer.blob)  # every member: kitfs writes one per chunk
    if compression == "zstd":
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(layer.blob), read_across_frames=True)
        return reader.read()
    return layer.blob


def extract_like_tar(kit: Kit, dest: Path, kinds: set[str] | None = None) -> None:
    """What a user gets without kit: `tar -x` of every layer (a raw layer's blob is the file,
    its mode from its metadata as kit applies it), and the Kitfile."""
    dest.mkdir()
    umask = os.umask(0o022)
    os.umask(umask)
    for layer in kit.layers:
        kind = mt.parse_layer_media_type(layer.media_type)
        if kinds is not None and kind.kind not in kinds:
            continue
        if kind.fmt == "raw":
            path = dest / layer.annotations[mt.ANNOTATION_FILEPATH]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(layer.blob)
            meta = json.loads(layer.annotations.get(mt.ANNOTATION_FILE_METADATA, "{}"))
            os.chmod(path, meta.get("mode", 0o644) & 0o777 & ~umask)
            continue
        target = dest / layer.root
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "-x", "-C", str(target)], input=uncompressed(layer), check=True)
    if kit.kitfile is not None:
        (dest / "Kitfile").write_bytes(kit.kitfile)
        os.chmod(dest / "Kitfile", 0o644 & ~umask)


def snapshot(root: Path) -> dict[str, tuple[str, ...]]:
    """Every entry below `root`: its kind, its mode bits, and a file's sha256."""
    out: dict[str, tuple[str, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = path.relative_to(root).as_posix()
            mode = oct(stat.S_IMODE(st.st_mode))
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", mode)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", mode, hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                out[rel] = ("other", mode)
    return out


def files_in(root: Path) -> set[str]:
    return {p for p, what in snapshot(root).items() if what[0] == "file"}


def unpack(ref: str, out: Path, tmp: Path, *extra: str, timeout: float = 120
           ) -> subprocess.CompletedProcess[str]:
    return kitfs("unpack", ref, "-d", str(out), "--cache-dir", str(tmp / "cache"), *extra,
                 home=tmp / "home", timeout=timeout)


def temp_files(root: Path) -> list[str]:
    return [p.as_posix() for p in root.rglob(TEMP_PREFIX + "*")]


# -- the tree ----------------------------------------------------------------------------


@pytest.mark.parametrize("generation", list(BUILDERS))
async def test_unpack_is_tar_x_of_the_layers_plus_the_kitfile(
    registry: RegistryServer, tmp_path: Path, generation: str
) -> None:
    kit = await BUILDERS[generation](registry, tmp_path)
    out = tmp_path / "out"
    proc = unpack(kit.ref, out, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == proc.stderr == ""  # quiet when not on a terminal
    extract_like_tar(kit, tmp_path / "want")
    got, want = snapshot(out), snapshot(tmp_path / "want")
    assert got == want
    assert ("Kitfile" in got) == (kit.kitfile is not None)
    assert any(what[0] == "file" and what[1] != "0o644" for what in want.values()) or (
        generation.startswith("modelpack"))  # the comparison covers modes
    assert not temp_files(out)
    # A second unpack of the same kit, from the cache it filled, gives the same tree.
    again = tmp_path / "again"
    proc = unpack(kit.ref, again, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert snapshot(again) == want


async def test_the_kitfile_is_the_yaml_kit_writes(registry: RegistryServer, tmp_path: Path
                                                  ) -> None:
    kit = await kit_1_7(registry, tmp_path)
    proc = unpack(kit.ref, tmp_path / "out", tmp_path, "--kitfile")
    assert proc.returncode == 0, proc.stderr
    assert files_in(tmp_path / "out") == {"Kitfile"}
    assert (tmp_path / "out" / "Kitfile").read_text() == (
        "manifestVersion: 1.0.0\n"
        "package:\n  name: tiny\n  version: 0.1.0\n  authors: [Ada, Grace]\n"
        "model:\n  name: tiny-llm\n  path: ./model\n  format: safetensors\n"
        "datasets:\n  - name: train\n    path: ./data/train.csv\n"
        "docs:\n  - path: ./README.md\n    description: model card\n")


async def test_modes_are_kits_setuid_dropped_read_only_directories_filled(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """kit opens files with mode & 0o777 and makes directories with their mode (a
    directory without write permission still gets its files)."""
    tar = build_tar([
        Member("model", kind="dir", mode=0o555),
        Member("model/run.sh", b"#!/bin/sh\n", mode=0o4755),
        Member("model/secret.bin", b"s" * 100, mode=0o600),
        Member("model/shared", kind="dir", mode=0o1777),
        Member("model/shared/x", b"x", mode=0o644),
    ], parents=False)
    ref = await publish_kit(registry.host, f"unpack/modes-{tmp_path.name}", "v1",
                            [CraftLayer(tar, path="./model")], toc=None)
    out = tmp_path / "out"
    proc = unpack(ref, out, tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = snapshot(out)
    assert got["model"] == ("dir", "0o555")
    assert got["model/run.sh"][:2] == ("file", "0o755")
    assert got["model/secret.bin"][:2] == ("file", "0o600")
    assert got["model/shared"] == ("dir", "0o1755")  # the sticky bit stays, the umask applies
    assert (out / "model" / "shared" / "x").read_bytes() == b"x"


# -- what gets unpacked -------------------------------------------------------------------

ALL_NEWER = {"Kitfile", "model.gguf", "weights/a.bin", "src/train.py", "data/x.txt",
             "README.md", "prompts/system.md"}


@pytest.mark.parametrize(("args", "want"), [
    ((), ALL_NEWER),
    (("--model",), {"model.gguf", "weights/a.bin"}),
    (("--filter", "model"), {"model.gguf", "weights/a.bin"}),
    (("-f", "model:w"), {"weights/a.bin"}),
    (("--filter", "model:./model.gguf"), {"model.gguf"}),
    (("--filter", "datasets:d"), {"data/x.txt"}),
    (("--filter", "datasets:./data"), {"data/x.txt"}),
    (("--filter", "datasets:other"), set()),
    (("--kitfile",), {"Kitfile"}),
    (("--filter", "kitfile,prompts"), {"Kitfile", "prompts/system.md"}),
    (("--model", "--datasets"), {"model.gguf", "weights/a.bin", "data/x.txt"}),
    (("--filter", "code", "--datasets"), {"src/train.py"}),  # --filter wins, as in kit
    (("--code",), {"src/train.py"}),
    (("--docs",), {"README.md"}),
    (("--prompts",), {"prompts/system.md"}),
    (("--filter", "docs:./README.md", "--filter", "datasets"), {"README.md", "data/x.txt"}),
])
async def test_filters_and_shorthand_flags_select_what_kit_selects(
    registry: RegistryServer, tmp_path: Path, args: tuple[str, ...], want: set[str]
) -> None:
    kit = await newer_kit(registry, tmp_path)
    out = tmp_path / "out"
    proc = unpack(kit.ref, out, tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    assert files_in(out) == want
    full = tmp_path / "full"
    extract_like_tar(kit, full)
    whole = snapshot(full)
    assert {p: whole[p] for p in files_in(out)} == {p: snapshot(out)[p] for p in want}


async def test_a_progress_bar_on_a_terminal(registry: RegistryServer, tmp_path: Path) -> None:
    kit = await kit_1_7(registry, tmp_path)
    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "kitfs.cli", "unpack", kit.ref, "-d", str(tmp_path / "out"),
           "--cache-dir", str(tmp_path / "cache"), "--config", str(tmp_path / "home")]
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=slave)
    os.close(slave)
    shown = b""
    while True:
        try:
            piece = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not piece:
            break
        shown += piece
    os.close(master)
    assert child.wait(timeout=60) == 0, shown
    last = shown.decode().rstrip().rsplit("\r", 1)[-1]
    assert last.startswith("unpacking [########################] 100.0% "), last
    assert "/s eta" in last and "MiB/" in last


async def test_a_bad_filter_is_a_usage_error(registry: RegistryServer, tmp_path: Path) -> None:
    proc = unpack(f"{registry.host}/unpack/none:v1", tmp_path / "out", tmp_path,
                  "--filter", "weights")
    assert proc.returncode == 2 and "invalid filter type" in proc.stderr
    proc = unpack(f"{registry.host}/unpack/none:v1,v2", tmp_path / "out", tmp_path)
    assert proc.returncode == 2 and "multiple tags" in proc.stderr


# -- what is there already ----------------------------------------------------------------


async def test_existing_files_refused_skipped_or_replaced(
    registry: RegistryServer, tmp_path: Path
) -> None:
    kit = await kit_1_7(registry, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("mine\n")
    proc = unpack(kit.ref, out, tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "README.md' already exists" in proc.stderr
    assert files_in(out) == {"README.md"}  # refused before anything was written

    proc = unpack(kit.ref, out, tmp_path, "-i")
    assert proc.returncode == 0, proc.stderr
    assert (out / "README.md").read_text() == "mine\n"
    want = tmp_path / "want"
    extract_like_tar(kit, want)
    assert files_in(out) == files_in(want)

    proc = unpack(kit.ref, out, tmp_path, "--ignore-existing")  # the Kitfile matches: fine
    assert proc.returncode == 0, proc.stderr
    proc = unpack(kit.ref, out, tmp_path, "-o")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(out) == snapshot(want)

    (out / "Kitfile").write_text("manifestVersion: 1.0.0\n")  # kit: -i does not cover it
    for flags in ((), ("-i",)):
        proc = unpack(kit.ref, out, tmp_path, *flags)
        assert proc.returncode == 1 and "Kitfile" in proc.stderr, proc.stderr
    proc = unpack(kit.ref, out, tmp_path, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(out) == snapshot(want)


async def test_what_is_in_the_way_and_links_are_refused(
    registry: RegistryServer, tmp_path: Path
) -> None:
    kit = await kit_1_7(registry, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("do not touch\n")

    out = tmp_path / "dir-for-file"
    (out / "README.md").mkdir(parents=True)
    proc = unpack(kit.ref, out, tmp_path, "-o")
    assert proc.returncode == 1 and "not a regular file" in proc.stderr, proc.stderr

    out = tmp_path / "file-for-dir"
    out.mkdir()
    (out / "model").write_text("a file\n")
    for flags in ((), ("-o",), ("-i",)):
        proc = unpack(kit.ref, out, tmp_path, *flags)
        assert proc.returncode == 1 and "not a directory" in proc.stderr, proc.stderr

    out = tmp_path / "linked-dir"
    out.mkdir()
    (out / "model").symlink_to(outside)
    for flags in ((), ("-o",), ("-i",)):
        proc = unpack(kit.ref, out, tmp_path, *flags)
        assert proc.returncode == 1 and "symbolic link" in proc.stderr, proc.stderr
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]

    out = tmp_path / "linked-file"
    out.mkdir()
    (out / "README.md").symlink_to(outside / "victim.txt")
    proc = unpack(kit.ref, out, tmp_path, "-o")
    assert proc.returncode == 1 and "not a regular file" in proc.stderr, proc.stderr
    proc = unpack(kit.ref, out, tmp_path, "-i")  # left alone, as kit leaves what exists
    assert proc.returncode == 0, proc.stderr
    assert (out / "README.md").is_symlink()
    assert (outside / "victim.txt").read_text() == "do not touch\n"
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]


def tar_with(entry: str) -> bytes:
    """A layer tar (model/ok.txt, then one hostile entry) as Python's tarfile writes it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(info: tarfile.TarInfo, data: bytes = b"") -> None:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        folder = tarfile.TarInfo("model")
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        add(folder)
        add(tarfile.TarInfo("model/ok.txt"), b"ok")
        if entry in ("../escape.txt", "/etc/escape.txt", "model/../../escape.txt"):
            add(tarfile.TarInfo(entry), b"out")
        else:
            link = tarfile.TarInfo(f"model/{entry}")
            link.type = tarfile.SYMTYPE if entry == "symlink" else tarfile.LNKTYPE
            link.linkname = "../../escape.txt" if entry == "symlink" else "/etc/passwd"
            add(link)
    return buf.getvalue()


@pytest.mark.parametrize("entry", ["../escape.txt", "/etc/escape.txt",
                                   "model/../../escape.txt", "symlink", "hardlink"])
async def test_entries_that_leave_the_directory_or_link_are_refused(
    registry: RegistryServer, tmp_path: Path, entry: str
) -> None:
    ref = await publish_kit(registry.host, f"unpack/hostile-{tmp_path.name}", "v1",
                            [CraftLayer(tar_with(entry), path="./model")], toc=None)
    out = tmp_path / "deep" / "out"
    proc = unpack(ref, out, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("kitfs: error: ") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "deep" / "escape.txt").exists()
    assert not (tmp_path / "escape.txt").exists()
    assert not out.exists() or not files_in(out)


# -- verified, interrupted, resumed --------------------------------------------------------


def served(registry: RegistryServer, since: int, digest: str) -> int:
    time.sleep(0.3)  # a line is logged when its response ends
    return registry.served(since).by_blob.get(digest, 0)


def chunk_payload_bytes(cache: Path, layer: Layer) -> int:
    """What the chunk cache holds of `layer` (its chunks are kept under keys that start
    with its digest until it verifies; each file's 32-byte header left out)."""
    prefix = sha(layer.blob).split(":")[1] + "-"
    return sum(p.stat().st_size - 32 for p in (cache / "chunks").glob(f"*/{prefix}*")
               if p.is_file())


async def big_kit(registry: RegistryServer, tmp: Path, *, toc: bool, size: int = 48 * MiB
                  ) -> tuple[Kit, Layer]:
    """A kit with one big weights file: as kit writes it (no table of contents: checked
    only whole), or as kitfs does (each chunk checked as it comes)."""
    project = tmp / "p"
    (project / "model").mkdir(parents=True)
    (project / "model" / "weights.bin").write_bytes(os.urandom(size))
    (project / "model" / "config.json").write_text("{}\n")
    (project / "README.md").write_text("# big\n")
    (project / "Kitfile").write_text("manifestVersion: 1.0.0\nmodel:\n  name: big\n"
                                     "  path: ./model\ndocs:\n  - path: ./README.md\n")
    if toc:
        ref = f"{registry.host}/unpack/big-kitfs-{tmp.name}:v1"
        proc = kitfs("pack", str(project), "-t", ref, home=tmp / "home")
        assert proc.returncode == 0, proc.stderr
        kit = await published(ref)
    else:
        paths = ["./model", "./README.md"]
        tars = [kit_tar(project, p, paths) for p in paths]
        kf = load_kitfile((project / "Kitfile").read_bytes())
        config = config_json(kf.with_layer_digests([(sha(t), sha(t)) for t in tars]))
        layers = [Layer(tars[0], mt.layer_media_type("model")),
                  Layer(tars[1], mt.layer_media_type("docs"))]
        manifest = {"schemaVersion": 2, "config": layer_desc(mt.KITOPS_CONFIG, config),
                    "layers": [layer_desc(x.media_type, x.blob) for x in layers]}
        repo = f"unpack/big-kit-{tmp.name}"
        await push_manifest(registry.host, repo, manifest, [config, *tars])
        kit = Kit(f"{registry.host}/{repo}:v1", layers, kitfile_yaml(config))
    return kit, max(kit.layers, key=lambda x: len(x.blob))


def through(proxy: FaultProxy, kit: Kit, registry: RegistryServer) -> str:
    return kit.ref.replace(registry.host, proxy.host, 1)


@pytest.mark.parametrize("toc", [False, True], ids=["kit-layer", "kitfs-layer"])
async def test_kill_9_mid_unpack_then_again_fetches_only_the_rest(
    logged_registry: RegistryServer, tmp_path: Path, toc: bool
) -> None:
    kit, big = await big_kit(logged_registry, tmp_path, toc=toc)
    out, cache = tmp_path / "out", tmp_path / "cache"
    with FaultProxy(logged_registry.host) as proxy:
        proxy.add(Slow(2 * MiB), path=sha(big.blob))  # ~8 MiB/s over four requests
        cmd = [sys.executable, "-m", "kitfs.cli", "unpack", through(proxy, kit, logged_registry),
               "-d", str(out), "--cache-dir", str(cache), "--config", str(tmp_path / "home")]
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not (cache / "chunks").is_dir() or (not toc and not temp_files(out)) or (
                    chunk_payload_bytes(cache, big) < len(big.blob) // 3):
                assert child.poll() is None, child.stderr.read() if child.stderr else ""
                assert time.monotonic() < deadline, "the unpack made no progress"
                time.sleep(0.05)
            child.send_signal(signal.SIGKILL)
            child.wait()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    cached = chunk_payload_bytes(cache, big)
    assert 0 < cached < len(big.blob)
    weights = out / "model" / "weights.bin"
    want = tmp_path / "want"
    extract_like_tar(kit, want)
    # Never a half-written file under its final name; of a layer checked only whole, not
    # even a whole one (the layer was not verified).
    assert not weights.exists() if not toc else (
        not weights.exists() or weights.read_bytes() == (want / "model/weights.bin").read_bytes())
    assert temp_files(out) or toc  # what the killed unpack was writing

    mark = logged_registry.mark()
    proc = unpack(kit.ref, out, tmp_path, "-i")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(out) == snapshot(want)
    assert not temp_files(out)  # the killed unpack's, removed
    again = served(logged_registry, mark, sha(big.blob))
    # Only what the cache did not hold (plus, for a kit layer, its tar headers read again
    # to list it: a few windows of 64 KiB, far less than the 2 MiB of one chunk).
    assert 0 < again <= len(big.blob) - cached + 256 * 1024, (again, cached, len(big.blob))


@pytest.mark.parametrize("maker", [kit_1_7, kitfs_packed("none"), newer_kit],
                         ids=["kit-1.7", "kitfs", "newer-kit"])
async def test_a_second_unpack_needs_no_layer_from_the_registry(
    logged_registry: RegistryServer, tmp_path: Path,
    maker: Callable[[RegistryServer, Path], Awaitable[Kit]],
) -> None:
    """After a complete unpack the cache holds every layer, checked: with the registry's
    blob store gone (every layer request fails) a second unpack still completes."""
    kit = await maker(logged_registry, tmp_path)
    proc = unpack(kit.ref, tmp_path / "first", tmp_path)
    assert proc.returncode == 0, proc.stderr
    with FaultProxy(logged_registry.host) as proxy:
        for layer in kit.layers:
            proxy.add(Status(503), path=sha(layer.blob))
        mark = logged_registry.mark()
        proc = unpack(through(proxy, kit, logged_registry), tmp_path / "second", tmp_path,
                      "--timeout", "5")
        assert proc.returncode == 0, proc.stderr
        assert not [s for s in proxy.requests() if "/blobs/" in s.path and s.status == 503]
    assert sum(served(logged_registry, mark, sha(x.blob)) for x in kit.layers) == 0
    assert snapshot(tmp_path / "second") == snapshot(tmp_path / "first")


@pytest.mark.parametrize("toc", [False, True], ids=["kit-layer", "kitfs-layer"])
async def test_a_registry_that_lies_fails_the_unpack_and_leaves_no_file_of_it(
    registry: RegistryServer, tmp_path: Path, toc: bool
) -> None:
    kit, big = await big_kit(registry, tmp_path, toc=toc, size=6 * MiB)
    out = tmp_path / "out"
    with FaultProxy(registry.host) as proxy:
        proxy.add(Corrupt([len(big.blob) // 2]), path=sha(big.blob))
        proc = unpack(through(proxy, kit, registry), out, tmp_path, "--timeout", "5")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and ("digest" in proc.stderr or "match" in proc.stderr)
    assert not (out / "model" / "weights.bin").exists()
    assert not temp_files(out)


@pytest.mark.parametrize("toc", [False, True], ids=["kit-layer", "kitfs-layer"])
async def test_a_registry_that_dies_mid_unpack_is_one_line_and_no_temporary_file(
    registry: RegistryServer, tmp_path: Path, toc: bool
) -> None:
    kit, big = await big_kit(registry, tmp_path, toc=toc, size=24 * MiB)
    out = tmp_path / "out"
    with FaultProxy(registry.host) as proxy:
        proxy.add(Reset(), path=sha(big.blob), overlaps=(12 * MiB, 13 * MiB))
        proc = unpack(through(proxy, kit, registry), out, tmp_path, "--timeout", "3")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("kitfs: error: ") and proc.stderr.count("\n") == 1
    assert not (out / "model" / "weights.bin").exists()
    assert not temp_files(out)
    proc = unpack(kit.ref, out, tmp_path, "-i")  # and the next run completes
    assert proc.returncode == 0, proc.stderr
    assert (out / "model" / "weights.bin").read_bytes() == uncompressed_file(big, "weights.bin")


def uncompressed_file(layer: Layer, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(uncompressed(layer))) as tar:
        for member in tar.getmembers():
            if member.name.endswith(name):
                data = tar.extractfile(member)
                assert data is not None
                return data.read()
    raise KeyError(name)


async def test_ctrl_c_removes_the_temporary_files(registry: RegistryServer, tmp_path: Path
                                                 ) -> None:
    kit, big = await big_kit(registry, tmp_path, toc=True, size=24 * MiB)
    out = tmp_path / "out"
    with FaultProxy(registry.host) as proxy:
        proxy.add(Slow(1 * MiB), path=sha(big.blob))
        cmd = [sys.executable, "-m", "kitfs.cli", "unpack", through(proxy, kit, registry),
               "-d", str(out), "--cache-dir", str(tmp_path / "cache"),
               "--config", str(tmp_path / "home")]
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True)
        deadline = time.monotonic() + 30
        while not temp_files(out):
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=30)
    assert child.returncode == 130, err
    assert err == "kitfs: interrupted\n"
    assert not temp_files(out)
    assert not (out / "model" / "weights.bin").exists()


async def test_a_full_disk_is_one_line_and_no_temporary_file(
    registry: RegistryServer, tmp_path: Path
) -> None:
    kit, _ = await big_kit(registry, tmp_path, toc=True, size=8 * MiB)
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {mounted.stderr.decode().strip()}")
    try:
        proc = unpack(kit.ref, small / "out", tmp_path)
        assert proc.returncode == 1
        assert proc.stderr.count("\n") == 1 and "disk is full" in proc.stderr, proc.stderr
        assert not temp_files(small / "out")
        assert not (small / "out" / "model" / "weights.bin").exists()
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_pulled_modelkit_unpacks_with_the_registry_stopped(tmp_path: Path) -> None:
    """pull, then unpack offline: kit's local storage is looked in first, as kit does, and
    nothing asks a registry that is gone (a fresh chunk cache: every byte from storage)."""
    from registry import running_registry

    home = tmp_path / "home"
    project = make_project(tmp_path / "project", weight_bytes=3 << 20)
    with running_registry(tmp_path / "registry") as server:
        ref = f"{server.host}/offline/unpack:v1"
        packed = kitfs("pack", str(project), "-t", ref, home=tmp_path / "packer")
        assert packed.returncode == 0, packed.stderr
        pulled = kitfs("pull", ref, home=home)
        assert pulled.returncode == 0, pulled.stderr
    out = tmp_path / "out"
    done = kitfs("unpack", ref, "-d", str(out), "--cache-dir", str(tmp_path / "cache"),
                 "--timeout", "2", home=home)
    assert done.returncode == 0, done.stderr
    for name in ("model/model.safetensors", "Kitfile"):
        assert (out / name).read_bytes() == (project / name).read_bytes()
