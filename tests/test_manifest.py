"""Manifests and media types: writing as kit writes, reading every generation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from kitfs.errors import FormatError, IntegrityError
from kitfs.modelkit import mediatypes as mt
from kitfs.modelkit.kitfile import (
    Code,
    Dataset,
    Docs,
    Kitfile,
    Model,
    ModelPart,
    config_json,
    kitfile_from_config,
    load_kitfile,
)
from kitfs.modelkit.manifest import (
    LayerDescriptorInput,
    RawFileMetadata,
    build_manifest,
    created_timestamp,
    kit_annotations,
    parse_modelkit,
    sha256_digest,
)

KITOPS_DATA = Path(__file__).parent / "data" / "kitfiles" / "kitops"


def d(char: str) -> str:
    return "sha256:" + char * 64


def manifest_bytes(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()


def config_desc(config: bytes, media_type: str = mt.KITOPS_CONFIG) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256_digest(config), "size": len(config)}


# ---------------------------------------------------------------------------------------------
# media types
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("model",), "application/vnd.kitops.modelkit.model.v1.tar"),
        (("modelpart", "tar", "gzip"), "application/vnd.kitops.modelkit.modelpart.v1.tar+gzip"),
        (("dataset", "tar", "gzip-fastest"), "application/vnd.kitops.modelkit.dataset.v1.tar+gzip"),
        (("code", "raw", "zstd"), "application/vnd.kitops.modelkit.code.v1.raw+zstd"),
        (("prompt",), "application/vnd.kitops.modelkit.code.v1.tar"),
        (("docs", "raw"), "application/vnd.kitops.modelkit.docs.v1.raw"),
        (("mcpserver", "raw"), "application/vnd.kitops.modelkit.mcpb.v1.raw"),
    ],
)
def test_kitops_layer_media_types(args: tuple[str, ...], expected: str) -> None:
    assert mt.layer_media_type(*args) == expected


@pytest.mark.parametrize(
    ("kind", "fmt", "comp", "expected"),
    [
        ("model", "raw", "none", "application/vnd.cncf.model.weight.v1.raw"),
        ("model", "tar", "zstd", "application/vnd.cncf.model.weight.v1.tar+zstd"),
        ("modelpart", "tar", "none", "application/vnd.cncf.model.weight.config.v1.tar"),
        ("modelpart", "raw", "none", "application/vnd.cncf.model.weight.config.v1.raw"),
        ("docs", "tar", "gzip", "application/vnd.cncf.model.doc.v1.tar+gzip"),
        ("code", "raw", "none", "application/vnd.cncf.model.code.v1.raw"),
        ("dataset", "tar", "none", "application/vnd.cncf.model.dataset.v1.tar"),
    ],
)
def test_modelpack_layer_media_types(kind: str, fmt: str, comp: str, expected: str) -> None:
    assert mt.layer_media_type(kind, fmt, comp, family="modelpack") == expected
    parsed = mt.parse_layer_media_type(expected)
    assert parsed.family == "modelpack"
    assert parsed.media_type == expected


def test_every_kitops_media_type_round_trips() -> None:
    for kind in mt.LAYER_KINDS:
        for fmt in ("tar", "raw"):
            for comp in ("none", "gzip", "zstd"):
                if kind == "mcpb" and (fmt, comp) != ("raw", "none"):
                    continue
                text = mt.layer_media_type(kind, fmt, comp)
                assert mt.parse_layer_media_type(text) == mt.LayerType(kind, fmt, comp, "kitops")


@pytest.mark.parametrize(
    "bad",
    [
        "application/vnd.kitops.modelkit.config.v1+json",
        "application/vnd.kitops.modelkit.kitfile.v1.tar",
        "application/vnd.kitops.modelkit.model.v1.zip",
        "application/vnd.kitops.modelkit.model.v1.tar+lz4",
        "application/vnd.cncf.model.weight.v1.raw+gzip",
        "application/vnd.cncf.model.unrecognized.v1.raw",
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.kitops.modelkit.model.v1.tar+gzip; charset=x",
    ],
)
def test_unparseable_layer_media_types(bad: str) -> None:
    with pytest.raises(FormatError):
        mt.parse_layer_media_type(bad)


def test_layer_media_type_rejects_what_kit_cannot_write() -> None:
    with pytest.raises(ValueError):
        mt.layer_media_type("model", "raw", "gzip", family="modelpack")
    with pytest.raises(ValueError):
        mt.layer_media_type("mcpserver", "tar")
    with pytest.raises(ValueError):
        mt.layer_media_type("mcpserver", "raw", family="modelpack")
    with pytest.raises(ValueError):
        mt.layer_media_type("weights")
    with pytest.raises(ValueError):
        mt.layer_media_type("model", "tar", "lz4")


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def test_build_manifest_bytes_like_kit() -> None:
    config = b'{"manifestVersion":"1.0.0","package":{}}'
    layers = [
        LayerDescriptorInput(mt.layer_media_type("model"), d("a"), 1234),
        LayerDescriptorInput(
            mt.layer_media_type("prompt"),
            d("b"),
            5,
            {mt.ANNOTATION_LAYER_SUBTYPE: "prompt", mt.ANNOTATION_FILEPATH: "p<1>.md"},
        ),
    ]
    annotations = {
        mt.ANNOTATION_CREATED: "2024-01-02T03:04:05Z",
        mt.ANNOTATION_CLI_VERSION: "1.7.0",
    }
    cfg = hashlib.sha256(config).hexdigest()
    expected = (
        '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        '"config":{"mediaType":"application/vnd.kitops.modelkit.config.v1+json",'
        f'"digest":"sha256:{cfg}","size":{len(config)}}},'
        '"layers":[{"mediaType":"application/vnd.kitops.modelkit.model.v1.tar",'
        f'"digest":"{d("a")}","size":1234}},'
        '{"mediaType":"application/vnd.kitops.modelkit.code.v1.tar",'
        f'"digest":"{d("b")}","size":5,'
        '"annotations":{"ml.kitops.modelkit.layer-subtype":"prompt",'
        '"org.cncf.model.filepath":"p\\u003c1\\u003e.md"}}],'
        '"annotations":{"ml.kitops.modelkit.cli-version":"1.7.0",'
        '"org.opencontainers.image.created":"2024-01-02T03:04:05Z"}}'
    )
    assert build_manifest(config, layers, annotations).decode() == expected
    newer = build_manifest(config, layers, annotations, newer_style=True).decode()
    assert newer == expected.replace(
        '"mediaType":"application/vnd.oci.image.manifest.v1+json",',
        '"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        '"artifactType":"application/vnd.kitops.modelkit.manifest.v1+json",',
    )


def test_build_manifest_empty_layers_and_no_annotations() -> None:
    config = b"{}"
    out = json.loads(
        build_manifest(config, [], None, newer_style=True, config_media_type=mt.MODELPACK_CONFIG)
    )
    assert out["layers"] == []
    assert "annotations" not in out
    assert out["artifactType"] == mt.MODELPACK_ARTIFACT_TYPE


def test_build_manifest_rejects_bad_digests() -> None:
    with pytest.raises(ValueError, match="invalid digest"):
        build_manifest(
            b"{}", [LayerDescriptorInput(mt.layer_media_type("model"), "sha256:../x", 1)], None
        )


def test_created_timestamp_honours_source_date_epoch() -> None:
    assert created_timestamp({"SOURCE_DATE_EPOCH": "1700000000"}) == "2023-11-14T22:13:20Z"
    assert created_timestamp({}, now=0) == "1970-01-01T00:00:00Z"
    with pytest.raises(ValueError):
        created_timestamp({"SOURCE_DATE_EPOCH": "soon"})
    assert kit_annotations("1.0.0") == {mt.ANNOTATION_CLI_VERSION: "1.0.0"}


def test_pack_then_parse_round_trip() -> None:
    kf = load_kitfile(
        "manifestVersion: 1.0.0\nmodel:\n  name: m\n  path: ./models/\n  parts:\n"
        "    - name: tok\n      path: tokenizer.json\ncode:\n  - path: src\n"
    )
    digests = [(d("a"), d("b")), (d("c"), d("c")), (d("e"), d("f"))]
    packed = kf.with_layer_digests(digests)
    config = config_json(packed)
    layers = [
        LayerDescriptorInput(mt.layer_media_type("model", "tar", "gzip"), d("a"), 10),
        LayerDescriptorInput(mt.layer_media_type("modelpart", "raw"), d("c"), 20),
        LayerDescriptorInput(mt.layer_media_type("code", "tar", "zstd"), d("e"), 30),
    ]
    manifest = build_manifest(config, layers, kit_annotations("1.7.0"), newer_style=True)
    view = parse_modelkit(manifest, config)
    assert view.kitfile == packed
    assert view.kitfile_source == "config"
    assert view.artifact_type == mt.KITOPS_ARTIFACT_TYPE
    assert [(x.kind, x.clean_path, x.fmt, x.compression, x.diff_id) for x in view.layers] == [
        ("model", "models", "tar", "gzip", d("b")),
        ("modelpart", "tokenizer.json", "raw", "none", d("c")),
        ("code", "src", "tar", "zstd", d("f")),
    ]
    assert view.layers[0].ids == ("m", "./models/")


# ---------------------------------------------------------------------------------------------
# reading: kit's own golden manifests (kit 0.2.5: no mediaType, pre-v0.5 config)
# ---------------------------------------------------------------------------------------------


def test_golden_old_manifest_with_legacy_config() -> None:
    manifest = (KITOPS_DATA / "compare-manifest-manifestA.json").read_bytes()
    config = (
        b'{"manifestVersion":"1.0.0","package":{"name":"old"},'
        b'"model":{"path":"models/bert.pkl"},"code":[{"path":"."}]}'
    )
    view = parse_modelkit(manifest, config, verify_config=False)
    assert view.manifest_media_type is None
    assert view.artifact_type is None
    assert view.family == "kitops"
    assert view.cli_version == "0.2.5-29dbdc4"
    assert view.created is None
    assert view.config.digest == "sha256:configA"
    model, code = view.layers
    assert (model.kind, model.digest, model.size, model.path, model.legacy_root) == (
        "model",
        "sha256:layer1",
        123456789,
        "models/bert.pkl",
        True,
    )
    assert model.tar_root == "models"
    assert model.diff_id == "sha256:layer1"
    assert (code.kind, code.clean_path, code.tar_root, code.entry_index) == ("code", ".", ".", 0)
    # The config blob is checked against its descriptor unless told otherwise.
    with pytest.raises(IntegrityError, match="the manifest says 409"):
        parse_modelkit(manifest, config)


def test_golden_manifest_without_cli_annotation() -> None:
    manifest = (KITOPS_DATA / "compare-manifest-manifestD.json").read_bytes()
    config = b'{"manifestVersion":"1.0.0","model":{"path":"m"},"code":[{"path":"c"}]}'
    view = parse_modelkit(manifest, config, verify_config=False)
    assert view.cli_version is None
    assert view.annotations == {"somekey": "0.2.5-29dbdc4"}


# ---------------------------------------------------------------------------------------------
# reading: kit v0.5 - v1.7 (digests in config, no mediaType/artifactType)
# ---------------------------------------------------------------------------------------------


def test_kit_1_7_manifest_matches_layers_by_order_and_checks_digests() -> None:
    kf = Kitfile(
        manifest_version="1.0.0",
        model=Model(name="m", path="model", digest=d("1"), diff_id=d("a")),
        code=(
            Code(path="a", digest=d("2"), diff_id=d("b")),
            Code(path="b", digest=d("3"), diff_id=d("c")),
        ),
        datasets=(Dataset(name="train", path="data", digest=d("4"), diff_id=d("d")),),
        docs=(Docs(path="README.md", digest=d("5"), diff_id=d("e")),),
    )
    config = config_json(kf)
    gz = "application/vnd.kitops.modelkit.{}.v1.tar+gzip"
    manifest = manifest_bytes(
        {
            "schemaVersion": 2,
            "config": config_desc(config),
            "layers": [
                {"mediaType": gz.format("model"), "digest": d("1"), "size": 1},
                {"mediaType": gz.format("code"), "digest": d("2"), "size": 2},
                {"mediaType": gz.format("code"), "digest": d("3"), "size": 3},
                {"mediaType": gz.format("dataset"), "digest": d("4"), "size": 4},
                {"mediaType": gz.format("docs"), "digest": d("5"), "size": 5},
            ],
            "annotations": {mt.ANNOTATION_CLI_VERSION: "1.7.0"},
        }
    )
    view = parse_modelkit(manifest, config)
    assert [(x.kind, x.path, x.entry_index, x.diff_id, x.legacy_root) for x in view.layers] == [
        ("model", "model", 0, d("a"), False),
        ("code", "a", 0, d("b"), False),
        ("code", "b", 1, d("c"), False),
        ("dataset", "data", 0, d("d"), False),
        ("docs", "README.md", 0, d("e"), False),
    ]
    assert view.layers[3].ids == ("train", "data")
    assert all(x.compression == "gzip" for x in view.layers)

    # swap two code layers: the config's digests no longer match (kit refuses too)
    swapped = json.loads(manifest)
    swapped["layers"][1], swapped["layers"][2] = swapped["layers"][2], swapped["layers"][1]
    with pytest.raises(
        FormatError, match=r"digest in config and manifest do not match for code\[0\]"
    ):
        parse_modelkit(manifest_bytes(swapped), config)


# ---------------------------------------------------------------------------------------------
# reading: newer kit (mediaType + artifactType, raw layers, prompts, mcpb, remote datasets)
# ---------------------------------------------------------------------------------------------


def test_newer_kit_manifest() -> None:
    kf = load_kitfile(
        """\
manifestVersion: 1.0.0
model:
  name: llama
  path: models/llama.gguf
  parts:
    - name: lora
      path: adapters/
datasets:
  - name: remote
    path: data/remote
    remotePath: s3://bucket/key
    remoteHash: abc
  - name: eval
    path: data/eval.parquet
code:
  - path: src
prompts:
  - name: sys
    path: prompts/system.md
mcpServers:
  - name: fs
    path: fs.mcpb
"""
    )
    digests = [(d(c), d(c)) for c in "123456"]
    config = config_json(kf.with_layer_digests(digests))
    meta = {
        "name": "llama.gguf",
        "mode": 420,
        "uid": 0,
        "gid": 0,
        "size": 7,
        "mtime": "2024-01-01T00:00:00Z",
        "typeflag": 48,
    }
    layers = [
        {
            "mediaType": "application/vnd.kitops.modelkit.model.v1.raw",
            "digest": d("1"),
            "size": 7,
            "annotations": {
                mt.ANNOTATION_FILEPATH: "models/llama.gguf",
                mt.ANNOTATION_FILE_METADATA: json.dumps(meta),
            },
        },
        {
            "mediaType": "application/vnd.kitops.modelkit.modelpart.v1.tar+zstd",
            "digest": d("2"),
            "size": 8,
            "annotations": {mt.ANNOTATION_FILEPATH: "adapters"},
        },
        {"mediaType": "application/vnd.kitops.modelkit.code.v1.tar", "digest": d("3"), "size": 9},
        {
            "mediaType": "application/vnd.kitops.modelkit.dataset.v1.raw",
            "digest": d("4"),
            "size": 10,
        },
        {
            "mediaType": "application/vnd.kitops.modelkit.code.v1.tar",
            "digest": d("5"),
            "size": 11,
            "annotations": {mt.ANNOTATION_LAYER_SUBTYPE: mt.LAYER_SUBTYPE_PROMPT},
        },
        {"mediaType": "application/vnd.kitops.modelkit.mcpb.v1.raw", "digest": d("6"), "size": 12},
    ]
    manifest = manifest_bytes(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "artifactType": mt.KITOPS_ARTIFACT_TYPE,
            "config": config_desc(config),
            "layers": layers,
            "annotations": {
                mt.ANNOTATION_CLI_VERSION: "1.9.0",
                mt.ANNOTATION_CREATED: "2025-01-01T00:00:00Z",
            },
        }
    )
    view = parse_modelkit(manifest, config)
    assert view.manifest_media_type == mt.OCI_MANIFEST
    assert view.created == "2025-01-01T00:00:00Z"
    assert [(x.kind, x.layer_kind, x.fmt, x.path, x.name, x.entry_index) for x in view.layers] == [
        ("model", "model", "raw", "models/llama.gguf", "llama", 0),
        ("modelpart", "modelpart", "tar", "adapters/", "lora", 0),
        ("code", "code", "tar", "src", None, 0),
        ("dataset", "dataset", "raw", "data/eval.parquet", "eval", 1),
        ("prompt", "code", "tar", "prompts/system.md", "sys", 0),
        ("mcpserver", "mcpb", "raw", "fs.mcpb", "fs", 0),
    ]
    assert view.layers[0].file_metadata == RawFileMetadata(
        name="llama.gguf", mode=0o644, size=7, mtime="2024-01-01T00:00:00Z", typeflag=48
    )
    assert view.layers[1].compression == "zstd"
    assert view.layers[3].file_metadata is None  # raw without the annotation
    assert view.layers[0].annotations[mt.ANNOTATION_FILEPATH] == "models/llama.gguf"


def test_model_reference_has_no_model_layer() -> None:
    kf = Kitfile(
        manifest_version="1.0.0",
        model=Model(
            path="registry.example.com/org/base:v1", parts=(ModelPart(path="lora", digest=d("1")),)
        ),
    )
    config = config_json(kf)
    manifest = manifest_bytes(
        {
            "schemaVersion": 2,
            "config": config_desc(config),
            "layers": [
                {"mediaType": mt.layer_media_type("modelpart"), "digest": d("1"), "size": 1}
            ],
        }
    )
    view = parse_modelkit(manifest, config)
    assert view.model_reference == "registry.example.com/org/base:v1"
    assert [x.kind for x in view.layers] == ["modelpart"]
    bad = json.loads(manifest)
    bad["layers"].insert(
        0, {"mediaType": mt.layer_media_type("model"), "digest": d("2"), "size": 1}
    )
    with pytest.raises(
        FormatError, match=r"layer 0 .* has no matching entry in the Kitfile's model"
    ):
        parse_modelkit(manifest_bytes(bad), config)


def test_config_fetched_later_kitfile_from_filepath_annotations() -> None:
    manifest = manifest_bytes(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "artifactType": mt.KITOPS_ARTIFACT_TYPE,
            "config": {"mediaType": mt.KITOPS_CONFIG, "digest": d("0"), "size": 10},
            "layers": [
                {
                    "mediaType": mt.layer_media_type("model"),
                    "digest": d("1"),
                    "size": 1,
                    "annotations": {mt.ANNOTATION_FILEPATH: "model"},
                },
                {
                    "mediaType": mt.layer_media_type("prompt"),
                    "digest": d("2"),
                    "size": 1,
                    "annotations": {
                        mt.ANNOTATION_FILEPATH: "p.md",
                        mt.ANNOTATION_LAYER_SUBTYPE: "prompt",
                    },
                },
            ],
        }
    )
    view = parse_modelkit(manifest, None)
    assert view.kitfile_source == "derived"
    assert [(x.kind, x.path, x.legacy_root) for x in view.layers] == [
        ("model", "model", False),
        ("prompt", "p.md", False),
    ]


# ---------------------------------------------------------------------------------------------
# reading: ModelPack (cases from kitops pkg/artifact/testdata/kitfile-generation)
# ---------------------------------------------------------------------------------------------

MP_LAYERS = [
    ("weight.v1.raw", "aaa", "test-file.safetensors"),
    ("weight.config.v1.tar", "bbb", "test-config.json"),
    ("weight.config.v1.tar", "ccc", "test-config-2.json"),
    ("doc.v1.tar", "ddd", "README.md"),
    ("doc.v1.tar", "eee", "LICENSE"),
    ("dataset.v1.tar", "fff", "datasets/dataset.parquet"),
    ("code.v1.tar", "999", "src/test.sh"),
]


def modelpack_manifest(
    layers: list[tuple[str, str, str]], annotations: dict[str, str] | None = None
) -> bytes:
    obj: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": mt.MODELPACK_ARTIFACT_TYPE,
        "config": {"mediaType": mt.MODELPACK_CONFIG, "size": 300, "digest": "sha256:123"},
        "layers": [
            {
                "mediaType": f"application/vnd.cncf.model.{kind}",
                "size": 100,
                "digest": f"sha256:{digest}",
                "annotations": {mt.ANNOTATION_FILEPATH: path},
            }
            for kind, digest, path in layers
        ],
    }
    if annotations:
        obj["annotations"] = annotations
    return manifest_bytes(obj)


def modelpack_config(layers: list[tuple[str, str, str]]) -> bytes:
    return manifest_bytes(
        {"modelfs": {"type": "layers", "diffIds": [f"sha256:{x[1]}1" for x in layers]}}
    )


def test_modelpack_without_kitfile_derives_one() -> None:
    view = parse_modelkit(
        modelpack_manifest(MP_LAYERS), modelpack_config(MP_LAYERS), verify_config=False
    )
    expected = kitfile_from_config(
        b"""{
        "manifestVersion": "1.0.0",
        "model": {"path": "test-file.safetensors", "digest": "sha256:aaa", "diffId": "sha256:aaa1",
          "parts": [
            {"path": "test-config.json", "digest": "sha256:bbb", "diffId": "sha256:bbb1"},
            {"path": "test-config-2.json", "digest": "sha256:ccc", "diffId": "sha256:ccc1"}]},
        "docs": [{"path": "README.md", "digest": "sha256:ddd", "diffId": "sha256:ddd1"},
                 {"path": "LICENSE", "digest": "sha256:eee", "diffId": "sha256:eee1"}],
        "code": [{"path": "src/test.sh", "digest": "sha256:999", "diffId": "sha256:9991"}],
        "datasets": [
          {"path": "datasets/dataset.parquet", "digest": "sha256:fff", "diffId": "sha256:fff1"}]
        }"""
    )
    assert view.family == "modelpack"
    assert view.kitfile_source == "derived"
    assert view.kitfile == expected
    assert [(x.index, x.kind, x.path, x.diff_id, x.legacy_root) for x in view.layers] == [
        (0, "model", "test-file.safetensors", "sha256:aaa1", False),
        (1, "modelpart", "test-config.json", "sha256:bbb1", False),
        (2, "modelpart", "test-config-2.json", "sha256:ccc1", False),
        (3, "docs", "README.md", "sha256:ddd1", False),
        (4, "docs", "LICENSE", "sha256:eee1", False),
        (5, "dataset", "datasets/dataset.parquet", "sha256:fff1", False),
        (6, "code", "src/test.sh", "sha256:9991", False),
    ]
    # Without the config blob: digests only; uncompressed layers still know their diffId.
    bare = parse_modelkit(modelpack_manifest(MP_LAYERS), None)
    assert bare.kitfile.model is not None and bare.kitfile.model.diff_id == ""
    assert bare.layers[0].diff_id == "sha256:aaa"


def test_modelpack_extra_weights_become_parts() -> None:
    layers = [
        ("weight.v1.raw", "aaa", "test-file-01.safetensors"),
        ("weight.config.v1.tar", "bbb", "test-config.json"),
        ("weight.v1.raw", "ddd", "test-file-02.safetensors"),
    ]
    view = parse_modelkit(modelpack_manifest(layers), modelpack_config(layers), verify_config=False)
    assert view.kitfile.model == Model(
        path="test-file-01.safetensors",
        digest="sha256:aaa",
        diff_id="sha256:aaa1",
        parts=(
            ModelPart(path="test-config.json", digest="sha256:bbb", diff_id="sha256:bbb1"),
            ModelPart(path="test-file-02.safetensors", digest="sha256:ddd", diff_id="sha256:ddd1"),
        ),
    )
    assert [(x.kind, x.layer_kind, x.fmt) for x in view.layers] == [
        ("model", "model", "raw"),
        ("modelpart", "modelpart", "tar"),
        ("modelpart", "model", "raw"),
    ]


def test_modelpack_with_kitfile_annotation() -> None:
    kf = Kitfile(
        manifest_version="1.0.0",
        model=Model(
            name="m", path="test-file.safetensors", digest="sha256:aaa", diff_id="sha256:aaa1"
        ),
        docs=(
            Docs(
                path="README.md", description="<readme>", digest="sha256:ddd", diff_id="sha256:ddd1"
            ),
        ),
    )
    layers = [MP_LAYERS[0], MP_LAYERS[3]]
    manifest = modelpack_manifest(layers, {mt.ANNOTATION_KITFILE: config_json(kf).decode()})
    view = parse_modelkit(manifest, modelpack_config(layers), verify_config=False)
    assert view.kitfile_source == "annotation"
    assert view.kitfile == kf
    assert [(x.kind, x.name, x.family) for x in view.layers] == [
        ("model", "m", "modelpack"),
        ("docs", None, "modelpack"),
    ]


def test_modelpack_errors() -> None:
    with pytest.raises(FormatError, match="invalid ModelPack config"):
        parse_modelkit(
            modelpack_manifest(MP_LAYERS[:1]), modelpack_config(MP_LAYERS), verify_config=False
        )
    no_path = json.loads(modelpack_manifest(MP_LAYERS[:1]))
    del no_path["layers"][0]["annotations"]
    with pytest.raises(FormatError, match=r"has no org\.cncf\.model\.filepath annotation"):
        parse_modelkit(manifest_bytes(no_path), None)
    unknown = modelpack_manifest([("unrecognized.v1.raw", "aaa", "x"), MP_LAYERS[0]])
    view = parse_modelkit(unknown, None)
    assert [x.media_type for x in view.ignored_layers] == [
        "application/vnd.cncf.model.unrecognized.v1.raw"
    ]
    assert [x.index for x in view.layers] == [1]


# ---------------------------------------------------------------------------------------------
# reading: what is not a ModelKit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": []}, "image index"),
        ({"schemaVersion": 2, "manifests": []}, "image index"),
        (
            {
                "schemaVersion": 2,
                "mediaType": mt.DOCKER_MANIFEST_V2,
                "config": {"mediaType": mt.KITOPS_CONFIG, "digest": d("0"), "size": 1},
                "layers": [],
            },
            "not an OCI image manifest",
        ),
        (
            {
                "schemaVersion": 2,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": d("0"),
                    "size": 1,
                },
                "layers": [],
            },
            "not a ModelKit: config media type is application/vnd.oci.image.config.v1",
        ),
        (
            {
                "schemaVersion": 1,
                "config": {"mediaType": mt.KITOPS_CONFIG, "digest": d("0"), "size": 1},
            },
            "schemaVersion",
        ),
        (
            {"schemaVersion": 2, "config": {"mediaType": mt.KITOPS_CONFIG, "size": 1}},
            "invalid digest",
        ),
        (
            {
                "schemaVersion": 2,
                "config": {"mediaType": mt.KITOPS_CONFIG, "digest": "sha256:../../x", "size": 1},
            },
            "invalid digest",
        ),
        (
            {
                "schemaVersion": 2,
                "config": {"mediaType": mt.KITOPS_CONFIG, "digest": d("0"), "size": -1},
            },
            "invalid size",
        ),
        (["not", "an", "object"], "not a JSON object"),
    ],
)
def test_not_a_modelkit(obj: Any, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        parse_modelkit(manifest_bytes(obj), None)


def test_invalid_json_manifest() -> None:
    with pytest.raises(FormatError, match="manifest is not valid JSON"):
        parse_modelkit(b"{nope", None)


def test_layer_paths_must_stay_inside_the_root() -> None:
    kf = Kitfile(manifest_version="1.0.0", code=(Code(path="../escape", digest=d("1")),))
    config = config_json(kf)
    manifest = manifest_bytes(
        {
            "schemaVersion": 2,
            "config": config_desc(config),
            "layers": [{"mediaType": mt.layer_media_type("code"), "digest": d("1"), "size": 1}],
        }
    )
    with pytest.raises(FormatError, match="outside the ModelKit root"):
        parse_modelkit(manifest, config)


def test_config_digest_is_verified() -> None:
    config = b'{"manifestVersion":"1.0.0"}'
    desc = config_desc(config)
    desc["digest"] = d("0")
    manifest = manifest_bytes({"schemaVersion": 2, "config": desc, "layers": []})
    with pytest.raises(IntegrityError, match="digest is sha256:"):
        parse_modelkit(manifest, config)
    assert parse_modelkit(manifest, config, verify_config=False).kitfile.manifest_version == "1.0.0"
