"""ModelKits as every generation of `kit` (and ModelPack tools) wrote them, read from a registry.

Each case is pushed as raw blobs and a hand-written manifest: no kitfs table
of contents, so `ls` must walk tar headers with range requests, stream
compressed layers, or read raw-layer annotations.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import zstandard

from helpers import (
    kit_tar,
    kitfs,
    layer_desc,
    make_project,
    push_manifest,
    sha,
    source_files,
)
from kitfs.modelkit import mediatypes as mt
from kitfs.modelkit.kitfile import config_json, load_kitfile
from mounting import mounted
from registry import RegistryServer


def check_mount(ref: str, tmp_path: Path, want: dict[str, str]) -> None:
    """Mount `ref` for real and compare every expected file's sha256 (and the file set)."""
    with mounted(ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
        got = {p.relative_to(mnt).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in mnt.rglob("*") if p.is_file()}
    assert "Kitfile" in got
    del got["Kitfile"]
    assert got == want


def ls(ref: str) -> dict[str, int]:
    proc = kitfs("ls", ref, "--json")
    assert proc.returncode == 0, proc.stderr
    return {e["path"]: e["size"] for e in json.loads(proc.stdout) if e["type"] == "file"}


async def test_kit_1_7_uncompressed_without_media_type(
    registry: RegistryServer, tmp_path: Path
) -> None:
    project = make_project(tmp_path / "p")
    paths = ["./model", "./data/train.csv", "./README.md"]
    tars = [kit_tar(project, p, paths) for p in paths]
    kf = load_kitfile((project / "Kitfile").read_bytes())
    config = config_json(kf.with_layer_digests([(sha(t), sha(t)) for t in tars]))
    kinds = ["model", "dataset", "docs"]
    manifest = {  # kit <= 1.7: no mediaType, no artifactType
        "schemaVersion": 2,
        "config": layer_desc(mt.KITOPS_CONFIG, config),
        "layers": [layer_desc(mt.layer_media_type(k), t) for k, t in zip(kinds, tars, strict=True)],
        "annotations": {mt.ANNOTATION_CLI_VERSION: "1.7.0"},
    }
    await push_manifest(registry.host, "gen/kit17", manifest, [config, *tars])
    files = ls(f"{registry.host}/gen/kit17:v1")
    assert files["model/model.safetensors"] == 3 << 20
    assert files["data/train.csv"] == len("a,b\n1,2\n" * 1000)
    assert files["README.md"] == len("# tiny model\n")
    assert "Kitfile" in files and "model/scratch.tmp" not in files
    check_mount(f"{registry.host}/gen/kit17:v1", tmp_path, source_files(project))


async def test_newer_kit_gzip_zstd_raw_and_prompts(
    registry: RegistryServer, tmp_path: Path
) -> None:
    project = tmp_path / "p"
    (project / "weights").mkdir(parents=True)
    (project / "weights" / "a.bin").write_bytes(b"A" * 70000)
    (project / "data").mkdir()
    (project / "data" / "x.txt").write_text("x" * 5000)
    (project / "prompts").mkdir()
    (project / "prompts" / "system.md").write_text("be kind\n")
    raw = b"R" * 12345
    (project / "model.gguf").write_bytes(raw)
    (project / "Kitfile").write_text(
        "manifestVersion: 1.0.0\n"
        "model:\n  name: m\n  path: ./model.gguf\n"
        "  parts:\n    - name: w\n      path: ./weights\n"
        "datasets:\n  - name: d\n    path: ./data\n"
        "prompts:\n  - name: sys\n    path: ./prompts\n"
    )
    others = ["./model.gguf", "./weights", "./data", "./prompts"]
    part = gzip.compress(kit_tar(project, "./weights", others), mtime=0)
    data = zstandard.ZstdCompressor().compress(kit_tar(project, "./data", others))
    prompts = kit_tar(project, "./prompts", others)
    kf = load_kitfile((project / "Kitfile").read_bytes())
    config = config_json(kf.with_layer_digests(
        [(sha(raw), sha(raw)), (sha(part), sha(gzip.decompress(part))),
         (sha(data), sha(zstandard.ZstdDecompressor().decompress(data))),
         (sha(prompts), sha(prompts))]))
    meta = json.dumps({"name": "model.gguf", "mode": 0o640, "uid": 0, "gid": 0,
                       "size": len(raw), "mtime": "1970-01-01T00:00:00Z", "typeflag": 48})
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": mt.KITOPS_ARTIFACT_TYPE,
        "config": layer_desc(mt.KITOPS_CONFIG, config),
        "layers": [
            layer_desc(mt.layer_media_type("model", "raw"), raw,
                 {mt.ANNOTATION_FILEPATH: "model.gguf", mt.ANNOTATION_FILE_METADATA: meta}),
            layer_desc(mt.layer_media_type("modelpart", "tar", "gzip"), part,
                 {mt.ANNOTATION_FILEPATH: "weights"}),
            layer_desc(mt.layer_media_type("dataset", "tar", "zstd"), data,
                 {mt.ANNOTATION_FILEPATH: "data"}),
            layer_desc(mt.layer_media_type("code"), prompts,
                 {mt.ANNOTATION_FILEPATH: "prompts",
                  mt.ANNOTATION_LAYER_SUBTYPE: mt.LAYER_SUBTYPE_PROMPT}),
        ],
        "annotations": {mt.ANNOTATION_CLI_VERSION: "1.9.0",
                        mt.ANNOTATION_CREATED: "2026-01-01T00:00:00Z"},
    }
    await push_manifest(registry.host, "gen/newer", manifest, [config, raw, part, data, prompts])
    ref = f"{registry.host}/gen/newer:v1"
    assert ls(ref) == {"Kitfile": ls(ref)["Kitfile"], "model.gguf": len(raw),
                       "weights/a.bin": 70000, "data/x.txt": 5000, "prompts/system.md": 8}
    proc = kitfs("ls", ref, "--json", "--filter", "prompts")
    assert [e["path"] for e in json.loads(proc.stdout) if e["type"] == "file"] == [
        "prompts/system.md"]
    listing = json.loads(kitfs("ls", ref, "--json").stdout)
    assert {e["path"]: e["mode"] for e in listing}["model.gguf"] == oct(0o640)
    want = {p.relative_to(project).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in project.rglob("*") if p.is_file() and p.name != "Kitfile"}
    check_mount(ref, tmp_path, want)


async def test_modelpack_with_kitfile_annotation(registry: RegistryServer, tmp_path: Path) -> None:
    weights = b"W" * 4096
    cfg = b'{"architectures": ["X"]}'
    kitfile = {"manifestVersion": "1.0.0", "package": {"name": "mp"},
               "model": {"name": "mp", "path": "model.safetensors",
                         "parts": [{"path": "config.json"}]}}
    model_config = json.dumps({"descriptor": {"name": "mp"},
                               "modelfs": {"type": "layers",
                                           "diffIds": [sha(weights), sha(cfg)]}}).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": mt.MODELPACK_ARTIFACT_TYPE,
        "config": layer_desc(mt.MODELPACK_CONFIG, model_config),
        "layers": [
            layer_desc("application/vnd.cncf.model.weight.v1.raw", weights,
                 {mt.ANNOTATION_FILEPATH: "model.safetensors"}),
            layer_desc("application/vnd.cncf.model.weight.config.v1.raw", cfg,
                 {mt.ANNOTATION_FILEPATH: "config.json"}),
        ],
        "annotations": {mt.ANNOTATION_KITFILE: json.dumps(kitfile)},
    }
    await push_manifest(registry.host, "gen/modelpack", manifest, [model_config, weights, cfg])
    files = ls(f"{registry.host}/gen/modelpack:v1")
    assert files["model.safetensors"] == 4096 and files["config.json"] == len(cfg)
    check_mount(f"{registry.host}/gen/modelpack:v1", tmp_path,
                {"model.safetensors": sha(weights)[7:], "config.json": sha(cfg)[7:]})


async def test_pre_v0_5_layers_are_rooted_at_the_parent(
    registry: RegistryServer, tmp_path: Path
) -> None:
    project = tmp_path / "p"
    (project / "models").mkdir(parents=True)
    (project / "models" / "bert.pkl").write_bytes(b"B" * 3000)
    # entries relative to the parent of the layer path, as kit < 0.5 wrote them
    tar = kit_tar(project / "models", "./bert.pkl", ["./bert.pkl"])
    config = json.dumps({"manifestVersion": "1.0.0", "package": {},
                         "model": {"name": "bert", "path": "models/bert.pkl"}}).encode()
    manifest = {"schemaVersion": 2, "config": layer_desc(mt.KITOPS_CONFIG, config),
                "layers": [layer_desc(mt.layer_media_type("model"), tar)]}
    await push_manifest(registry.host, "gen/legacy", manifest, [config, tar])
    files = ls(f"{registry.host}/gen/legacy:v1")
    assert files["models/bert.pkl"] == 3000
    check_mount(f"{registry.host}/gen/legacy:v1", tmp_path,
                {"models/bert.pkl": hashlib.sha256(b"B" * 3000).hexdigest()})


async def test_four_hundred_small_files_and_long_names(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """Many tiny files (one tar-header window each) and PAX names, kit-made and kitfs-made."""
    project = tmp_path / "p"
    data = project / "data"
    for i in range(400):
        sub = data / f"shard-{i % 7}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"row-{i:04d}.json").write_text(json.dumps({"i": i, "pad": "x" * (i % 900)}))
    deep = data / ("d" * 90) / ("é" * 60)
    deep.mkdir(parents=True)
    (deep / ("n" * 120 + ".txt")).write_text("deep\n")
    (project / "Kitfile").write_text(
        "manifestVersion: 1.0.0\ndatasets:\n  - name: rows\n    path: ./data\n")
    want = source_files(project)
    tar = kit_tar(project, "./data", ["./data"])
    kf = load_kitfile((project / "Kitfile").read_bytes())
    config = config_json(kf.with_layer_digests([(sha(tar), sha(tar))]))
    manifest = {"schemaVersion": 2, "config": layer_desc(mt.KITOPS_CONFIG, config),
                "layers": [layer_desc(mt.layer_media_type("dataset"), tar)]}
    await push_manifest(registry.host, "gen/small-files", manifest, [config, tar])
    check_mount(f"{registry.host}/gen/small-files:v1", tmp_path / "kit", want)
    ref = f"{registry.host}/gen/small-files-kitfs:v1"
    proc = kitfs("pack", str(project), "-t", ref, "--compression", "gzip",
                 home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    check_mount(ref, tmp_path / "kitfs", want)
