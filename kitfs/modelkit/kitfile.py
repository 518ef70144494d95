"""The Kitfile: parsed as strictly as `kit pack` does, written byte for byte as `kit` writes it.

Ground truth is kitops `pkg/artifact/kitfile.go` (the struct, its YAML/JSON tags,
`LoadModel` with yaml.v3 `KnownFields(true)`, `MarshalToJSON`, `MarshalToYAML`) and the
validation `kit` runs before packing (`pkg/lib/kitfile/validate.go` up to v1.7, then
`KitFile.Validate` in `pkg/artifact/kitfile.go`). Three Go behaviours are reproduced here
because users compare our bytes with `kit`'s:

- `config_json`: `encoding/json.Marshal` of the KitFile struct (field order, `omitempty`,
  HTML escaping, sorted map keys, Go float formatting);
- `load_kitfile`: yaml.v3 decoding into that struct (which scalars become ints, floats,
  timestamps or strings; unknown keys are errors);
- `kitfile_to_yaml`: the yaml.v3 encoder with `SetIndent(2)` (what `kit unpack` writes as
  `<dir>/Kitfile`).

Where `kit` versions differ, the strictest rule wins when loading (a Kitfile we accept is
one every `kit` packs): manifestVersion must be exactly "1.0.0" (newer kit; <= v1.7 did not
check), duplicate paths compare cleaned (newer kit) and include prompts and mcpServers.
Newer keys (prompts with names, mcpServers, datasets' remotePath/remoteHash) are accepted.
Plain YAML timestamps in `parameters` become `Timestamp` (Go `time.Time`), written as RFC
3339 strings in JSON, as yaml.v3 + encoding/json do.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import functools
import json
import math
import posixpath
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeAlias, cast

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from kitfs.errors import BadReferenceError, FormatError, KitfileError
from kitfs.oci.reference import parse_reference

# =============================================================================================
# Types
# =============================================================================================

MANIFEST_VERSION = "1.0.0"
PART_TYPE_MAX_LEN = 64
#: The names `kit` looks for in a pack context, in order (constants.DefaultKitfileNames);
#: never packed into a layer, never classified by `kit init`.
KITFILE_NAMES = ("Kitfile", "kitfile", ".kitfile")

EntryKind = Literal["model", "modelpart", "code", "dataset", "docs", "prompt", "mcpserver"]


@dataclass(frozen=True)
class Timestamp:
    """A YAML timestamp in `parameters`: yaml.v3 decodes it to a Go `time.Time`.

    `text` is the value as Go prints it (RFC 3339 with nanoseconds, trailing zeros dropped),
    which is what both `json.Marshal` and the YAML encoder write.
    """

    text: str


ParamValue: TypeAlias = (
    bool | int | float | str | Timestamp | list["ParamValue"] | dict[str, "ParamValue"] | None
)


@dataclass(frozen=True)
class Package:
    name: str = ""
    version: str = ""
    description: str = ""
    license: str = ""
    authors: tuple[str, ...] = ()

    def is_empty(self) -> bool:
        return not (self.name or self.version or self.description or self.license or self.authors)


@dataclass(frozen=True)
class ModelPart:
    name: str = ""
    path: str = ""
    license: str = ""
    type: str = ""
    digest: str = ""
    diff_id: str = ""


@dataclass(frozen=True)
class Model:
    name: str = ""
    path: str = ""
    license: str = ""
    framework: str = ""
    format: str = ""
    version: str = ""
    description: str = ""
    parts: tuple[ModelPart, ...] = ()
    #: Arbitrary JSON-compatible data; None when absent (Go: nil interface).
    parameters: ParamValue = None
    digest: str = ""
    diff_id: str = ""


@dataclass(frozen=True)
class Code:
    path: str = ""
    description: str = ""
    license: str = ""
    digest: str = ""
    diff_id: str = ""


@dataclass(frozen=True)
class Dataset:
    name: str = ""
    path: str = ""
    remote_path: str = ""
    remote_hash: str = ""
    description: str = ""
    license: str = ""
    parameters: ParamValue = None
    digest: str = ""
    diff_id: str = ""


@dataclass(frozen=True)
class Docs:
    path: str = ""
    description: str = ""
    digest: str = ""
    diff_id: str = ""


@dataclass(frozen=True)
class Prompt:
    name: str = ""
    path: str = ""
    description: str = ""
    digest: str = ""
    diff_id: str = ""


@dataclass(frozen=True)
class McpServer:
    """An MCP Bundle (`.mcpb` ZIP) stored verbatim as a raw `mcpb` layer (newer `kit`)."""

    name: str = ""
    path: str = ""
    description: str = ""
    digest: str = ""
    diff_id: str = ""


AnyEntry: TypeAlias = Model | ModelPart | Code | Dataset | Docs | Prompt | McpServer


@dataclass(frozen=True)
class LayerEntry:
    """One Kitfile entry that owns a layer, in the order `kit pack` writes the layers."""

    kind: EntryKind
    #: The path exactly as written in the Kitfile (`./model` stays `./model`).
    path: str
    #: The entry's `name` when set (model, parts, datasets, prompts and mcpServers have
    #: one), else None.
    name: str | None
    #: Position within its own section (`code[2]` has index 2; the model has 0).
    index: int
    digest: str = ""
    diff_id: str = ""

    @property
    def clean_path(self) -> str:
        """The path as `kit` cleans it (`./model/` -> `model`, `` -> `.`)."""
        return clean_path(self.path)

    @property
    def ids(self) -> tuple[str, ...]:
        """What `kit unpack --filter type:id` matches: the entry's name (if any), its path."""
        if self.name:
            return (self.name, self.path)
        return (self.path,)

    @property
    def label(self) -> str:
        return _entry_label(self.kind, self.index)


@dataclass(frozen=True)
class Kitfile:
    manifest_version: str = ""
    package: Package = field(default_factory=Package)
    model: Model | None = None
    code: tuple[Code, ...] = ()
    datasets: tuple[Dataset, ...] = ()
    docs: tuple[Docs, ...] = ()
    prompts: tuple[Prompt, ...] = ()
    mcp_servers: tuple[McpServer, ...] = ()

    @property
    def model_reference(self) -> str | None:
        """`model.path` when it names another ModelKit (`repo:tag`): no model layer then."""
        if self.model is not None and self.model.path and is_modelkit_reference(self.model.path):
            return self.model.path
        return None

    def layer_paths(self) -> list[str]:
        """Every path the Kitfile gives a layer, as written: what `kit pack` keeps out of
        a ModelKit that names this one as its parent (util.LayerPathsFromKitfile: code,
        datasets, docs, the model and its parts; prompts and mcpServers too, which newer
        kit packs as layers). A `model.path` naming a ModelKit is not a path."""
        return [e.path for e in self.layer_entries()]

    def layer_entries(self) -> list[LayerEntry]:
        """The entries that own a layer, in manifest layer order.

        Order (pkg/lib/filesystem/local-storage.go `saveKitfileLayers`): model, model parts,
        code, datasets, docs, prompts, mcpServers. No layer for a `model.path` that is
        empty or a ModelKit reference, nor for a dataset with a `remotePath`.
        """
        out: list[LayerEntry] = []
        model = self.model
        if model is not None:
            if model.path and not is_modelkit_reference(model.path):
                out.append(
                    LayerEntry(
                        "model", model.path, model.name or None, 0, model.digest, model.diff_id
                    )
                )
            for i, part in enumerate(model.parts):
                out.append(
                    LayerEntry(
                        "modelpart", part.path, part.name or None, i, part.digest, part.diff_id
                    )
                )
        for i, code in enumerate(self.code):
            out.append(LayerEntry("code", code.path, None, i, code.digest, code.diff_id))
        for i, ds in enumerate(self.datasets):
            if ds.remote_path:
                continue
            out.append(LayerEntry("dataset", ds.path, ds.name or None, i, ds.digest, ds.diff_id))
        for i, doc in enumerate(self.docs):
            out.append(LayerEntry("docs", doc.path, None, i, doc.digest, doc.diff_id))
        for i, prompt in enumerate(self.prompts):
            out.append(
                LayerEntry(
                    "prompt", prompt.path, prompt.name or None, i, prompt.digest, prompt.diff_id
                )
            )
        for i, srv in enumerate(self.mcp_servers):
            out.append(
                LayerEntry("mcpserver", srv.path, srv.name or None, i, srv.digest, srv.diff_id)
            )
        return out

    def with_layer_digests(self, digests: Sequence[tuple[str, str]]) -> Kitfile:
        """A copy with `(digest, diff_id)` set on each layer entry, in `layer_entries()` order."""
        entries = self.layer_entries()
        if len(digests) != len(entries):
            raise ValueError(
                f"Kitfile has {len(entries)} layer entries, got {len(digests)} digests"
            )
        table: dict[tuple[str, int], tuple[str, str]] = {
            (e.kind, e.index): d for e, d in zip(entries, digests, strict=True)
        }

        def fill(kind: str, index: int, entry: Any) -> Any:
            pair = table.get((kind, index))
            if pair is None:
                return entry
            return replace(entry, digest=pair[0], diff_id=pair[1])

        model = self.model
        if model is not None:
            parts = tuple(fill("modelpart", i, p) for i, p in enumerate(model.parts))
            model = fill("model", 0, replace(model, parts=parts))
        return replace(
            self,
            model=model,
            code=tuple(fill("code", i, e) for i, e in enumerate(self.code)),
            datasets=tuple(fill("dataset", i, e) for i, e in enumerate(self.datasets)),
            docs=tuple(fill("docs", i, e) for i, e in enumerate(self.docs)),
            prompts=tuple(fill("prompt", i, e) for i, e in enumerate(self.prompts)),
            mcp_servers=tuple(fill("mcpserver", i, e) for i, e in enumerate(self.mcp_servers)),
        )

    def without_layer_digests(self) -> Kitfile:
        """A copy with every digest and diffId cleared (what `kit` reads back from YAML)."""

        def clear(entry: Any) -> Any:
            return replace(entry, digest="", diff_id="")

        model = self.model
        if model is not None:
            model = clear(replace(model, parts=tuple(clear(p) for p in model.parts)))
        return replace(
            self,
            model=model,
            code=tuple(clear(e) for e in self.code),
            datasets=tuple(clear(e) for e in self.datasets),
            docs=tuple(clear(e) for e in self.docs),
            prompts=tuple(clear(e) for e in self.prompts),
            mcp_servers=tuple(clear(e) for e in self.mcp_servers),
        )


def _entry_label(kind: str, index: int) -> str:
    return {
        "model": "model",
        "modelpart": f"model.parts[{index}]",
        "code": f"code[{index}]",
        "dataset": f"datasets[{index}]",
        "docs": f"docs[{index}]",
        "prompt": f"prompts[{index}]",
        "mcpserver": f"mcpServers[{index}]",
    }.get(kind, kind)


def is_modelkit_reference(path: str) -> bool:
    """Whether a Kitfile path names a ModelKit (kit `IsModelKitReference`).

    True when it has ':' or '@' and parses as a reference.
    """
    if ":" not in path and "@" not in path:
        return False
    if path != path.strip():
        return False
    try:
        parse_reference(path)
    except BadReferenceError:
        return False
    return True


def clean_path(path: str) -> str:
    """Go `filepath.Clean` (on Linux) of a Kitfile path; `""` cleans to `"."`."""
    if not path:
        return "."
    cleaned = posixpath.normpath(path)
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned


# =============================================================================================
# Go encoding/json
# =============================================================================================

_JSON_SHORT_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}
_JSON_NEEDS_ESCAPE = re.compile('["\\\\\x00-\x1f<>&\u2028\u2029\ud800-\udfff]')


def _json_escape_char(match: re.Match[str]) -> str:
    ch = match.group(0)
    short = _JSON_SHORT_ESCAPES.get(ch)
    if short is not None:
        return short
    code = ord(ch)
    if 0xD800 <= code <= 0xDFFF:
        # Go sees invalid UTF-8 here and writes the replacement character's escape.
        return "\\ufffd"
    return f"\\u{code:04x}"


def go_json_string(text: str) -> str:
    """A JSON string literal exactly as Go `json.Marshal` writes it (HTML-escaped)."""
    return '"' + _JSON_NEEDS_ESCAPE.sub(_json_escape_char, text) + '"'


def _float_digits(value: float) -> tuple[str, int]:
    """Shortest round-trip decimal digits of |value| (non-zero, finite) and the decimal point
    position, as Go's strconv keeps them: value = 0.DIGITS x 10**point."""
    mantissa, _, exp_text = repr(abs(value)).partition("e")
    exponent = int(exp_text) if exp_text else 0
    whole, _, frac = mantissa.partition(".")
    digits = whole + frac
    point = len(whole) + exponent
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    return stripped.rstrip("0"), point


def _fmt_e(neg: bool, digits: str, point: int) -> str:
    mant = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    exp = point - 1
    sign = "-" if exp < 0 else "+"
    return f"{'-' if neg else ''}{mant}e{sign}{abs(exp):02d}"


def _fmt_f(neg: bool, digits: str, point: int) -> str:
    whole = (digits[:point] + "0" * (point - len(digits))) if point > 0 else "0"
    frac_len = max(len(digits) - point, 0)
    frac = ""
    if frac_len:
        frac = "".join(
            digits[point + i] if 0 <= point + i < len(digits) else "0" for i in range(frac_len)
        )
        frac = "." + frac
    return f"{'-' if neg else ''}{whole}{frac}"


def go_json_float(value: float) -> str:
    """A float64 as Go `encoding/json` writes it (ES6-like: 'f' unless tiny or huge)."""
    if not math.isfinite(value):
        raise ValueError(f"json: unsupported value: {value!r}")
    neg = math.copysign(1.0, value) < 0
    if value == 0:
        return "-0" if neg else "0"
    digits, point = _float_digits(value)
    magnitude = abs(value)
    if magnitude < 1e-6 or magnitude >= 1e21:
        text = _fmt_e(neg, digits, point)
        # Go cleans up e-09 to e-9
        return re.sub(r"e-0(\d)$", r"e-\1", text)
    return _fmt_f(neg, digits, point)


def go_format_float_g(value: float) -> str:
    """`strconv.FormatFloat(v, 'g', -1, 64)` with yaml.v3's names for the non-finite values."""
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    neg = math.copysign(1.0, value) < 0
    if value == 0:
        return "-0" if neg else "0"
    digits, point = _float_digits(value)
    exp = point - 1
    if exp < -4 or exp >= 6:
        return _fmt_e(neg, digits, point)
    return _fmt_f(neg, digits, point)


def _json_param(value: ParamValue, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(go_json_float(value))
    elif isinstance(value, str):
        out.append(go_json_string(value))
    elif isinstance(value, Timestamp):
        out.append(go_json_string(value.text))
    elif isinstance(value, list):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _json_param(item, out)
        out.append("]")
    elif isinstance(value, dict):
        out.append("{")
        for i, key in enumerate(sorted(value)):
            if i:
                out.append(",")
            out.append(go_json_string(key))
            out.append(":")
            _json_param(value[key], out)
        out.append("}")
    else:  # pragma: no cover - guarded by the types
        raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _json_object(members: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f'"{k}":{v}' for k, v in members) + "}"


def _json_fields(pairs: list[tuple[str, str, bool]]) -> list[tuple[str, str]]:
    """(key, string value, omitempty) -> members, dropping empty omitempty strings."""
    return [(k, go_json_string(v)) for k, v, omit in pairs if v or not omit]


def _json_layer_info(entry: AnyEntry) -> list[tuple[str, str]]:
    return _json_fields([("digest", entry.digest, True), ("diffId", entry.diff_id, True)])


def _json_parameters(value: ParamValue) -> list[tuple[str, str]]:
    if value is None:  # nil interface: omitted
        return []
    buf: list[str] = []
    _json_param(value, buf)
    return [("parameters", "".join(buf))]


def config_json(kf: Kitfile) -> bytes:
    """The config blob: Go `json.Marshal` of kit's KitFile struct, compact, no newline."""
    members: list[tuple[str, str]] = [("manifestVersion", go_json_string(kf.manifest_version))]
    pkg = kf.package
    pkg_members = _json_fields(
        [
            ("name", pkg.name, True),
            ("version", pkg.version, True),
            ("description", pkg.description, True),
            ("license", pkg.license, True),
        ]
    )
    if pkg.authors:
        pkg_members.append(
            ("authors", "[" + ",".join(go_json_string(a) for a in pkg.authors) + "]")
        )
    # Package is a struct, never "empty" to encoding/json: always written.
    members.append(("package", _json_object(pkg_members)))
    model = kf.model
    if model is not None:
        m = _json_fields(
            [
                ("name", model.name, True),
                ("path", model.path, True),
                ("license", model.license, True),
                ("framework", model.framework, True),
                ("format", model.format, True),
                ("version", model.version, True),
                ("description", model.description, True),
            ]
        )
        if model.parts:
            parts = [
                _json_object(
                    _json_fields(
                        [
                            ("name", p.name, True),
                            ("path", p.path, True),
                            ("license", p.license, True),
                            ("type", p.type, True),
                        ]
                    )
                    + _json_layer_info(p)
                )
                for p in model.parts
            ]
            m.append(("parts", "[" + ",".join(parts) + "]"))
        m += _json_parameters(model.parameters)
        m += _json_layer_info(model)
        members.append(("model", _json_object(m)))
    if kf.code:
        items = [
            _json_object(
                _json_fields(
                    [
                        ("path", c.path, True),
                        ("description", c.description, True),
                        ("license", c.license, True),
                    ]
                )
                + _json_layer_info(c)
            )
            for c in kf.code
        ]
        members.append(("code", "[" + ",".join(items) + "]"))
    if kf.datasets:
        items = [
            _json_object(
                _json_fields(
                    [
                        ("name", d.name, True),
                        ("path", d.path, True),
                        ("remotePath", d.remote_path, True),
                        ("remoteHash", d.remote_hash, True),
                        ("description", d.description, True),
                        ("license", d.license, True),
                    ]
                )
                + _json_parameters(d.parameters)
                + _json_layer_info(d)
            )
            for d in kf.datasets
        ]
        members.append(("datasets", "[" + ",".join(items) + "]"))
    if kf.docs:
        items = [
            _json_object(
                _json_fields([("path", d.path, False), ("description", d.description, True)])
                + _json_layer_info(d)
            )
            for d in kf.docs
        ]
        members.append(("docs", "[" + ",".join(items) + "]"))
    if kf.prompts:
        items = [
            _json_object(
                _json_fields(
                    [
                        ("name", p.name, True),
                        ("path", p.path, True),
                        ("description", p.description, True),
                    ]
                )
                + _json_layer_info(p)
            )
            for p in kf.prompts
        ]
        members.append(("prompts", "[" + ",".join(items) + "]"))
    if kf.mcp_servers:
        items = [
            _json_object(
                _json_fields(
                    [
                        ("name", s.name, True),
                        ("path", s.path, True),
                        ("description", s.description, True),
                    ]
                )
                + _json_layer_info(s)
            )
            for s in kf.mcp_servers
        ]
        members.append(("mcpServers", "[" + ",".join(items) + "]"))
    return _json_object(members).encode("utf-8")


# =============================================================================================
# yaml.v3 scalar resolution (resolve.go): which plain scalars are null, bool, int, float,
# timestamp or string. PyYAML's resolver follows YAML 1.1 (yes/no, 0777, 1:20, ...), so
# plain scalars are resolved here instead.
# =============================================================================================

_PLAIN_TAG = "!kitfs:plain"
_STR_TAG = "tag:yaml.org,2002:str"
_YAML_PREFIX = "tag:yaml.org,2002:"

_Resolved: TypeAlias = tuple[
    str, Any
]  # (short tag: null|bool|int|float|timestamp|merge|str, value)

_RESOLVE_MAP: dict[str, _Resolved] = {}
for _words, _item in (
    (("true", "True", "TRUE"), ("bool", True)),
    (("false", "False", "FALSE"), ("bool", False)),
    (("", "~", "null", "Null", "NULL"), ("null", None)),
    ((".nan", ".NaN", ".NAN"), ("float", math.nan)),
    ((".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"), ("float", math.inf)),
    (("-.inf", "-.Inf", "-.INF"), ("float", -math.inf)),
    (("<<",), ("merge", "<<")),
):
    for _word in _words:
        _RESOLVE_MAP[_word] = _item

_YAML_STYLE_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_DOT_FLOAT = re.compile(r"^\.[0-9]+([eE][-+]?[0-9]+)?$")
_TIMESTAMP = re.compile(
    r"^(\d{4})-(\d{1,2})-(\d{1,2})"
    r"(?:([Tt ])(\d{1,2}):(\d{1,2}):(\d{1,2})(?:[.,](\d+))?(Z|[+-]\d{2}:\d{2})?)?$"
)
_DIGIT_VALUES = {c: i for i, c in enumerate("0123456789abcdefghijklmnopqrstuvwxyz")}


def _go_parse_uint(text: str) -> int | None:
    """strconv.ParseUint(text, 0, 64) on text without underscores."""
    if not text:
        return None
    base, body = 10, text
    if text[0] == "0":
        if len(text) >= 3 and text[1] in "bB":
            base, body = 2, text[2:]
        elif len(text) >= 3 and text[1] in "oO":
            base, body = 8, text[2:]
        elif len(text) >= 3 and text[1] in "xX":
            base, body = 16, text[2:]
        else:
            base, body = 8, text[1:]
    value = 0
    for ch in body:
        digit = _DIGIT_VALUES.get(ch.lower())
        if digit is None or digit >= base:
            return None
        value = value * base + digit
    return value if value < 1 << 64 else None


def _go_parse_int(text: str) -> int | None:
    """strconv.ParseInt(text, 0, 64) on text without underscores."""
    neg = False
    if text[:1] in ("+", "-"):
        neg, text = text[0] == "-", text[1:]
    value = _go_parse_uint(text)
    if value is None:
        return None
    if neg:
        return -value if value <= 1 << 63 else None
    return value if value < 1 << 63 else None


def _parse_timestamp(text: str) -> Timestamp | None:
    """yaml.v3 parseTimestamp (Go time.Parse with its four layouts), printed as RFC 3339 nano."""
    match = _TIMESTAMP.match(text)
    if match is None:
        return None
    year, month, day = int(match[1]), int(match[2]), int(match[3])
    sep, zone = match[4], match[9]
    if sep is None:
        hour = minute = second = 0
        frac = ""
    else:
        if (sep == " ") != (zone is None):
            return None  # "T"/"t" layouts need a zone; the space layout has none
        hour, minute, second = int(match[5]), int(match[6]), int(match[7])
        frac = (match[8] or "")[:9]
    if not 1 <= month <= 12 or hour >= 24 or minute >= 60 or second >= 60:
        return None
    if not 1 <= day <= calendar.monthrange(year, month)[1]:
        return None
    frac = frac.rstrip("0")
    if zone is None or zone == "Z":
        suffix = "Z"
    else:
        off_h, off_m = int(zone[1:3]), int(zone[4:6])
        if off_h > 24 or off_m > 60:
            return None
        suffix = "Z" if off_h == off_m == 0 else zone
    text_out = f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"
    if frac:
        text_out += "." + frac
    return Timestamp(text_out + suffix)


def resolve_plain(text: str) -> _Resolved:
    """What yaml.v3 makes of an untagged plain scalar."""
    item = _RESOLVE_MAP.get(text)
    if item is not None:
        return item
    first = text[0]
    if first == ".":
        if _DOT_FLOAT.match(text):
            return ("float", float(text))
    elif first in "+-0123456789":
        stamp = _parse_timestamp(text)
        if stamp is not None:
            return ("timestamp", stamp)
        plain = text.replace("_", "")
        as_int = _go_parse_int(plain) if plain else None
        if as_int is not None:
            return ("int", as_int)
        as_uint = _go_parse_uint(plain)
        if as_uint is not None:
            return ("int", as_uint)
        if _YAML_STYLE_FLOAT.match(plain):
            as_float = float(plain)
            if not math.isinf(as_float):
                return ("float", as_float)
    return ("str", text)


# =============================================================================================
# Reading YAML into the KitFile struct (yaml.v3 decode with KnownFields)
# =============================================================================================


class _Loader(yaml.SafeLoader):
    """PyYAML's parser and composer, with yaml.v3's scalar resolution done afterwards."""

    def resolve(self, kind: type[Node], value: Any, implicit: Any) -> str:
        if kind is ScalarNode:
            return _PLAIN_TAG if implicit[0] else _STR_TAG
        if kind is SequenceNode:
            return "tag:yaml.org,2002:seq"
        return "tag:yaml.org,2002:map"


class _Problem(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    tag, value = _scalar(node)
    return {
        "null": "null",
        "bool": "a boolean",
        "int": "a number",
        "float": "a number",
        "timestamp": "a timestamp",
    }.get(tag, f"the string {value!r}" if len(str(value)) <= 40 else "a string")


def _scalar(node: Node) -> _Resolved:
    """Resolve a scalar node the way yaml.v3's decoder does."""
    assert isinstance(node, ScalarNode)
    text: str = node.value
    tag: str = node.tag
    if tag == _PLAIN_TAG:
        return resolve_plain(text)
    if tag == _STR_TAG:
        return ("str", text)
    if tag.startswith(_YAML_PREFIX):
        short = tag[len(_YAML_PREFIX) :]
        if short == "binary":
            try:
                data = base64.b64decode(text.replace("\n", "").replace(" ", ""), validate=True)
                return ("str", data.decode("utf-8"))
            except (binascii.Error, UnicodeDecodeError):
                raise _Problem(
                    _line(node), "!!binary value is not base64-encoded UTF-8 text"
                ) from None
        if short in ("null", "bool", "int", "float", "timestamp"):
            rtag, value = resolve_plain(text) if text else ("null", None)
            if rtag == short:
                return rtag, value
            if short == "float" and rtag == "int":
                return "float", float(cast(int, value))
            raise _Problem(_line(node), f"cannot decode {text!r} as !!{short}")
    # Other tags: yaml.v3 keeps the text as a string.
    return ("str", text)


class _YamlReader:
    """Decodes the composed node graph into plain dicts shaped like kit's KitFile struct."""

    _MAX_DEPTH = 200
    _MAX_NODES = 1_000_000

    def __init__(self) -> None:
        self.lines: dict[tuple[str | int, ...], int] = {}
        self._nodes = 0
        self._stack: list[int] = []

    # -- helpers -----------------------------------------------------------------------------

    def _count(self, node: Node) -> None:
        self._nodes += 1
        if self._nodes > self._MAX_NODES:
            raise _Problem(_line(node), "document is too large (excessive aliasing?)")

    def _enter(self, node: Node) -> None:
        if id(node) in self._stack:
            raise _Problem(_line(node), "an anchor's value contains itself")
        if len(self._stack) >= self._MAX_DEPTH:
            raise _Problem(_line(node), "document is nested too deeply")
        self._stack.append(id(node))

    def _leave(self) -> None:
        self._stack.pop()

    def _pairs(self, node: MappingNode) -> list[tuple[Node, Node]]:
        """The mapping's key/value pairs with `<<` merges applied (explicit keys win),
        rejecting duplicate keys as yaml.v3 does."""
        explicit: list[tuple[Node, Node]] = []
        merged: list[tuple[Node, Node]] = []
        seen: dict[tuple[type[Node], str], int] = {}
        for key, value in node.value:
            if isinstance(key, ScalarNode) and key.tag == _PLAIN_TAG and key.value == "<<":
                sources = value.value if isinstance(value, SequenceNode) else [value]
                for source in sources:
                    if not isinstance(source, MappingNode):
                        raise _Problem(
                            _line(source), "map merge (<<) requires a mapping or a list of mappings"
                        )
                    self._enter(source)
                    try:
                        merged.extend(self._pairs(source))
                    finally:
                        self._leave()
                continue
            if isinstance(key, ScalarNode):
                ident = (ScalarNode, key.value)
                if ident in seen:
                    raise _Problem(
                        _line(key),
                        f"mapping key {key.value!r} already defined at line {seen[ident]}",
                    )
                seen[ident] = _line(key)
            explicit.append((key, value))
        if not merged:
            return explicit
        names = {k.value for k, _ in explicit if isinstance(k, ScalarNode)}
        out: list[tuple[Node, Node]] = []
        for key, value in merged:
            if isinstance(key, ScalarNode):
                if key.value in names:
                    continue
                names.add(key.value)
            out.append((key, value))
        return out + explicit

    # -- typed fields ------------------------------------------------------------------------

    def string(self, node: Node, what: str) -> str:
        self._count(node)
        if not isinstance(node, ScalarNode):
            raise _Problem(_line(node), f"{what} must be a string, not {_describe(node)}")
        tag, _value = _scalar(node)
        if tag == "null":
            return ""
        if node.tag.endswith(":binary"):
            return str(_value)
        # yaml.v3 stores the scalar's text, whatever it resolves to (`version: 1.10` -> "1.10").
        return str(node.value)

    def strings(self, node: Node, what: str) -> list[str]:
        self._count(node)
        if isinstance(node, ScalarNode) and _scalar(node)[0] == "null":
            return []
        if not isinstance(node, SequenceNode):
            raise _Problem(_line(node), f"{what} must be a list of strings, not {_describe(node)}")
        self._enter(node)
        try:
            return [self.string(item, f"each item of {what}") for item in node.value]
        finally:
            self._leave()

    def param(self, node: Node, what: str) -> ParamValue:
        self._count(node)
        self._enter(node)
        try:
            if isinstance(node, SequenceNode):
                return [self.param(item, what) for item in node.value]
            if isinstance(node, MappingNode):
                out: dict[str, ParamValue] = {}
                for key, value in self._pairs(node):
                    if not isinstance(key, ScalarNode) or _scalar(key)[0] != "str":
                        shown = (
                            key.value if isinstance(key, ScalarNode) else "(" + _describe(key) + ")"
                        )
                        raise _Problem(
                            _line(key),
                            f"key {shown} in {what} is not a string:"
                            " JSON needs string keys (quote it)",
                        )
                    out[str(_scalar(key)[1])] = self.param(value, what)
                return out
            tag, value = _scalar(node)
            if tag == "float" and not math.isfinite(value):
                raise _Problem(_line(node), f"{node.value} in {what} cannot be written as JSON")
            if tag == "merge":
                return "<<"
            return value  # type: ignore[no-any-return]
        finally:
            self._leave()

    def struct(
        self,
        node: Node,
        spec: _Spec,
        loc: tuple[str | int, ...],
        where: str,
    ) -> dict[str, Any] | None:
        """A mapping decoded against `spec`; None for a null node."""
        self._count(node)
        if isinstance(node, ScalarNode) and _scalar(node)[0] == "null":
            return None
        if not isinstance(node, MappingNode):
            raise _Problem(_line(node), f"{where} must be a mapping, not {_describe(node)}")
        self.lines[loc] = _line(node)
        out: dict[str, Any] = {}
        self._enter(node)
        try:
            for key, value in self._pairs(node):
                if not isinstance(key, ScalarNode):
                    raise _Problem(_line(key), f"{where} has a key that is {_describe(key)}")
                name = "" if _scalar(key)[0] == "null" else str(key.value)
                kind = spec.get(name)
                if kind is None:
                    raise _Problem(_line(key), _unknown_key_message(name, where, spec))
                self.lines[(*loc, name)] = _line(value)
                what = f"'{name}' in {where}"
                if kind == "str":
                    out[name] = self.string(value, what)
                elif kind == "strs":
                    out[name] = self.strings(value, what)
                elif kind == "any":
                    out[name] = self.param(value, f"{where}.{name}")
                elif isinstance(kind, tuple) and kind[0] == "struct":
                    out[name] = self.struct(
                        value, _SPECS[kind[1]], (*loc, name), _join(where, name)
                    )
                elif isinstance(kind, tuple) and kind[0] == "list":
                    out[name] = self.struct_list(
                        value, _SPECS[kind[1]], (*loc, name), _join(where, name)
                    )
        finally:
            self._leave()
        return out

    def struct_list(
        self, node: Node, spec: _Spec, loc: tuple[str | int, ...], where: str
    ) -> list[dict[str, Any]]:
        self._count(node)
        if isinstance(node, ScalarNode) and _scalar(node)[0] == "null":
            return []
        if not isinstance(node, SequenceNode):
            raise _Problem(_line(node), f"{where} must be a list, not {_describe(node)}")
        out: list[dict[str, Any]] = []
        self._enter(node)
        try:
            for i, item in enumerate(node.value):
                decoded = self.struct(item, spec, (*loc, i), f"{where}[{i}]")
                if decoded is None:
                    self.lines[(*loc, i)] = _line(item)
                out.append(decoded or {})
        finally:
            self._leave()
        return out


_FieldKind: TypeAlias = str | tuple[str, str]
_Spec: TypeAlias = dict[str, _FieldKind]

_SPECS: dict[str, _Spec] = {
    "kitfile": {
        "manifestVersion": "str",
        "package": ("struct", "package"),
        "model": ("struct", "model"),
        "code": ("list", "code"),
        "datasets": ("list", "dataset"),
        "docs": ("list", "docs"),
        "prompts": ("list", "prompt"),
        "mcpServers": ("list", "mcpserver"),
    },
    "package": {
        "name": "str",
        "version": "str",
        "description": "str",
        "license": "str",
        "authors": "strs",
    },
    "model": {
        "name": "str",
        "path": "str",
        "license": "str",
        "framework": "str",
        "format": "str",
        "version": "str",
        "description": "str",
        "parts": ("list", "part"),
        "parameters": "any",
    },
    "part": {"name": "str", "path": "str", "license": "str", "type": "str"},
    "code": {"path": "str", "description": "str", "license": "str"},
    "dataset": {
        "name": "str",
        "path": "str",
        "remotePath": "str",
        "remoteHash": "str",
        "description": "str",
        "license": "str",
        "parameters": "any",
    },
    "docs": {"path": "str", "description": "str"},
    "prompt": {"name": "str", "path": "str", "description": "str"},
    "mcpserver": {"name": "str", "path": "str", "description": "str"},
}

_NOT_FORMAT_HINTS = {
    "kitfile_version": 'it is not part of the Kitfile format; use manifestVersion: "1.0.0"',
    "kitfileVersion": 'it is not part of the Kitfile format; use manifestVersion: "1.0.0"',
    "metadata": "it is not part of the Kitfile format; use package (name, version, ...)",
    "config": "it is not part of the Kitfile format (the config blob is generated by kit)",
    "digest": "digests are not written in a Kitfile; kit computes them when packing",
    "diffId": "digests are not written in a Kitfile; kit computes them when packing",
    "dataset": "did you mean 'datasets'?",
    "prompt": "did you mean 'prompts'?",
    "doc": "did you mean 'docs'?",
    "models": "did you mean 'model' (a mapping) with 'parts'?",
}


def _join(where: str, name: str) -> str:
    return name if where == "the top level" else f"{where}.{name}"


def _unknown_key_message(name: str, where: str, spec: _Spec) -> str:
    place = "at the top level" if where == "the top level" else f"in {where}"
    message = f"unknown key {name!r} {place}"
    hint = _NOT_FORMAT_HINTS.get(name)
    if hint is None:
        folded = {k.lower(): k for k in spec}
        if name.lower() in folded:
            hint = f"keys are case-sensitive: did you mean {folded[name.lower()]!r}?"
    if hint is None:
        hint = "expected one of " + ", ".join(spec)
    return f"{message}: {hint}"


# =============================================================================================
# Plain dicts (decoded from YAML or JSON) -> dataclasses
# =============================================================================================


def _s(raw: dict[str, Any], key: str) -> str:
    value = raw.get(key)
    return value if isinstance(value, str) else ""


def _build(raw: dict[str, Any]) -> Kitfile:
    def part(d: dict[str, Any]) -> ModelPart:
        return ModelPart(
            _s(d, "name"),
            _s(d, "path"),
            _s(d, "license"),
            _s(d, "type"),
            _s(d, "digest"),
            _s(d, "diffId"),
        )

    model: Model | None = None
    m = raw.get("model")
    if m is not None:
        model = Model(
            name=_s(m, "name"),
            path=_s(m, "path"),
            license=_s(m, "license"),
            framework=_s(m, "framework"),
            format=_s(m, "format"),
            version=_s(m, "version"),
            description=_s(m, "description"),
            parts=tuple(part(p) for p in m.get("parts") or ()),
            parameters=m.get("parameters"),
            digest=_s(m, "digest"),
            diff_id=_s(m, "diffId"),
        )
    pkg = raw.get("package") or {}
    return Kitfile(
        manifest_version=_s(raw, "manifestVersion"),
        package=Package(
            name=_s(pkg, "name"),
            version=_s(pkg, "version"),
            description=_s(pkg, "description"),
            license=_s(pkg, "license"),
            authors=tuple(pkg.get("authors") or ()),
        ),
        model=model,
        code=tuple(
            Code(
                _s(d, "path"),
                _s(d, "description"),
                _s(d, "license"),
                _s(d, "digest"),
                _s(d, "diffId"),
            )
            for d in raw.get("code") or ()
        ),
        datasets=tuple(
            Dataset(
                name=_s(d, "name"),
                path=_s(d, "path"),
                remote_path=_s(d, "remotePath"),
                remote_hash=_s(d, "remoteHash"),
                description=_s(d, "description"),
                license=_s(d, "license"),
                parameters=d.get("parameters"),
                digest=_s(d, "digest"),
                diff_id=_s(d, "diffId"),
            )
            for d in raw.get("datasets") or ()
        ),
        docs=tuple(
            Docs(_s(d, "path"), _s(d, "description"), _s(d, "digest"), _s(d, "diffId"))
            for d in raw.get("docs") or ()
        ),
        prompts=tuple(
            Prompt(
                _s(d, "name"), _s(d, "path"), _s(d, "description"), _s(d, "digest"), _s(d, "diffId")
            )
            for d in raw.get("prompts") or ()
        ),
        mcp_servers=tuple(
            McpServer(
                _s(d, "name"), _s(d, "path"), _s(d, "description"), _s(d, "digest"), _s(d, "diffId")
            )
            for d in raw.get("mcpServers") or ()
        ),
    )


# =============================================================================================
# load_kitfile
# =============================================================================================


def load_kitfile(text: str | bytes, source: str = "Kitfile", *, validate: bool = True) -> Kitfile:
    """Parse a Kitfile as `kit pack` does; any problem is a one-line KitfileError
    `SOURCE:LINE: message` naming the key.

    Decoding follows yaml.v3 with `KnownFields(true)` (unknown keys, wrong shapes and
    duplicate keys are errors; scalars resolve as YAML 1.2 core, so `yes` is a string).
    With `validate` (the default) the checks `kit` runs before packing follow: manifestVersion
    must be "1.0.0", paths must be local, relative and inside the context, no two entries
    may share a path, part types must match `^[\\w][\\w.-]*$` (at most 64 bytes), remote
    datasets must use s3:// (with remoteHash) or a ModelKit reference, and mcpServers need
    unique names and a `.mcpb` path. When there are several problems the first (by line)
    is reported, with a count of the others.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise KitfileError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    try:
        documents = yaml.compose_all(text, Loader=_Loader)
        root = next(documents, None)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise KitfileError(f"{source}{line}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise KitfileError(f"{source}: invalid YAML: {exc}") from None
    except RecursionError:
        raise KitfileError(f"{source}: invalid YAML: nested too deeply") from None
    if root is None:
        raise KitfileError(f'{source}: empty Kitfile (expected at least manifestVersion: "1.0.0")')
    reader = _YamlReader()
    try:
        raw = reader.struct(root, _SPECS["kitfile"], (), "the top level")
    except _Problem as problem:
        raise KitfileError(f"{source}:{problem.line}: {problem.message}") from None
    if raw is None:
        raw = {}
        reader.lines[()] = _line(root)
    kf = _build(raw)
    if validate:
        problems = _validate(kf, raw, reader.lines)
        if problems:
            problems.sort(key=lambda p: p[0])
            first_line, message = problems[0]
            more = len(problems) - 1
            tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
            raise KitfileError(f"{source}:{first_line}: {message}{tail}")
    return kf


# =============================================================================================
# Validation (kit ValidateKitfile / KitFile.Validate)
# =============================================================================================

_PART_TYPE = re.compile(r"^[\w][\w.-]*$", re.ASCII)
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def _path_kind(path: str) -> tuple[str, str | None]:
    """kit GetPathType: ("local"|"reference"|"s3"|"unknown", error message or None)."""
    if is_modelkit_reference(path):
        return "reference", None
    match = _URL_SCHEME.match(path)
    if match is None:
        if path.startswith("//") and len(path) > 2 and path[2] != "/":
            return "unknown", f"unrecognized URL in path: {path}"
        return "local", None
    scheme = match.group(1).lower()
    if scheme == "s3":
        return "s3", None
    if scheme in ("http", "https"):
        return "unknown", f"HTTP URLs are not supported in paths ({path})"
    return "unknown", f"unrecognized URL in path: {path}"


def _validate(
    kf: Kitfile, raw: dict[str, Any], lines: dict[tuple[str | int, ...], int]
) -> list[tuple[int, str]]:
    problems: list[tuple[int, str]] = []

    def line_of(*loc: str | int) -> int:
        while loc:
            if loc in lines:
                return lines[loc]
            loc = loc[:-1]
        return lines.get((), 1)

    if "manifestVersion" not in raw:
        problems.append(
            (line_of(), 'missing manifestVersion: kit requires manifestVersion: "1.0.0"')
        )
    elif kf.manifest_version != MANIFEST_VERSION:
        problems.append(
            (
                line_of("manifestVersion"),
                f'unsupported manifestVersion {kf.manifest_version!r}: kit requires "1.0.0"',
            )
        )

    # (cleaned path, label, line) of every entry that takes a path in the pack context
    users: list[tuple[str, str, int]] = []
    remote_roots: list[tuple[str, str]] = []

    def check_path(
        path: str, label: str, loc: tuple[str | int, ...], allowed: tuple[str, ...] = ("local",)
    ) -> None:
        line = line_of(*loc, "path")
        kind, error = _path_kind(path)
        if error is not None:
            problems.append((line, f"invalid path for {label}: {error}"))
        elif kind not in allowed:
            if kind == "reference":
                problems.append(
                    (
                        line,
                        f"invalid path for {label} ({path}):"
                        " only model.path may name another ModelKit",
                    )
                )
            else:
                problems.append(
                    (line, f"invalid path for {label} ({path}): only local paths are permitted")
                )
        cleaned = clean_path(path)
        users.append((cleaned, label, line))
        if kind != "local":
            return
        if cleaned.startswith("/"):
            problems.append(
                (line, f"absolute path {path!r} in {label}: paths are relative to the pack context")
            )
        elif cleaned == ".." or cleaned.startswith("../"):
            problems.append((line, f"path {path!r} in {label} leaves the pack context directory"))

    model = kf.model
    if model is not None:
        check_path(model.path, "model", ("model",), ("local", "reference"))
        for i, part in enumerate(model.parts):
            label = f"model.parts[{i}]"
            check_path(part.path, label, ("model", "parts", i))
            if part.type:
                type_line = line_of("model", "parts", i, "type")
                if not _PART_TYPE.match(part.type):
                    problems.append(
                        (
                            type_line,
                            f"invalid type {part.type!r} in {label}: use letters, digits,"
                            " '_', '.' and '-', starting with a letter, digit or '_'",
                        )
                    )
                if len(part.type.encode("utf-8")) > PART_TYPE_MAX_LEN:
                    problems.append(
                        (
                            type_line,
                            f"type in {label} is too long (at most {PART_TYPE_MAX_LEN} characters)",
                        )
                    )
    for i, code in enumerate(kf.code):
        check_path(code.path, f"code[{i}]", ("code", i))
    for i, ds in enumerate(kf.datasets):
        label = f"datasets[{i}]"
        check_path(ds.path, label, ("datasets", i))
        if ds.remote_path:
            remote_line = line_of("datasets", i, "remotePath")
            kind, _ = _path_kind(ds.remote_path)
            if kind == "s3":
                if not ds.remote_hash:
                    problems.append(
                        (remote_line, f"remoteHash is required with an s3:// remotePath in {label}")
                    )
            elif kind != "reference":
                problems.append(
                    (
                        remote_line,
                        f"invalid remotePath {ds.remote_path!r} in {label}:"
                        " use an s3:// URL or a ModelKit reference",
                    )
                )
            remote_roots.append((clean_path(ds.path), label))
        elif ds.remote_hash:
            problems.append(
                (
                    line_of("datasets", i, "remoteHash"),
                    f"remoteHash in {label} is only meaningful with remotePath",
                )
            )
    for i, doc in enumerate(kf.docs):
        check_path(doc.path, f"docs[{i}]", ("docs", i))
    for i, prompt in enumerate(kf.prompts):
        check_path(prompt.path, f"prompts[{i}]", ("prompts", i))
    names: dict[str, str] = {}
    for i, srv in enumerate(kf.mcp_servers):
        label = f"mcpServers[{i}]"
        check_path(srv.path, label, ("mcpServers", i))
        if not srv.name:
            problems.append(
                (line_of("mcpServers", i), f"{label} (path {srv.path}) must have a name")
            )
        elif srv.name in names:
            problems.append(
                (
                    line_of("mcpServers", i, "name"),
                    f"duplicate mcpServer name {srv.name!r} ({names[srv.name]} and {label})",
                )
            )
        else:
            names[srv.name] = label
        if not srv.path.endswith(".mcpb"):
            problems.append(
                (
                    line_of("mcpServers", i, "path"),
                    f"invalid path for {label} ({srv.path}): it must name a single .mcpb file",
                )
            )

    by_path: dict[str, list[tuple[str, int]]] = {}
    for cleaned, label, line in users:
        by_path.setdefault(cleaned, []).append((label, line))
    for cleaned, group in by_path.items():
        if len(group) > 1:
            labels = [label for label, _ in group]
            problems.append(
                (
                    group[-1][1],
                    f"{', '.join(labels[:-1])} and {labels[-1]} use the same path {cleaned!r}"
                    f" (first at line {group[0][1]})",
                )
            )
    for root, root_label in remote_roots:
        prefix = root.rstrip("/") + "/"
        for cleaned, label, line in users:
            if label != root_label and (cleaned.startswith(prefix) or root == "."):
                problems.append(
                    (
                        line,
                        f"{label} uses a path ({cleaned}) that is within the path"
                        f" for a remote dataset ({root_label})",
                    )
                )
    return problems


# =============================================================================================
# Reading the config blob (Go json.Unmarshal into KitFile: unknown keys ignored, keys matched
# case-insensitively, wrong types are errors, numbers in `parameters` become float64)
# =============================================================================================

_JSON_SPECS: dict[str, _Spec] = {
    name: {
        **spec,
        **({"digest": "str", "diffId": "str"} if name not in ("kitfile", "package") else {}),
    }
    for name, spec in _SPECS.items()
}
_SURROGATES = re.compile("[\ud800-\udfff]")

_Pairs: TypeAlias = list[tuple[str, Any]]


class _JsonObject(list[tuple[str, Any]]):
    """A JSON object kept as its ordered (key, value) pairs, as Go's decoder sees them."""


def _json_number(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text} out of range")
    return value


def _json_const(text: str) -> float:
    raise ValueError(f"invalid JSON value {text}")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, _JsonObject):
        return "object"
    return "array"


def _fix_str(text: str) -> str:
    return _SURROGATES.sub("\ufffd", text)


def _json_any(value: Any) -> ParamValue:
    if isinstance(value, _JsonObject):
        out: dict[str, ParamValue] = {}
        for key, item in value:
            out[_fix_str(key)] = _json_any(item)
        return out
    if isinstance(value, list):
        return [_json_any(v) for v in value]
    if isinstance(value, str):
        return _fix_str(value)
    return value  # type: ignore[no-any-return]


def _json_struct(obj: Any, spec: _Spec, where: str) -> dict[str, Any]:
    if not isinstance(obj, _JsonObject):
        raise FormatError(f"config: {where} must be a JSON object, not {_json_type(obj)}")
    folded = {k.lower(): k for k in spec}
    out: dict[str, Any] = {}
    for key, value in obj:
        name = key if key in spec else folded.get(key.lower())
        if name is None:
            continue  # encoding/json ignores unknown keys
        kind = spec[name]
        what = f"{where}.{name}" if where != "config" else name
        if value is None and kind != "any":
            continue  # null leaves Go's zero value
        if kind == "str":
            if not isinstance(value, str):
                raise FormatError(f"config: {what} must be a string, not {_json_type(value)}")
            out[name] = _fix_str(value)
        elif kind == "strs":
            if not isinstance(value, list) or isinstance(value, _JsonObject):
                raise FormatError(
                    f"config: {what} must be an array of strings, not {_json_type(value)}"
                )
            items = []
            for item in value:
                if item is not None and not isinstance(item, str):
                    raise FormatError(f"config: {what} must be an array of strings")
                items.append(_fix_str(item or ""))
            out[name] = items
        elif kind == "any":
            out[name] = _json_any(value)
        elif isinstance(kind, tuple) and kind[0] == "struct":
            out[name] = _json_struct(value, _JSON_SPECS[kind[1]], what)
        elif isinstance(kind, tuple) and kind[0] == "list":
            if not isinstance(value, list) or isinstance(value, _JsonObject):
                raise FormatError(f"config: {what} must be an array, not {_json_type(value)}")
            out[name] = [
                {} if item is None else _json_struct(item, _JSON_SPECS[kind[1]], f"{what}[{i}]")
                for i, item in enumerate(value)
            ]
    return out


def _parse_json_object(data: bytes | str, what: str) -> _JsonObject:
    """Parse a JSON object as Go does (invalid UTF-8 replaced, NaN/Infinity refused)."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    try:
        value = json.loads(
            text,
            object_pairs_hook=_JsonObject,
            parse_float=_json_number,
            parse_int=_json_number,
            parse_constant=_json_const,
        )
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, _JsonObject):
        raise FormatError(f"{what} must be a JSON object, not {_json_type(value)}")
    return value


def kitfile_from_config(data: bytes | str) -> Kitfile:
    """The Kitfile in a ModelKit config blob (or the `ml.kitops.modelkit.kitfile` annotation).

    Read like Go `json.Unmarshal` into kit's KitFile: unknown keys are ignored, keys match
    case-insensitively, a wrong type is a FormatError, numbers inside `parameters` become
    floats (Go float64). Digests and diffIds are kept. Nothing else is validated.
    """
    obj = _parse_json_object(data, "config")
    return _build(_json_struct(obj, _JSON_SPECS["kitfile"], "config"))


# =============================================================================================
# Writing YAML like yaml.v3's encoder (SetIndent(2), unlimited width, unicode on)
# =============================================================================================

# Nodes: ("map", [(key, node)], flow) | ("seq", [node], flow) | ("str", text) | ("plain", text)
_YNode: TypeAlias = tuple[Any, ...]

_BREAKS = "\r\n\x85\u2028\u2029"
_OLD_BOOLS = frozenset(
    [
        "y",
        "Y",
        "yes",
        "Yes",
        "YES",
        "on",
        "On",
        "ON",
        "n",
        "N",
        "no",
        "No",
        "NO",
        "off",
        "Off",
        "OFF",
    ]
)
_BASE60_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")


def _printable(ch: str) -> bool:
    c = ord(ch)
    return (
        c == 0x0A
        or 0x20 <= c <= 0x7E
        or 0xA0 <= c <= 0xD7FF
        or (0xE000 <= c <= 0xFFFD and c != 0xFEFF)
    )


@dataclass
class _Analysis:
    multiline: bool
    flow_plain: bool
    block_plain: bool
    single_quoted: bool
    block: bool


def _analyze(value: str) -> _Analysis:
    if not value:
        return _Analysis(False, False, True, True, False)
    block_ind = flow_ind = line_breaks = special = tabs = False
    leading_space = leading_break = trailing_space = trailing_break = False
    break_space = space_break = previous_space = previous_break = False
    if value.startswith(("---", "...")):
        block_ind = flow_ind = True
    preceded_by_ws = True
    n = len(value)
    for i, ch in enumerate(value):
        followed_by_ws = i + 1 >= n or value[i + 1] in " \t"
        if i == 0:
            if ch in "#,[]{}&*!|>'\"%@`":
                flow_ind = block_ind = True
            elif ch in "?:":
                flow_ind = True
                if followed_by_ws:
                    block_ind = True
            elif ch == "-" and followed_by_ws:
                flow_ind = block_ind = True
        else:
            if ch in ",?[]{}":
                flow_ind = True
            elif ch == ":":
                flow_ind = True
                if followed_by_ws:
                    block_ind = True
            elif ch == "#" and preceded_by_ws:
                flow_ind = block_ind = True
        if ch == "\t":
            tabs = True
        elif not _printable(ch):
            special = True
        if ch == " ":
            leading_space = leading_space or i == 0
            trailing_space = trailing_space or i == n - 1
            if previous_break:
                break_space = True
            previous_space, previous_break = True, False
        elif ch in _BREAKS:
            line_breaks = True
            leading_break = leading_break or i == 0
            trailing_break = trailing_break or i == n - 1
            if previous_space:
                space_break = True
            previous_space, previous_break = False, True
        else:
            previous_space = previous_break = False
        preceded_by_ws = ch in " \t\0" or ch in _BREAKS
    flow_plain = block_plain = single = block = True
    if leading_space or leading_break or trailing_space or trailing_break:
        flow_plain = block_plain = False
    if trailing_space:
        block = False
    if break_space:
        flow_plain = block_plain = single = False
    if space_break or tabs or special:
        flow_plain = block_plain = single = False
    if space_break or special:
        block = False
    if line_breaks:
        flow_plain = block_plain = False
    if flow_ind:
        flow_plain = False
    if block_ind:
        block_plain = False
    return _Analysis(line_breaks, flow_plain, block_plain, single, block)


def _str_node(text: str) -> _YNode:
    return ("str", text)


def _plain_ok(text: str) -> bool:
    """yaml.v3 stringv: a string may be plain only if it would read back as a string."""
    if not text:
        return False
    tag, _ = resolve_plain(text)
    if tag != "str":
        return False
    if text in _OLD_BOOLS:
        return False
    return not (text[0] in "+-0123456789" and ":" in text and _BASE60_FLOAT.match(text))


class _Emitter:
    def __init__(self) -> None:
        self.out: list[str] = []
        self.column = 0
        self.whitespace = True
        self.indention = True
        self.indent = -1
        self.indents: list[int] = []
        self.flow_level = 0

    # -- low level ---------------------------------------------------------------------------

    def put(self, text: str) -> None:
        self.out.append(text)
        self.column += len(text)

    def put_break(self) -> None:
        self.out.append("\n")
        self.column = 0
        self.indention = True

    def write_indent(self) -> None:
        indent = max(self.indent, 0)
        if (
            not self.indention
            or self.column > indent
            or (self.column == indent and not self.whitespace)
        ):
            self.put_break()
        if self.column < indent:
            self.put(" " * (indent - self.column))
        self.whitespace = True

    def write_indicator(self, text: str, need_ws: bool, is_ws: bool, is_indention: bool) -> None:
        if need_ws and not self.whitespace:
            self.put(" ")
        self.put(text)
        self.whitespace = is_ws
        self.indention = self.indention and is_indention

    def increase_indent(self, flow: bool, in_seq_item: bool) -> None:
        self.indents.append(self.indent)
        if self.indent < 0:
            self.indent = 2 if flow else 0
        elif in_seq_item:
            self.indent += 2
        else:
            self.indent = 2 * ((self.indent + 2) // 2)

    def pop_indent(self) -> None:
        self.indent = self.indents.pop()

    # -- nodes -------------------------------------------------------------------------------

    def document(self, root: _YNode) -> str:
        self.node(root, in_seq_item=False, simple_key=False)
        self.indent = -1
        self.write_indent()
        return "".join(self.out)

    def node(self, node: _YNode, *, in_seq_item: bool, simple_key: bool) -> None:
        kind = node[0]
        if kind == "map":
            items, flow = node[1], node[2]
            if flow or self.flow_level or not items:
                self.flow_mapping(items, in_seq_item)
            else:
                self.block_mapping(items, in_seq_item)
        elif kind == "seq":
            items, flow = node[1], node[2]
            if flow or self.flow_level or not items:
                self.flow_sequence(items, in_seq_item)
            else:
                self.block_sequence(items, in_seq_item)
        elif kind == "str":
            text = node[1]
            if "\n" in text:
                style = "|"
            elif _plain_ok(text):
                style = ""
            else:
                style = '"'
            self.scalar(text, style, in_seq_item=in_seq_item, simple_key=simple_key)
        else:
            self.scalar(node[1], "", in_seq_item=in_seq_item, simple_key=simple_key)

    def block_mapping(self, items: list[tuple[str, _YNode]], in_seq_item: bool) -> None:
        self.increase_indent(False, in_seq_item)
        for key, value in items:
            self.write_indent()
            analysis = _analyze(key)
            if not analysis.multiline and len(key.encode("utf-8")) <= 128:
                self.node(_str_node(key), in_seq_item=False, simple_key=True)
                self.write_indicator(":", False, False, False)
            else:
                self.write_indicator("?", True, False, True)
                self.node(_str_node(key), in_seq_item=False, simple_key=False)
                self.write_indent()
                self.write_indicator(":", True, False, True)
            self.node(value, in_seq_item=False, simple_key=False)
        self.pop_indent()

    def block_sequence(self, items: list[_YNode], in_seq_item: bool) -> None:
        self.increase_indent(False, in_seq_item)
        for item in items:
            self.write_indent()
            self.write_indicator("-", True, False, True)
            self.node(item, in_seq_item=True, simple_key=False)
        self.pop_indent()

    def flow_sequence(self, items: list[_YNode], in_seq_item: bool) -> None:
        self.write_indicator("[", True, True, False)
        self.increase_indent(True, in_seq_item)
        self.flow_level += 1
        for i, item in enumerate(items):
            if i:
                self.write_indicator(",", False, False, False)
            self.node(item, in_seq_item=False, simple_key=False)
        self.flow_level -= 1
        self.pop_indent()
        self.write_indicator("]", False, False, False)

    def flow_mapping(self, items: list[tuple[str, _YNode]], in_seq_item: bool) -> None:
        self.write_indicator("{", True, True, False)
        self.increase_indent(True, in_seq_item)
        self.flow_level += 1
        for i, (key, value) in enumerate(items):
            if i:
                self.write_indicator(",", False, False, False)
            self.node(_str_node(key), in_seq_item=False, simple_key=True)
            self.write_indicator(":", False, False, False)
            self.node(value, in_seq_item=False, simple_key=False)
        self.flow_level -= 1
        self.pop_indent()
        self.write_indicator("}", False, False, False)

    def scalar(self, value: str, style: str, *, in_seq_item: bool, simple_key: bool) -> None:
        a = _analyze(value)
        if simple_key and a.multiline:
            style = '"'
        if style == "":
            if (self.flow_level and not a.flow_plain) or (
                not self.flow_level and not a.block_plain
            ):
                style = "'"
            if not value and (self.flow_level or simple_key):
                style = "'"
        if style == "'" and not a.single_quoted:
            style = '"'
        if style == "|" and (not a.block or self.flow_level or simple_key):
            style = '"'
        self.increase_indent(True, in_seq_item)
        if style == "":
            self.write_plain(value)
        elif style == "'":
            self.write_single(value)
        elif style == '"':
            self.write_double(value)
        else:
            self.write_literal(value)
        self.pop_indent()

    # -- scalar writers ----------------------------------------------------------------------

    def write_plain(self, value: str) -> None:
        if value and not self.whitespace:
            self.put(" ")
        self.put(value)
        self.whitespace = False
        self.indention = False

    def _write_break(self, ch: str) -> None:
        if ch == "\n":
            self.put_break()
        else:
            self.out.append(ch)
            self.column = 0
            self.indention = True

    def write_single(self, value: str) -> None:
        self.write_indicator("'", True, False, False)
        breaks = False
        for ch in value:
            if ch == " ":
                self.put(ch)
            elif ch in _BREAKS:
                if not breaks and ch == "\n":
                    self.put_break()
                self._write_break(ch)
                breaks = True
                continue
            else:
                if breaks:
                    self.write_indent()
                self.put("''" if ch == "'" else ch)
                self.indention = False
            breaks = False
        self.write_indicator("'", False, False, False)
        self.whitespace = False
        self.indention = False

    def write_double(self, value: str) -> None:
        self.write_indicator('"', True, False, False)
        parts: list[str] = []
        for ch in value:
            if not _printable(ch) or ch == "\ufeff" or ch in _BREAKS or ch in '"\\':
                parts.append(_yaml_escape(ch))
            else:
                parts.append(ch)
        self.put("".join(parts))
        self.write_indicator('"', False, False, False)

    def write_literal(self, value: str) -> None:
        self.write_indicator("|", True, False, False)
        if value[0] == " " or value[0] in _BREAKS:
            self.write_indicator("2", False, False, False)
        if value[-1] not in _BREAKS:
            self.write_indicator("-", False, False, False)
        elif len(value) == 1 or value[-2] in _BREAKS:
            self.write_indicator("+", False, False, False)
        self.put_break()
        self.whitespace = True
        breaks = True
        for ch in value:
            if ch in _BREAKS:
                self._write_break(ch)
                breaks = True
            else:
                if breaks:
                    self.write_indent()
                self.put(ch)
                self.indention = False
                breaks = False


_YAML_ESCAPES = {
    "\0": "0",
    "\a": "a",
    "\b": "b",
    "\t": "t",
    "\n": "n",
    "\v": "v",
    "\f": "f",
    "\r": "r",
    "\x1b": "e",
    '"': '"',
    "\\": "\\",
    "\x85": "N",
    "\xa0": "_",
    "\u2028": "L",
    "\u2029": "P",
}


def _yaml_escape(ch: str) -> str:
    short = _YAML_ESCAPES.get(ch)
    if short is not None:
        return "\\" + short
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02X}"
    if code <= 0xFFFF:
        return f"\\u{code:04X}"
    return f"\\U{code:08X}"


def _wrap_int64(value: int) -> int:
    return ((value + (1 << 63)) % (1 << 64)) - (1 << 63)


def _is_digit(ch: str) -> bool:
    return unicodedata.category(ch) == "Nd"


def _yaml_key_less(a: str, b: str) -> bool:
    """yaml.v3 keyList.Less for two string keys ("natural" order)."""
    digits = False
    for i in range(min(len(a), len(b))):
        ca, cb = a[i], b[i]
        if ca == cb:
            digits = _is_digit(ca)
            continue
        al, bl = ca.isalpha(), cb.isalpha()
        if al and bl:
            return ca < cb
        if al or bl:
            return al if digits else bl
        an = bn = 0
        if ca == "0" or cb == "0":
            j = i - 1
            while j >= 0 and _is_digit(a[j]):
                if a[j] != "0":
                    an = bn = 1
                    break
                j -= 1
        ai = i
        while ai < len(a) and _is_digit(a[ai]):
            an = _wrap_int64(an * 10 + ord(a[ai]) - 48)
            ai += 1
        bi = i
        while bi < len(b) and _is_digit(b[bi]):
            bn = _wrap_int64(bn * 10 + ord(b[bi]) - 48)
            bi += 1
        if an != bn:
            return an < bn
        if ai != bi:
            return ai < bi
        return ca < cb
    return len(a) < len(b)


def _yaml_key_cmp(a: str, b: str) -> int:
    if _yaml_key_less(a, b):
        return -1
    if _yaml_key_less(b, a):
        return 1
    return 0


def _yaml_param(value: ParamValue) -> _YNode:
    if value is None:
        return ("plain", "null")
    if value is True:
        return ("plain", "true")
    if value is False:
        return ("plain", "false")
    if isinstance(value, int):
        return ("plain", str(value))
    if isinstance(value, float):
        return ("plain", go_format_float_g(value))
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, Timestamp):
        return ("plain", value.text)
    if isinstance(value, list):
        return ("seq", [_yaml_param(v) for v in value], False)
    keys = sorted(value, key=functools.cmp_to_key(_yaml_key_cmp))
    return ("map", [(k, _yaml_param(value[k])) for k in keys], False)


def _ymap(
    pairs: list[tuple[str, str, bool]], extra: list[tuple[str, _YNode]] | None = None
) -> _YNode:
    items: list[tuple[str, _YNode]] = [(k, ("str", v)) for k, v, omit in pairs if v or not omit]
    return ("map", items + (extra or []), False)


def _package_node(pkg: Package) -> _YNode:
    authors: list[tuple[str, _YNode]] = []
    if pkg.authors:
        authors = [("authors", _authors_node(pkg.authors, flow=True))]
    return _ymap(
        [
            ("name", pkg.name, True),
            ("version", pkg.version, True),
            ("description", pkg.description, True),
            ("license", pkg.license, True),
        ],
        authors,
    )


def _authors_node(authors: Sequence[str], *, flow: bool) -> _YNode:
    """Flow style inside `package` (the struct tag says `flow`), block style alone."""
    return ("seq", [("str", a) for a in authors], flow)


def _part_node(p: ModelPart) -> _YNode:
    return _ymap(
        [
            ("name", p.name, True),
            ("path", p.path, True),
            ("license", p.license, True),
            ("type", p.type, True),
        ]
    )


def _model_node(model: Model) -> _YNode:
    extra: list[tuple[str, _YNode]] = []
    if model.parts:
        extra.append(("parts", ("seq", [_part_node(p) for p in model.parts], False)))
    if model.parameters is not None:
        extra.append(("parameters", _yaml_param(model.parameters)))
    return _ymap(
        [
            ("name", model.name, True),
            ("path", model.path, True),
            ("license", model.license, True),
            ("framework", model.framework, True),
            ("format", model.format, True),
            ("version", model.version, True),
            ("description", model.description, True),
        ],
        extra,
    )


def _code_node(c: Code) -> _YNode:
    return _ymap(
        [
            ("path", c.path, True),
            ("description", c.description, True),
            ("license", c.license, True),
        ]
    )


def _dataset_node(d: Dataset) -> _YNode:
    params = [] if d.parameters is None else [("parameters", _yaml_param(d.parameters))]
    return _ymap(
        [
            ("name", d.name, True),
            ("path", d.path, True),
            ("remotePath", d.remote_path, True),
            ("remoteHash", d.remote_hash, True),
            ("description", d.description, True),
            ("license", d.license, True),
        ],
        params,
    )


def _docs_node(d: Docs) -> _YNode:
    return _ymap([("path", d.path, False), ("description", d.description, True)])


def _named_node(e: Prompt | McpServer) -> _YNode:
    return _ymap(
        [
            ("name", e.name, True),
            ("path", e.path, True),
            ("description", e.description, True),
        ]
    )


def _entry_node(entry: Package | AnyEntry) -> _YNode:
    if isinstance(entry, Package):
        return _package_node(entry)
    if isinstance(entry, Model):
        return _model_node(entry)
    if isinstance(entry, ModelPart):
        return _part_node(entry)
    if isinstance(entry, Code):
        return _code_node(entry)
    if isinstance(entry, Dataset):
        return _dataset_node(entry)
    if isinstance(entry, Docs):
        return _docs_node(entry)
    return _named_node(entry)


def kitfile_to_yaml(kf: Kitfile) -> str:
    """The Kitfile as `kit unpack` writes `<dir>/Kitfile` (yaml.v3, indent 2, no digests)."""
    top: list[tuple[str, _YNode]] = [("manifestVersion", ("str", kf.manifest_version))]
    if not kf.package.is_empty():
        top.append(("package", _package_node(kf.package)))
    if kf.model is not None:
        top.append(("model", _model_node(kf.model)))
    sections: list[tuple[str, Sequence[AnyEntry]]] = [
        ("code", kf.code), ("datasets", kf.datasets), ("docs", kf.docs),
        ("prompts", kf.prompts), ("mcpServers", kf.mcp_servers),
    ]
    for key, entries in sections:
        if entries:
            top.append((key, ("seq", [_entry_node(e) for e in entries], False)))
    return _Emitter().document(("map", top, False))


#: One field of a Kitfile, as `kit info --filter` selects it (modelkit/infofilter.py).
KitfileValue: TypeAlias = (
    Package | AnyEntry | tuple[AnyEntry, ...] | tuple[str, ...] | ParamValue
)


def value_to_yaml(value: KitfileValue) -> str:
    """One field of a Kitfile alone, as yaml.v3 (indent 2) encodes the Go value behind it.

    `kit info --filter` encodes the struct, slice or string it selected: an
    absent model is `null`, an empty list `[]`, an empty package `{}`, an
    empty string `""`; a list of authors is a block sequence here (the flow
    style belongs to the `package` field's tag). Tuples are Kitfile lists;
    Python lists and dicts are `parameters` values.
    """
    node: _YNode
    if isinstance(value, tuple):
        node = ("seq", [("str", v) if isinstance(v, str) else _entry_node(v) for v in value],
                False)
    elif isinstance(value, Package | Model | ModelPart | Code | Dataset | Docs | Prompt
                    | McpServer):
        node = _entry_node(value)
    else:
        node = _yaml_param(value)
    return _Emitter().document(node)
