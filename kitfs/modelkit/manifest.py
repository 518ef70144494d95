"""ModelKit manifests in both directions.

Writing: `build_manifest` produces the manifest JSON the way `kit pack` does (Go
`json.Marshal` of an `ocispec.Manifest`, see kitops `pkg/lib/filesystem/local-storage.go`
`createManifest` / `saveModelManifest`).

Reading: `parse_modelkit` accepts every generation in the wild and maps each layer to its
Kitfile entry the way `kit unpack` does (`pkg/cmd/unpack/unpack.go` up to v1.7, then
`pkg/lib/filesystem/unpack/core.go`): walk the manifest layers in order, keep one counter
per Kitfile section, take the next entry of the section the layer's media type names
(`code` layers annotated `ml.kitops.modelkit.layer-subtype: prompt` belong to `prompts`),
and, when the config records the entry's digest (kit >= v0.5), require it to equal the
layer's digest. Entries without a digest are the pre-v0.5 layout: their tar entries are
rooted at the parent directory of the entry's path (`legacy_root`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from kitfs.errors import FormatError, IntegrityError
from kitfs.modelkit import mediatypes as mt
from kitfs.modelkit.kitfile import (
    MANIFEST_VERSION,
    Code,
    Dataset,
    Docs,
    EntryKind,
    Kitfile,
    LayerEntry,
    McpServer,
    Model,
    ModelPart,
    Prompt,
    clean_path,
    go_json_string,
    kitfile_from_config,
)

# OCI digest grammar (image-spec descriptor.md): algorithm ":" encoded. Nothing that could
# climb out of a blob directory ('/', '.', '..') fits it.
_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
_VERIFIABLE = {"sha256": 64, "sha512": 128}

KitfileSource = Literal["config", "annotation", "derived"]


# =============================================================================================
# Writing
# =============================================================================================


@dataclass(frozen=True)
class LayerDescriptorInput:
    """A layer as `build_manifest` writes it."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] | None = None


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def created_timestamp(environ: Mapping[str, str] | None = None, now: float | None = None) -> str:
    """The `org.opencontainers.image.created` value newer `kit` writes: UTC RFC 3339 seconds,
    `SOURCE_DATE_EPOCH` winning over the clock (pkg/lib/filesystem/local-storage.go)."""
    env = os.environ if environ is None else environ
    epoch_text = env.get("SOURCE_DATE_EPOCH", "")
    if epoch_text:
        try:
            seconds = int(epoch_text, 10)
        except ValueError:
            raise ValueError(f"invalid SOURCE_DATE_EPOCH {epoch_text!r}") from None
    else:
        seconds = int(time.time() if now is None else now)
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def kit_annotations(cli_version: str, created: str | None = None) -> dict[str, str]:
    """Manifest annotations as `kit` sets them (the created time only in newer kit)."""
    out = {mt.ANNOTATION_CLI_VERSION: cli_version}
    if created is not None:
        out[mt.ANNOTATION_CREATED] = created
    return out


def _check_digest(digest: str, what: str) -> None:
    if not _DIGEST_RE.match(digest):
        raise ValueError(f"invalid digest {digest!r} for {what}")


def _annotations_json(annotations: Mapping[str, str] | None) -> str | None:
    if not annotations:
        return None  # omitempty
    return (
        "{"
        + ",".join(
            f"{go_json_string(k)}:{go_json_string(annotations[k])}" for k in sorted(annotations)
        )
        + "}"
    )


def _descriptor_json(
    media_type: str, digest: str, size: int, annotations: Mapping[str, str] | None
) -> str:
    members = [
        f'"mediaType":{go_json_string(media_type)}',
        f'"digest":{go_json_string(digest)}',
        f'"size":{int(size)}',
    ]
    ann = _annotations_json(annotations)
    if ann is not None:
        members.append(f'"annotations":{ann}')
    return "{" + ",".join(members) + "}"


def build_manifest(
    config: bytes,
    layers: Sequence[LayerDescriptorInput],
    annotations: Mapping[str, str] | None,
    *,
    newer_style: bool = False,
    config_media_type: str = mt.KITOPS_CONFIG,
) -> bytes:
    """The manifest JSON for a ModelKit, as Go `json.Marshal(ocispec.Manifest)` writes it.

    Keys: schemaVersion, mediaType, [artifactType], config, layers, [annotations]; each
    descriptor: mediaType, digest, size, [annotations]; annotation keys sorted; compact,
    HTML-escaped, no trailing newline.

    `mediaType` is always written: registries and `kit pull` look for it, and every `kit`
    reads manifests that carry it. `artifactType` (what newer `kit` adds) is written only
    with `newer_style`: it is an OCI 1.1 field, `kit` <= 1.7 neither writes nor needs it,
    and leaving it out keeps the manifest acceptable to pre-1.1 registries; `kit` detects
    a ModelKit by the config media type either way (`ModelFormatForManifest`).
    `layers` is written as `[]` when empty (old `kit` wrote `null`, which the OCI spec and
    some registries reject).
    """
    for i, layer in enumerate(layers):
        _check_digest(layer.digest, f"layer {i}")
        if layer.size < 0:
            raise ValueError(f"negative size for layer {i}")
    members = ['"schemaVersion":2', f'"mediaType":{go_json_string(mt.OCI_MANIFEST)}']
    if newer_style:
        artifact_type = (
            mt.MODELPACK_ARTIFACT_TYPE
            if config_media_type == mt.MODELPACK_CONFIG
            else mt.KITOPS_ARTIFACT_TYPE
        )
        members.append(f'"artifactType":{go_json_string(artifact_type)}')
    members.append(
        '"config":' + _descriptor_json(config_media_type, sha256_digest(config), len(config), None)
    )
    members.append(
        '"layers":['
        + ",".join(
            _descriptor_json(layer.media_type, layer.digest, layer.size, layer.annotations)
            for layer in layers
        )
        + "]"
    )
    ann = _annotations_json(annotations)
    if ann is not None:
        members.append(f'"annotations":{ann}')
    return ("{" + ",".join(members) + "}").encode("utf-8")


# =============================================================================================
# Reading
# =============================================================================================


@dataclass(frozen=True)
class Descriptor:
    """An OCI descriptor as found in a manifest."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    artifact_type: str = ""
    urls: tuple[str, ...] = ()


@dataclass(frozen=True)
class RawFileMetadata:
    """`org.cncf.model.file.metadata+json` of a raw layer (the file's stat at pack time)."""

    name: str
    mode: int
    size: int
    uid: int = 0
    gid: int = 0
    mtime: str = ""
    typeflag: int = 0


@dataclass(frozen=True)
class LayerInfo:
    """One manifest layer, mapped to the Kitfile entry it holds."""

    #: Position in the manifest's `layers`.
    index: int
    digest: str
    size: int
    media_type: str
    #: The Kitfile section: model, modelpart, code, dataset, docs, prompt, mcpserver.
    kind: EntryKind
    #: What the media type says (prompts are `code` layers, MCP bundles `mcpb`).
    layer_kind: mt.LayerKind
    fmt: mt.LayerFormat
    compression: mt.Compression
    family: mt.Family
    #: The entry's path exactly as written in the Kitfile (`./model`).
    path: str
    #: The path cleaned as `kit` does (`model`; `.` for the context root).
    clean_path: str
    #: The entry's name where its section has one, else None.
    name: str | None
    #: Position of the entry within its Kitfile section.
    entry_index: int
    annotations: Mapping[str, str]
    #: Digest of the uncompressed stream when known (config diffId, ModelPack diffIds, or
    #: the digest itself for an uncompressed layer).
    diff_id: str | None
    #: Pre-v0.5 layout: tar entries are relative to dirname(clean_path), not the root.
    legacy_root: bool = False
    #: Raw layers: the file's metadata from the annotation, when present and well formed.
    file_metadata: RawFileMetadata | None = None

    @property
    def ids(self) -> tuple[str, ...]:
        """What `kit unpack --filter type:id` matches: the entry's name (if any), its path."""
        return (self.name, self.path) if self.name else (self.path,)

    @property
    def tar_root(self) -> str:
        """The directory (relative to the ModelKit root) that tar entry names are relative to."""
        if not self.legacy_root:
            return "."
        parent = self.clean_path.rpartition("/")[0]
        return parent or "."


@dataclass(frozen=True)
class ModelKitView:
    """A ModelKit (or ModelPack) manifest with its Kitfile and per-layer placement."""

    kitfile: Kitfile
    #: Where the Kitfile came from: the config blob, the `ml.kitops.modelkit.kitfile`
    #: manifest annotation, or derived from the layers' filepath annotations.
    kitfile_source: KitfileSource
    family: mt.Family
    config: Descriptor
    #: The manifest's own `mediaType` / `artifactType`, None when absent (old kit).
    manifest_media_type: str | None
    artifact_type: str | None
    annotations: Mapping[str, str]
    layers: tuple[LayerInfo, ...]
    #: Layers whose media type is neither kitops nor ModelPack (kit skips them too).
    ignored_layers: tuple[Descriptor, ...] = ()

    @property
    def config_media_type(self) -> str:
        return self.config.media_type

    @property
    def cli_version(self) -> str | None:
        return self.annotations.get(mt.ANNOTATION_CLI_VERSION)

    @property
    def created(self) -> str | None:
        return self.annotations.get(mt.ANNOTATION_CREATED)

    @property
    def model_reference(self) -> str | None:
        """The parent ModelKit named by `model.path`, if any (it has no model layer here)."""
        return self.kitfile.model_reference


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise FormatError(f"manifest {what} must map strings to strings")
    return dict(value)


def _descriptor(value: Any, what: str) -> Descriptor:
    if not isinstance(value, dict):
        raise FormatError(f"manifest {what} is not a descriptor object")
    media_type = value.get("mediaType")
    digest = value.get("digest")
    size = value.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise FormatError(f"manifest {what} has no mediaType")
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise FormatError(f"manifest {what} has an invalid digest {digest!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FormatError(f"manifest {what} has an invalid size {size!r}")
    urls = value.get("urls") or []
    artifact_type = value.get("artifactType") or ""
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise FormatError(f"manifest {what} has invalid urls")
    if not isinstance(artifact_type, str):
        raise FormatError(f"manifest {what} has an invalid artifactType")
    return Descriptor(
        media_type,
        digest,
        size,
        _str_map(value.get("annotations"), f"{what} annotations"),
        artifact_type,
        tuple(urls),
    )


def manifest_blobs(manifest: bytes) -> tuple[tuple[Descriptor, ...], dict[str, str]]:
    """The blobs an image manifest needs, config first, then every layer whatever its media
    type (what oras.Copy, under `kit pull` and `kit push`, copies), a digest once; and the
    manifest's annotations. A FormatError if it is not an image manifest."""
    try:
        data = json.loads(manifest)
    except ValueError as exc:
        raise FormatError(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or "config" not in data:
        raise FormatError("not an OCI image manifest (no config)")
    layers = data.get("layers") or []
    if not isinstance(layers, list):
        raise FormatError("manifest layers is not a list")
    descs = [_descriptor(data["config"], "config"),
             *(_descriptor(v, f"layer {i}") for i, v in enumerate(layers))]
    unique = {d.digest: d for d in reversed(descs)}
    ordered = tuple(d for d in descs if unique.pop(d.digest, None) is not None)
    return ordered, _str_map(data.get("annotations"), "annotations")


def _verify_blob(desc: Descriptor, data: bytes, what: str) -> None:
    algorithm, _, encoded = desc.digest.partition(":")
    if len(data) != desc.size:
        raise IntegrityError(f"{what}: {len(data)} bytes, the manifest says {desc.size}")
    if _VERIFIABLE.get(algorithm) != len(encoded) or not re.fullmatch(r"[0-9a-f]+", encoded):
        return  # not a digest a registry could serve; nothing to compare with
    actual = hashlib.new(algorithm, data).hexdigest()
    if actual != encoded:
        raise IntegrityError(
            f"{what}: digest is {algorithm}:{actual}, the manifest says {desc.digest}"
        )


def _raw_metadata(annotations: Mapping[str, str]) -> RawFileMetadata | None:
    text = annotations.get(mt.ANNOTATION_FILE_METADATA)
    if not text:
        return None
    try:
        meta = json.loads(text)
    except ValueError:
        return None
    if not isinstance(meta, dict):
        return None

    def num(key: str) -> int:
        value = meta.get(key, 0)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    name = meta.get("name")
    mtime = meta.get("mtime")
    return RawFileMetadata(
        name=name if isinstance(name, str) else "",
        mode=num("mode") & 0o7777,
        size=num("size"),
        uid=num("uid"),
        gid=num("gid"),
        mtime=mtime if isinstance(mtime, str) else "",
        typeflag=num("typeflag"),
    )


def _entry_kind(layer_type: mt.LayerType, annotations: Mapping[str, str]) -> EntryKind:
    kind = layer_type.kind
    if kind == "code":
        subtype = annotations.get(mt.ANNOTATION_LAYER_SUBTYPE)
        return "prompt" if subtype == mt.LAYER_SUBTYPE_PROMPT else "code"
    if kind == "mcpb":
        return "mcpserver"
    return kind


_SECTION = {
    "model": "model",
    "modelpart": "model.parts",
    "code": "code",
    "dataset": "datasets",
    "docs": "docs",
    "prompt": "prompts",
    "mcpserver": "mcpServers",
}


def _modelpack_diff_ids(config: bytes | None, count: int) -> list[str] | None:
    if config is None:
        return None
    try:
        data = json.loads(config.decode("utf-8", errors="replace"))
    except ValueError as exc:
        raise FormatError(f"ModelPack config is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise FormatError("ModelPack config is not a JSON object")
    modelfs = data.get("modelfs")
    if modelfs is None:
        return None
    diff_ids = modelfs.get("diffIds") if isinstance(modelfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise FormatError("invalid ModelPack config: modelfs.diffIds is not a list of digests")
    if len(diff_ids) != count:
        raise FormatError(f"invalid ModelPack config: {len(diff_ids)} diffIds for {count} layers")
    return list(diff_ids)


def _derive_kitfile(
    layers: list[tuple[Descriptor, mt.LayerType]],
    positions: list[int],
    diff_ids: list[str] | None,
) -> tuple[Kitfile, list[tuple[str, int]]]:
    """A Kitfile built from the layers' `org.cncf.model.filepath` annotations, as newer `kit`
    does for ModelPacks without one: the first weight layer is the model, further weights
    and weight configs are parts (kitops pkg/artifact testdata kitfile-generation).

    Also returns, per layer, the (entry kind, index) it became.
    """
    placed: list[tuple[str, int]] = []
    model: Model | None = None
    parts: list[ModelPart] = []
    code: list[Code] = []
    datasets: list[Dataset] = []
    docs: list[Docs] = []
    prompts: list[Prompt] = []
    servers: list[McpServer] = []
    for i, (desc, layer_type) in enumerate(layers):
        path = desc.annotations.get(mt.ANNOTATION_FILEPATH, "")
        if not path:
            raise FormatError(
                f"layer {i} ({desc.media_type}) has no {mt.ANNOTATION_FILEPATH} annotation"
                " and there is no Kitfile to place it"
            )
        kind = _entry_kind(layer_type, desc.annotations)
        digest = desc.digest
        diff_id = diff_ids[positions[i]] if diff_ids is not None else ""
        if kind == "model" and model is None:
            model = Model(path=path, digest=digest, diff_id=diff_id)
            placed.append(("model", 0))
        elif kind in ("model", "modelpart"):
            placed.append(("modelpart", len(parts)))
            parts.append(ModelPart(path=path, digest=digest, diff_id=diff_id))
        elif kind == "code":
            placed.append(("code", len(code)))
            code.append(Code(path=path, digest=digest, diff_id=diff_id))
        elif kind == "dataset":
            placed.append(("dataset", len(datasets)))
            datasets.append(Dataset(path=path, digest=digest, diff_id=diff_id))
        elif kind == "docs":
            placed.append(("docs", len(docs)))
            docs.append(Docs(path=path, digest=digest, diff_id=diff_id))
        elif kind == "prompt":
            placed.append(("prompt", len(prompts)))
            prompts.append(Prompt(path=path, digest=digest, diff_id=diff_id))
        else:
            placed.append(("mcpserver", len(servers)))
            servers.append(McpServer(path=path, digest=digest, diff_id=diff_id))
    if parts:
        model = replace(model or Model(), parts=tuple(parts))
    kitfile = Kitfile(
        manifest_version=MANIFEST_VERSION,
        model=model,
        code=tuple(code),
        datasets=tuple(datasets),
        docs=tuple(docs),
        prompts=tuple(prompts),
        mcp_servers=tuple(servers),
    )
    return kitfile, placed


def _check_inside(path: str, index: int) -> str:
    cleaned = clean_path(path)
    if cleaned.startswith("/") or cleaned == ".." or cleaned.startswith("../"):
        raise FormatError(f"layer {index} has path {path!r}, which is outside the ModelKit root")
    return cleaned


def parse_modelkit(
    manifest: bytes, config: bytes | None, *, verify_config: bool = True
) -> ModelKitView:
    """Read a ModelKit or ModelPack manifest (every generation) and place each layer.

    `config` is the config blob (None if not fetched: the Kitfile then comes from the
    manifest annotation or the layers' filepath annotations). With `verify_config` the
    config must match the descriptor's size and (sha256/sha512) digest: IntegrityError.
    Anything that is not a ModelKit, or whose layers cannot be placed, is a FormatError.
    """
    try:
        data = json.loads(manifest.decode("utf-8", errors="replace"))
    except ValueError as exc:
        raise FormatError(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise FormatError("manifest is not a JSON object")
    media_type = data.get("mediaType")
    if media_type is not None and not isinstance(media_type, str):
        raise FormatError("manifest mediaType is not a string")
    if media_type in (mt.OCI_INDEX, mt.DOCKER_MANIFEST_LIST) or (
        media_type is None and "manifests" in data and "config" not in data
    ):
        raise FormatError("this is an image index (a list of manifests), not a ModelKit manifest")
    if media_type not in (None, mt.OCI_MANIFEST):
        raise FormatError(f"not an OCI image manifest (mediaType {media_type}): not a ModelKit")
    schema = data.get("schemaVersion")
    if schema is not None and schema != 2:
        raise FormatError(f"unsupported manifest schemaVersion {schema!r} (expected 2)")
    artifact_type = data.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise FormatError("manifest artifactType is not a string")
    config_desc = _descriptor(data.get("config"), "config")
    raw_layers = data.get("layers")
    if raw_layers is None:
        raw_layers = []
    if not isinstance(raw_layers, list):
        raise FormatError("manifest layers is not a list")
    descs = [_descriptor(v, f"layer {i}") for i, v in enumerate(raw_layers)]
    annotations = _str_map(data.get("annotations"), "annotations")

    family: mt.Family
    if artifact_type == mt.KITOPS_ARTIFACT_TYPE or config_desc.media_type == mt.KITOPS_CONFIG:
        family = "kitops"
    elif (
        artifact_type == mt.MODELPACK_ARTIFACT_TYPE or config_desc.media_type == mt.MODELPACK_CONFIG
    ):
        family = "modelpack"
    else:
        raise FormatError(
            f"not a ModelKit: config media type is {config_desc.media_type}"
            + (f", artifactType {artifact_type}" if artifact_type else "")
        )
    if config is not None and verify_config:
        _verify_blob(config_desc, config, "config")

    typed: list[tuple[Descriptor, mt.LayerType]] = []
    positions: list[int] = []
    ignored: list[Descriptor] = []
    for i, desc in enumerate(descs):
        try:
            typed.append((desc, mt.parse_layer_media_type(desc.media_type)))
            positions.append(i)
        except FormatError:
            ignored.append(desc)

    source: KitfileSource
    diff_ids: list[str] | None = None
    if config_desc.media_type == mt.MODELPACK_CONFIG:
        diff_ids = _modelpack_diff_ids(config, len(descs))
    placed: list[tuple[str, int]] | None = None
    if config is not None and config_desc.media_type == mt.KITOPS_CONFIG:
        kitfile = kitfile_from_config(config)
        source = "config"
    elif mt.ANNOTATION_KITFILE in annotations:
        try:
            kitfile = kitfile_from_config(annotations[mt.ANNOTATION_KITFILE])
        except FormatError as exc:
            raise FormatError(f"{mt.ANNOTATION_KITFILE} annotation: {exc}") from None
        source = "annotation"
    else:
        kitfile, placed = _derive_kitfile(typed, positions, diff_ids)
        source = "derived"

    layers = _place_layers(kitfile, typed, positions, source, diff_ids, placed)
    return ModelKitView(
        kitfile=kitfile,
        kitfile_source=source,
        family=family,
        config=config_desc,
        manifest_media_type=media_type,
        artifact_type=artifact_type,
        annotations=annotations,
        layers=tuple(layers),
        ignored_layers=tuple(ignored),
    )


def _place_layers(
    kitfile: Kitfile,
    typed: list[tuple[Descriptor, mt.LayerType]],
    positions: list[int],
    source: KitfileSource,
    diff_ids: list[str] | None,
    placed: list[tuple[str, int]] | None,
) -> list[LayerInfo]:
    entries = kitfile.layer_entries()
    pairs: list[tuple[tuple[Descriptor, mt.LayerType], LayerEntry]] = []
    if placed is not None:
        # Derived from these very layers: each layer knows which entry it became.
        table: dict[tuple[str, int], LayerEntry] = {(e.kind, e.index): e for e in entries}
        for item, key, position in zip(typed, placed, positions, strict=True):
            found = table.get(key)
            if found is None:
                raise FormatError(
                    f"layer {position} has path"
                    f" {item[0].annotations.get(mt.ANNOTATION_FILEPATH)!r}, which cannot be placed"
                )
            pairs.append((item, found))
    else:
        by_kind: dict[str, list[LayerEntry]] = {}
        for entry in entries:
            by_kind.setdefault(entry.kind, []).append(entry)
        used: dict[str, int] = {}
        for (desc, layer_type), position in zip(typed, positions, strict=True):
            kind = _entry_kind(layer_type, desc.annotations)
            candidates = by_kind.get(kind, [])
            n = used.get(kind, 0)
            if n >= len(candidates):
                raise FormatError(
                    f"layer {position} ({desc.media_type}) has no matching entry in the"
                    f" Kitfile's {_SECTION[kind]} ({len(candidates)} entries with a layer)"
                )
            used[kind] = n + 1
            entry = candidates[n]
            if entry.digest and entry.digest != desc.digest:
                raise FormatError(
                    f"digest in config and manifest do not match for {entry.label}"
                    f" (layer {position}: {desc.digest}, config: {entry.digest})"
                )
            pairs.append(((desc, layer_type), entry))

    out: list[LayerInfo] = []
    for ((desc, layer_type), entry), position in zip(pairs, positions, strict=True):
        legacy = source != "derived" and not entry.digest
        diff_id: str | None = entry.diff_id or None
        if diff_id is None and diff_ids is not None:
            diff_id = diff_ids[position]
        if diff_id is None and layer_type.compression == "none":
            diff_id = desc.digest
        out.append(
            LayerInfo(
                index=position,
                digest=desc.digest,
                size=desc.size,
                media_type=desc.media_type,
                kind=entry.kind,
                layer_kind=layer_type.kind,
                fmt=layer_type.fmt,
                compression=layer_type.compression,
                family=layer_type.family,
                path=entry.path,
                clean_path=_check_inside(entry.path, position),
                name=entry.name,
                entry_index=entry.index,
                annotations=desc.annotations,
                diff_id=diff_id,
                legacy_root=legacy,
                file_metadata=_raw_metadata(desc.annotations) if layer_type.fmt == "raw" else None,
            )
        )
    return out
