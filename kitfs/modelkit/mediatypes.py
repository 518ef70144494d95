"""Media types and annotation keys of ModelKits and CNCF ModelPack artifacts.

Sources (the strings below are the ones `kit` writes and reads):
- kitops `pkg/lib/constants/mediaType.go` (<= v1.7) and `pkg/lib/constants/mediatype/*.go`
  (newer: raw layers, zstd, ModelPack, `mcpb`), `pkg/lib/constants/consts.go` (annotations);
- modelpack/model-spec `specs-go/v1/mediatype.go` and `annotations.go`.

Two vocabularies meet here. A *layer kind* is what the media type says
(`model`, `modelpart`, `dataset`, `code`, `docs`, `mcpb`); an *entry kind* is the
Kitfile section a layer belongs to (`prompt` entries are stored as `code` layers
with a subtype annotation, `mcpServers` entries as `mcpb` layers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, cast

from kitfs.errors import FormatError

# --- manifests and indexes -------------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_EMPTY_JSON = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

# --- kitops ----------------------------------------------------------------------------------

KITOPS_CONFIG = "application/vnd.kitops.modelkit.config.v1+json"
#: `artifactType` newer `kit` writes on ModelKit manifests
#: (pkg/lib/constants/mediatype/artifacttype.go).
KITOPS_ARTIFACT_TYPE = "application/vnd.kitops.modelkit.manifest.v1+json"
#: `artifactType` of a ModelKit *index* (newer `kit`).
KITOPS_INDEX_ARTIFACT_TYPE = "application/vnd.kitops.modelkit.index.v1+json"

# --- CNCF ModelPack (model-spec) ------------------------------------------------------------

MODELPACK_ARTIFACT_TYPE = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"

# --- annotations -----------------------------------------------------------------------------

ANNOTATION_CLI_VERSION = "ml.kitops.modelkit.cli-version"
ANNOTATION_CREATED = "org.opencontainers.image.created"
#: Manifest annotation holding the Kitfile as JSON (ModelPack manifests packed by `kit`).
ANNOTATION_KITFILE = "ml.kitops.modelkit.kitfile"
#: Layer annotation marking a `code` layer as something else (today only `prompt`).
ANNOTATION_LAYER_SUBTYPE = "ml.kitops.modelkit.layer-subtype"
LAYER_SUBTYPE_PROMPT = "prompt"
#: Layer annotation: the layer's path in the pack context (cleaned, forward slashes).
ANNOTATION_FILEPATH = "org.cncf.model.filepath"
#: Layer annotation on raw layers: JSON {name, mode, uid, gid, size, mtime, typeflag}.
ANNOTATION_FILE_METADATA = "org.cncf.model.file.metadata+json"
ANNOTATION_MEDIATYPE_UNTESTED = "org.cncf.model.file.mediatype.untested"

# --- layers ----------------------------------------------------------------------------------

LayerKind = Literal["model", "modelpart", "dataset", "code", "docs", "mcpb"]
EntryKind = Literal["model", "modelpart", "code", "dataset", "docs", "prompt", "mcpserver"]
LayerFormat = Literal["tar", "raw"]
Compression = Literal["none", "gzip", "zstd"]
Family = Literal["kitops", "modelpack"]

LAYER_KINDS: tuple[LayerKind, ...] = ("model", "modelpart", "dataset", "code", "docs", "mcpb")

_KITOPS_LAYER_RE = re.compile(r"^application/vnd\.kitops\.modelkit\.(\w+)\.v1\.(\w+)(?:\+(\w+))?$")
_MODELPACK_LAYER_RE = re.compile(
    r"^application/vnd\.cncf\.model\.(\w+(?:\.\w+)?)\.v1\.(\w+)(?:\+(\w+))?$"
)

_MODELPACK_NAMES: dict[LayerKind, str] = {
    "model": "weight",
    "modelpart": "weight.config",
    "dataset": "dataset",
    "code": "code",
    "docs": "doc",
}
_MODELPACK_KINDS: dict[str, LayerKind] = {v: k for k, v in _MODELPACK_NAMES.items()}
_ENTRY_TO_LAYER: dict[str, LayerKind] = {
    "model": "model",
    "modelpart": "modelpart",
    "dataset": "dataset",
    "code": "code",
    "docs": "docs",
    "prompt": "code",
    "mcpserver": "mcpb",
    "mcpb": "mcpb",
}


@dataclass(frozen=True)
class LayerType:
    """A parsed layer media type."""

    kind: LayerKind
    fmt: LayerFormat
    compression: Compression
    family: Family

    @property
    def media_type(self) -> str:
        return layer_media_type(self.kind, self.fmt, self.compression, family=self.family)


def layer_kind_for_entry(entry_kind: str) -> LayerKind:
    """The media-type kind that stores a Kitfile entry of `entry_kind` (`prompt` -> `code`)."""
    try:
        return _ENTRY_TO_LAYER[entry_kind]
    except KeyError:
        raise ValueError(f"unknown layer kind {entry_kind!r}") from None


def _normalise_compression(compression: str) -> Compression:
    if compression in ("", "none"):
        return "none"
    if compression in ("gzip", "gzip-fastest"):
        return "gzip"
    if compression == "zstd":
        return "zstd"
    raise ValueError(
        f"invalid compression {compression!r}:"
        " must be one of 'none', 'gzip', 'gzip-fastest', 'zstd'"
    )


def layer_media_type(
    kind: str,
    fmt: str = "tar",
    compression: str = "none",
    *,
    family: Family = "kitops",
) -> str:
    """The media type `kit` writes for a layer.

    `kind` is a layer kind or an entry kind (`prompt` is stored as `code`, `mcpserver`
    as `mcpb`); `compression` accepts `kit pack --compression` values (`gzip-fastest`
    is written as `+gzip`).
    """
    layer_kind = layer_kind_for_entry(kind)
    if fmt not in ("tar", "raw"):
        raise ValueError(f"invalid layer format {fmt!r}: must be 'tar' or 'raw'")
    comp = _normalise_compression(compression)
    suffix = fmt if comp == "none" else f"{fmt}+{comp}"
    if family == "kitops":
        if layer_kind == "mcpb" and (fmt != "raw" or comp != "none"):
            raise ValueError("mcpb layers are always raw and uncompressed")
        return f"application/vnd.kitops.modelkit.{layer_kind}.v1.{suffix}"
    if layer_kind == "mcpb":
        raise ValueError("ModelPack has no media type for mcpServers bundles")
    if fmt == "raw" and comp != "none":
        raise ValueError("ModelPack does not allow compression of raw layers")
    return f"application/vnd.cncf.model.{_MODELPACK_NAMES[layer_kind]}.v1.{suffix}"


def parse_layer_media_type(media_type: str) -> LayerType:
    """Parse a kitops or ModelPack layer media type; FormatError for anything else."""
    family: Family
    match = _KITOPS_LAYER_RE.match(media_type)
    if match is not None:
        family = "kitops"
        base = match.group(1)
        if base not in LAYER_KINDS:
            raise FormatError(f"unknown ModelKit layer type {base!r} in media type {media_type}")
        kind = cast(LayerKind, base)
    else:
        match = _MODELPACK_LAYER_RE.match(media_type)
        if match is None:
            raise FormatError(f"not a ModelKit or ModelPack layer media type: {media_type}")
        family = "modelpack"
        try:
            kind = _MODELPACK_KINDS[match.group(1)]
        except KeyError:
            raise FormatError(
                f"unknown ModelPack layer type {match.group(1)!r} in media type {media_type}"
            ) from None
    fmt_text, comp_text = match.group(2), match.group(3) or "none"
    if fmt_text not in ("tar", "raw"):
        raise FormatError(f"unknown layer format {fmt_text!r} in media type {media_type}")
    if comp_text not in ("none", "gzip", "zstd"):
        raise FormatError(f"unknown compression {comp_text!r} in media type {media_type}")
    fmt: LayerFormat = "tar" if fmt_text == "tar" else "raw"
    comp = cast(Compression, comp_text)
    if family == "modelpack" and fmt == "raw" and comp != "none":
        raise FormatError(f"ModelPack does not allow compressed raw layers: {media_type}")
    return LayerType(kind, fmt, comp, family)


def is_config_media_type(media_type: str) -> bool:
    return media_type in (KITOPS_CONFIG, MODELPACK_CONFIG)
