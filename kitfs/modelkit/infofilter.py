"""`kit info --filter`: a dotted path of Go struct field names into the Kitfile.

kit (pkg/cmd/info/cmd.go, `filterKitfile`) checks the filter against
`^\\.?[a-zA-Z0-9_-]+(\\.[a-zA-Z0-9_-]+)*$` (a `[` gets its own message: no
array access), drops one leading `.` (jq style), title-cases each segment
(`cases.Title(..., cases.NoLower)`: the first letter upper-cased, the rest
kept) and looks it up with reflect's `FieldByName` on the `artifact.KitFile`
struct, following pointers. So the names are the Go fields', not the YAML
keys: `package.name`, `model.parts`, `manifestVersion`, `dataSets` (Go
`DataSets`: `datasets` finds nothing). The digest fields of each layer entry
(`model.digest`, `code` entries' `diffId`) are Go fields too, filled from the
config. Where kit's reflection would panic (a field of a list, a field of an
absent model) this says the node is not there. The value found is encoded by
`kitfile.value_to_yaml`, as kit encodes it with yaml.v3.
"""

from __future__ import annotations

import re
from typing import cast

from kitfs.errors import KitfsError, UsageError
from kitfs.modelkit.kitfile import (
    Code,
    Dataset,
    Docs,
    Kitfile,
    KitfileValue,
    McpServer,
    Model,
    ModelPart,
    Package,
    Prompt,
)

_VALID = re.compile(r"^\.?[a-zA-Z0-9_-]+(\.[a-zA-Z0-9_-]+)*$")

_LAYER_INFO = {"Digest": "digest", "DiffId": "diff_id"}

#: Go field name -> attribute, per struct (pkg/artifact/kitfile.go; newer kit adds
#: `Prompts`, datasets' `RemotePath`/`RemoteHash` and the MCP servers list).
_FIELDS: dict[type, dict[str, str]] = {
    Kitfile: {"ManifestVersion": "manifest_version", "Package": "package", "Model": "model",
              "Code": "code", "DataSets": "datasets", "Docs": "docs", "Prompts": "prompts",
              "McpServers": "mcp_servers"},
    Package: {"Name": "name", "Version": "version", "Description": "description",
              "License": "license", "Authors": "authors"},
    Model: {"Name": "name", "Path": "path", "License": "license", "Framework": "framework",
            "Format": "format", "Version": "version", "Description": "description",
            "Parts": "parts", "Parameters": "parameters", **_LAYER_INFO},
    ModelPart: {"Name": "name", "Path": "path", "License": "license", "Type": "type",
                **_LAYER_INFO},
    Code: {"Path": "path", "Description": "description", "License": "license", **_LAYER_INFO},
    Dataset: {"Name": "name", "Path": "path", "RemotePath": "remote_path",
              "RemoteHash": "remote_hash", "Description": "description", "License": "license",
              "Parameters": "parameters", **_LAYER_INFO},
    Docs: {"Path": "path", "Description": "description", **_LAYER_INFO},
    Prompt: {"Name": "name", "Path": "path", "Description": "description", **_LAYER_INFO},
    McpServer: {"Name": "name", "Path": "path", "Description": "description", **_LAYER_INFO},
}


def parse_filter(text: str) -> tuple[str, ...]:
    """The Go field names a filter walks through, or UsageError as kit refuses it."""
    if "[" in text:
        raise UsageError(f"invalid filter {text!r}: array access using '[]' is not "
                         "currently supported")
    if not _VALID.match(text):
        raise UsageError(f"invalid filter {text!r}: use dot-separated field names, "
                         "e.g. package.name or .model.path")
    return tuple(segment[:1].upper() + segment[1:]
                 for segment in text.removeprefix(".").split("."))


def select_field(kitfile: Kitfile, fields: tuple[str, ...]) -> KitfileValue:
    """The value `fields` (from parse_filter) names in `kitfile`."""
    value: object = kitfile
    walked: list[str] = []
    for name in fields:
        table = _FIELDS.get(type(value))
        attr = None if table is None else table.get(name)
        if attr is None or (name in _LAYER_INFO and not getattr(value, attr)):
            raise KitfsError(_not_found(walked, name, value, table))
        value = getattr(value, attr)
        walked.append(_lower_first(name))
    return cast(KitfileValue, value)  # every attribute _FIELDS names is one


def _not_found(walked: list[str], name: str, value: object,
               table: dict[str, str] | None) -> str:
    where = ".".join(walked) or "the Kitfile"
    message = f"error filtering output: cannot find required node {name!r} in {where}"
    if isinstance(value, tuple):
        return message + " (a list: array access is not supported)"
    if value is None:
        return message + " (it is not set)"
    if table is not None:
        names = ", ".join(_lower_first(n) for n in table if n not in _LAYER_INFO)
        return message + f" (its fields: {names})"
    return message


def _lower_first(name: str) -> str:
    return name[:1].lower() + name[1:]
