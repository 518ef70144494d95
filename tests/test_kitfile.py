"""Kitfile: strict loading, Go-exact config JSON, yaml.v3-exact YAML."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from kitfs.errors import FormatError, KitfileError
from kitfs.modelkit.kitfile import (
    Code,
    Dataset,
    Docs,
    Kitfile,
    LayerEntry,
    McpServer,
    Model,
    ModelPart,
    Package,
    Prompt,
    Timestamp,
    clean_path,
    config_json,
    go_format_float_g,
    go_json_float,
    go_json_string,
    is_modelkit_reference,
    kitfile_from_config,
    kitfile_to_yaml,
    load_kitfile,
    resolve_plain,
)

KITOPS_DATA = Path(__file__).parent / "data" / "kitfiles" / "kitops"


# ---------------------------------------------------------------------------------------------
# kit's own round-trip cases (pkg/artifact/testdata/parameters)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", sorted(p.name for p in KITOPS_DATA.glob("parameters-*.yaml")), ids=lambda n: n[11:-5]
)
def test_kit_parameter_cases_round_trip_byte_for_byte(case: str) -> None:
    data = yaml.safe_load((KITOPS_DATA / case).read_text())
    kf = load_kitfile(data["kitfileYaml"], validate=False)  # they use absolute /tmp paths
    assert kitfile_to_yaml(kf) == data["kitfileYaml"]
    assert config_json(kf).decode() == data["kitfileJson"]


# ---------------------------------------------------------------------------------------------
# config JSON, byte for byte
# ---------------------------------------------------------------------------------------------


def test_config_json_minimal_has_empty_package() -> None:
    kf = load_kitfile('manifestVersion: "1.0.0"\n')
    assert config_json(kf) == b'{"manifestVersion":"1.0.0","package":{}}'


def test_config_json_field_order_omitempty_and_layer_info_last() -> None:
    kf = load_kitfile(
        """\
manifestVersion: 1.0.0
package:
  authors: [Ann, Bob]
  license: MIT
  name: pkg
model:
  description: a model
  path: ./model
  name: m
  parts:
    - type: lora
      path: adapters/lora
code:
  - license: Apache-2.0
    path: src
datasets:
  - path: data/train
    name: train
docs:
  - path: README.md
prompts:
  - path: prompts/system.md
    name: sys
"""
    )
    digests = [
        (f"sha256:{c * 64}", f"sha256:{d * 64}") for c, d in ("ab", "cd", "ef", "12", "34", "56")
    ]
    kf = kf.with_layer_digests(digests)

    def info(c: str, d: str) -> str:
        return f'"digest":"sha256:{c * 64}","diffId":"sha256:{d * 64}"'

    expected = (
        '{"manifestVersion":"1.0.0",'
        '"package":{"name":"pkg","license":"MIT","authors":["Ann","Bob"]},'
        '"model":{"name":"m","path":"./model","description":"a model",'
        f'"parts":[{{"path":"adapters/lora","type":"lora",{info("c", "d")}}}],'
        f"{info('a', 'b')}}},"
        f'"code":[{{"path":"src","license":"Apache-2.0",{info("e", "f")}}}],'
        f'"datasets":[{{"name":"train","path":"data/train",{info("1", "2")}}}],'
        f'"docs":[{{"path":"README.md",{info("3", "4")}}}],'
        f'"prompts":[{{"name":"sys","path":"prompts/system.md",{info("5", "6")}}}]}}'
    )
    assert config_json(kf).decode() == expected


def test_config_json_html_escaping_unicode_and_control_characters() -> None:
    kf = Kitfile(
        manifest_version="1.0.0",
        package=Package(description='a <b> & "c" \\ \u2028\u2029 é日本🤖 \x01\x1f\t\n\r\b\f\x7f'),
    )
    assert config_json(kf).decode("utf-8") == (
        '{"manifestVersion":"1.0.0","package":{"description":'
        '"a \\u003cb\\u003e \\u0026 \\"c\\" \\\\ \\u2028\\u2029 é日本🤖 '
        '\\u0001\\u001f\\t\\n\\r\\b\\f\x7f"}}'
    )


def test_docs_path_is_never_omitted_and_empty_entries_stay() -> None:
    kf = Kitfile(manifest_version="", docs=(Docs(),), code=(Code(),), model=Model())
    assert config_json(kf) == (
        b'{"manifestVersion":"","package":{},"model":{},"code":[{}],"docs":[{"path":""}]}'
    )


PARAMS_YAML = """\
manifestVersion: 1.0.0
model:
  path: model
  parameters:
    z: 1
    a: 1.5
    b: true
    c: null
    d: 1e3
    e: 0x1F
    f: 1.2e+3
    g: 0o17
    h: yes
    i: 2024-01-02
    j: 1_000
    k: .5
    l: 1e-7
    m: 1e21
    n: 12345678901234567890
    o: -0.0
    p: 017
    q: 08
    r: ~
    s: "quoted 1"
    nested: {b: [1, "two", {y: 2, x: 1}], a: {}, "<k>": "&"}
    t: 2001-12-14t21:59:43.10-05:00
    u: 2001-12-14 21:59:43.10
"""


def test_parameters_resolve_like_yaml_v3_and_marshal_like_go() -> None:
    kf = load_kitfile(PARAMS_YAML)
    assert config_json(kf).decode() == (
        '{"manifestVersion":"1.0.0","package":{},"model":{"path":"model","parameters":{'
        '"a":1.5,"b":true,"c":null,"d":1000,"e":31,"f":1200,"g":15,"h":"yes",'
        '"i":"2024-01-02T00:00:00Z","j":1000,"k":0.5,"l":1e-7,"m":1e+21,'
        '"n":12345678901234567890,'
        '"nested":{"\\u003ck\\u003e":"\\u0026","a":{},"b":[1,"two",{"x":1,"y":2}]},'
        '"o":-0,"p":15,"q":8,"r":null,"s":"quoted 1",'
        '"t":"2001-12-14T21:59:43.1-05:00","u":"2001-12-14T21:59:43.1Z","z":1}}}'
    )
    params = kf.model.parameters if kf.model else None
    assert isinstance(params, dict)
    assert params["e"] == 31 and isinstance(params["e"], int)
    assert params["d"] == 1000.0 and isinstance(params["d"], float)
    assert params["i"] == Timestamp("2024-01-02T00:00:00Z")


def test_parameters_yaml_output_sorted_naturally_with_go_number_formats() -> None:
    kf = load_kitfile(PARAMS_YAML)
    assert (
        kitfile_to_yaml(kf)
        == """\
manifestVersion: 1.0.0
model:
  path: model
  parameters:
    a: 1.5
    b: true
    c: null
    d: 1000
    e: 31
    f: 1200
    g: 15
    h: "yes"
    i: 2024-01-02T00:00:00Z
    j: 1000
    k: 0.5
    l: 1e-07
    m: 1e+21
    "n": 12345678901234567890
    nested:
      <k>: '&'
      a: {}
      b:
        - 1
        - two
        - x: 1
          "y": 2
    o: -0
    p: 15
    q: 8
    r: null
    s: quoted 1
    t: 2001-12-14T21:59:43.1-05:00
    u: 2001-12-14T21:59:43.1Z
    z: 1
"""
    )


def test_parameters_non_nil_falsy_values_are_kept_and_null_is_omitted() -> None:
    for text, expected in (
        ("{}", "{}"),
        ("[]", "[]"),
        ("false", "false"),
        ("0", "0"),
        ('""', '""'),
    ):
        kf = load_kitfile(f"manifestVersion: 1.0.0\nmodel:\n  path: m\n  parameters: {text}\n")
        assert config_json(kf).endswith(f'"parameters":{expected}}}}}'.encode())
        assert kitfile_to_yaml(kf).endswith(f"  parameters: {expected}\n")
    kf = load_kitfile("manifestVersion: 1.0.0\nmodel:\n  path: m\n  parameters: null\n")
    assert b"parameters" not in config_json(kf)


def test_config_numbers_become_float64_like_go() -> None:
    kf = kitfile_from_config(
        b'{"manifestVersion":"1.0.0","model":{"path":"m","parameters":{"big":1000000,"n":123}}}'
    )
    assert kf.model is not None and kf.model.parameters == {"big": 1e6, "n": 123.0}
    assert config_json(kf).endswith(b'"parameters":{"big":1000000,"n":123}}}')
    assert "big: 1e+06\n" in kitfile_to_yaml(kf)


@pytest.mark.parametrize(
    ("value", "json_text", "g_text"),
    [
        (0.0, "0", "0"),
        (-0.0, "-0", "-0"),
        (1.0, "1", "1"),
        (12.3, "12.3", "12.3"),
        (123456.0, "123456", "123456"),
        (1234567.0, "1234567", "1.234567e+06"),
        (1e20, "100000000000000000000", "1e+20"),
        (1e21, "1e+21", "1e+21"),
        (1.5e300, "1.5e+300", "1.5e+300"),
        (0.0001, "0.0001", "0.0001"),
        (0.00001, "0.00001", "1e-05"),
        (1e-6, "0.000001", "1e-06"),
        (1.5e-7, "1.5e-7", "1.5e-07"),
        (5e-324, "5e-324", "5e-324"),
        (-2.5, "-2.5", "-2.5"),
        (0.1 + 0.2, "0.30000000000000004", "0.30000000000000004"),
    ],
)
def test_go_float_formatting(value: float, json_text: str, g_text: str) -> None:
    assert go_json_float(value) == json_text
    assert go_format_float_g(value) == g_text


def test_go_float_non_finite() -> None:
    with pytest.raises(ValueError):
        go_json_float(math.inf)
    assert go_format_float_g(math.inf) == ".inf"
    assert go_format_float_g(-math.inf) == "-.inf"
    assert go_format_float_g(math.nan) == ".nan"


def test_go_json_string_lone_surrogate() -> None:
    assert go_json_string("a\ud800b") == '"a\\ufffdb"'


@pytest.mark.parametrize(
    ("text", "tag", "value"),
    [
        ("yes", "str", "yes"),
        ("on", "str", "on"),
        ("True", "bool", True),
        ("NULL", "null", None),
        ("~", "null", None),
        ("0777", "int", 511),
        ("0b101", "int", 5),
        ("-0x10", "int", -16),
        ("+12", "int", 12),
        ("9223372036854775807", "int", 9223372036854775807),
        ("-9223372036854775809", "float", -9223372036854775809.0),
        ("18446744073709551616", "float", 18446744073709551616.0),
        ("1e400", "str", "1e400"),
        ("1:20", "str", "1:20"),
        ("1.", "float", 1.0),
        (".inf", "float", math.inf),
        ("2024-02-30", "str", "2024-02-30"),
        ("2024-1-2", "timestamp", Timestamp("2024-01-02T00:00:00Z")),
        ("2024-01-02T03:04:05Z", "timestamp", Timestamp("2024-01-02T03:04:05Z")),
        ("2024-01-02T03:04:05+00:00", "timestamp", Timestamp("2024-01-02T03:04:05Z")),
        ("2024-01-02T03:04:05", "str", "2024-01-02T03:04:05"),
        ("<<", "merge", "<<"),
        ("0x", "str", "0x"),
    ],
)
def test_resolve_plain_matches_yaml_v3(text: str, tag: str, value: object) -> None:
    assert resolve_plain(text) == (tag, value)


def test_string_fields_keep_the_scalar_text() -> None:
    kf = load_kitfile(
        "manifestVersion: 1.0.0\npackage:\n  version: 1.10\n  name: 0x1F\n"
        "  description: ~\n  license: 2024-01-01\n  authors: [1, true, null]\n"
    )
    assert kf.package == Package(
        name="0x1F", version="1.10", description="", license="2024-01-01", authors=("1", "true", "")
    )


def test_anchors_and_merge_keys() -> None:
    kf = load_kitfile(
        """\
manifestVersion: 1.0.0
model:
  path: model
  parameters:
    base: &base {lr: 0.1, epochs: 3}
    run:
      <<: *base
      epochs: 5
"""
    )
    assert kf.model is not None
    assert kf.model.parameters == {
        "base": {"lr": 0.1, "epochs": 3},
        "run": {"lr": 0.1, "epochs": 5},
    }


def test_only_the_first_yaml_document_is_read() -> None:
    kf = load_kitfile("manifestVersion: 1.0.0\n---\nnot: read\n")
    assert kf == Kitfile(manifest_version="1.0.0")


# ---------------------------------------------------------------------------------------------
# YAML output (what `kit unpack` writes)
# ---------------------------------------------------------------------------------------------


def test_yaml_output_styles_like_yaml_v3() -> None:
    kf = Kitfile(
        manifest_version="1.0.0",
        package=Package(name="demo", authors=("Jane Doe", "Doe, John", "x: y", "")),
        model=Model(
            path="./model", parts=(ModelPart(path="lora", type="lora"),), digest="sha256:x"
        ),
        code=(
            Code(path="src", description="a: b"),
            Code(path="#x", description="multi\nline"),
            Code(path="' q'", description="multi\nline\n"),
        ),
        datasets=(
            Dataset(
                name="d",
                path="data",
                description=" indented\nx",
                parameters={
                    "list": ["true", "1.0", "", "null", "🤖", "2024-01-01", "1:20", "tab\t", "it's"]
                },
            ),
        ),
        docs=(Docs(path="", description="x\n\n"),),
        prompts=(Prompt(name="sys", path="p.md"),),
        mcp_servers=(McpServer(name="fs", path="fs.mcpb"),),
    )
    assert (
        kitfile_to_yaml(kf)
        == """\
manifestVersion: 1.0.0
package:
  name: demo
  authors: [Jane Doe, 'Doe, John', 'x: y', ""]
model:
  path: ./model
  parts:
    - path: lora
      type: lora
code:
  - path: src
    description: 'a: b'
  - path: '#x'
    description: |-
      multi
      line
  - path: ''' q'''
    description: |
      multi
      line
datasets:
  - name: d
    path: data
    description: |2-
       indented
      x
    parameters:
      list:
        - "true"
        - "1.0"
        - ""
        - "null"
        - "\\U0001F916"
        - "2024-01-01"
        - "1:20"
        - "tab\\t"
        - it's
docs:
  - path: ""
    description: |+
      x

prompts:
  - name: sys
    path: p.md
mcpServers:
  - name: fs
    path: fs.mcpb
"""
    )


ROUND_TRIP_YAML = "\n".join(
    line for line in PARAMS_YAML.splitlines() if not line.startswith(("    n:", "    o:"))
)


def test_yaml_round_trip_restores_the_kitfile_without_digests() -> None:
    kf = load_kitfile(ROUND_TRIP_YAML)
    packed = kf.with_layer_digests([("sha256:" + "a" * 64, "sha256:" + "b" * 64)])
    back = load_kitfile(kitfile_to_yaml(packed))
    assert back == kf == packed.without_layer_digests()
    # and the JSON of the reloaded Kitfile is the same bytes
    assert config_json(back) == config_json(kf)


def test_empty_model_and_entries_render_as_flow_mappings() -> None:
    kf = Kitfile(manifest_version="1.0.0", model=Model(), code=(Code(),))
    assert kitfile_to_yaml(kf) == "manifestVersion: 1.0.0\nmodel: {}\ncode:\n  - {}\n"


def test_long_keys_use_the_explicit_key_form() -> None:
    key = "k" * 129
    kf = Kitfile(manifest_version="1.0.0", model=Model(path="m", parameters={key: 1, "a\nb": 2}))
    out = kitfile_to_yaml(kf)
    assert f"    ? {key}\n    : 1\n" in out
    assert "    ? |-\n      a\n      b\n    : 2\n" in out
    assert load_kitfile(out) == kf


# ---------------------------------------------------------------------------------------------
# config JSON reading
# ---------------------------------------------------------------------------------------------


def test_kitfile_from_config_keeps_digests_ignores_unknown_keys_and_matches_case() -> None:
    kf = kitfile_from_config(
        b'{"manifestVersion":"1.0.0","Package":{"name":"p","future":1},'
        b'"model":{"path":"m","digest":"sha256:1","diffId":"sha256:2","parts":null},'
        b'"docs":[{"path":"README.md","digest":"sha256:3"}],"somethingNew":[1,2]}'
    )
    assert kf == Kitfile(
        manifest_version="1.0.0",
        package=Package(name="p"),
        model=Model(path="m", digest="sha256:1", diff_id="sha256:2"),
        docs=(Docs(path="README.md", digest="sha256:3"),),
    )
    assert kf.layer_entries() == [
        LayerEntry("model", "m", None, 0, "sha256:1", "sha256:2"),
        LayerEntry("docs", "README.md", None, 0, "sha256:3", ""),
    ]


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"[]", "config must be a JSON object"),
        (b"{", "not valid JSON"),
        (b'{"model":"x"}', "model must be a JSON object"),
        (b'{"code":{}}', "code must be an array"),
        (b'{"model":{"path":5}}', "model.path must be a string"),
        (b'{"package":{"authors":[1]}}', "package.authors must be an array of strings"),
        (b'{"model":{"parameters":NaN}}', "not valid JSON"),
    ],
)
def test_kitfile_from_config_errors(blob: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        kitfile_from_config(blob)


def test_config_round_trip_is_byte_exact() -> None:
    kf = load_kitfile(ROUND_TRIP_YAML)
    kf = kf.with_layer_digests([("sha256:" + "a" * 64, "sha256:" + "b" * 64)])
    blob = config_json(kf)
    assert config_json(kitfile_from_config(blob)) == blob


def test_config_round_trip_loses_what_go_loses() -> None:
    # float64 in Go: big integers round, -0 survives JSON but not YAML
    kf = kitfile_from_config(b'{"model":{"parameters":{"n":12345678901234567890,"z":-0}}}')
    assert config_json(kf).endswith(b'"parameters":{"n":12345678901234567000,"z":-0}}}')
    assert '"n": 1.2345678901234567e+19\n' in kitfile_to_yaml(kf)


# ---------------------------------------------------------------------------------------------
# Layer entries, references, paths
# ---------------------------------------------------------------------------------------------


def test_layer_entries_order_and_exclusions() -> None:
    kf = load_kitfile(
        """\
manifestVersion: 1.0.0
mcpServers:
  - name: fs
    path: fs.mcpb
prompts:
  - path: p.md
docs:
  - path: README.md
datasets:
  - name: remote
    path: data/remote
    remotePath: s3://bucket/key
    remoteHash: abc
  - name: local
    path: data/local
code:
  - path: src
model:
  name: child
  path: registry.example.com/org/base:v1
  parts:
    - name: lora
      path: ./lora/
"""
    )
    assert kf.model_reference == "registry.example.com/org/base:v1"
    entries = kf.layer_entries()
    assert [(e.kind, e.path, e.index) for e in entries] == [
        ("modelpart", "./lora/", 0),
        ("code", "src", 0),
        ("dataset", "data/local", 1),
        ("docs", "README.md", 0),
        ("prompt", "p.md", 0),
        ("mcpserver", "fs.mcpb", 0),
    ]
    assert entries[0].clean_path == "lora"
    assert entries[0].ids == ("lora", "./lora/")
    assert entries[1].ids == ("src",)
    assert entries[2].label == "datasets[1]"
    with pytest.raises(ValueError, match="6 layer entries"):
        kf.with_layer_digests([])


@pytest.mark.parametrize(
    ("path", "is_ref"),
    [
        ("model", False),
        ("models/model.gguf", False),
        ("repo:tag", True),
        ("org/repo:v1", True),
        ("localhost:5000/org/repo@sha256:" + "a" * 64, True),
        ("Repo:tag", False),
        ("a:b:c", False),
        ("s3://bucket/key", False),
        (" repo:tag", False),
    ],
)
def test_is_modelkit_reference(path: str, is_ref: bool) -> None:
    assert is_modelkit_reference(path) is is_ref


@pytest.mark.parametrize(
    ("path", "cleaned"),
    [
        ("", "."),
        (".", "."),
        ("./model/", "model"),
        ("a//b/../c", "a/c"),
        ("//x", "/x"),
        ("../a", "../a"),
    ],
)
def test_clean_path(path: str, cleaned: str) -> None:
    assert clean_path(path) == cleaned


# ---------------------------------------------------------------------------------------------
# Strictness: every error is one line naming the file, the line and the key
# ---------------------------------------------------------------------------------------------


def _error(text: str, source: str = "Kitfile") -> str:
    with pytest.raises(KitfileError) as info:
        load_kitfile(text, source)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_in_model() -> None:
    text = """\
manifestVersion: 1.0.0
package:
  name: x
model:
  name: m
  path: model
  foo: bar
"""
    assert _error(text).startswith(
        "Kitfile:7: unknown key 'foo' in model: expected one of name, path,"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "manifestVersion: 1.0.0\nkitfile_version: 1\n",
            "Kitfile:2: unknown key 'kitfile_version' at the top level: it is not part of",
        ),
        (
            "manifestVersion: 1.0.0\nmetadata:\n  name: x\n",
            "Kitfile:2: unknown key 'metadata' at the top level: it is not part of the",
        ),
        (
            "manifestVersion: 1.0.0\nconfig:\n  x: 1\n",
            "Kitfile:2: unknown key 'config' at the top level: it is not part of the",
        ),
        (
            "manifestVersion: 1.0.0\ncode:\n  - path: src\n    digest: sha256:abc\n",
            "Kitfile:4: unknown key 'digest' in code[0]: digests are not written in a Kitfile",
        ),
        (
            "manifestVersion: 1.0.0\nmodel:\n  parts:\n    - path: a\n      Type: lora\n",
            "Kitfile:5: unknown key 'Type' in model.parts[0]: keys are case-sensitive:"
            " did you mean 'type'?",
        ),
        (
            "manifestVersion: 1.0.0\npackage:\n  authors: Jane\n",
            "Kitfile:3: 'authors' in package must be a list of strings, not the string 'Jane'",
        ),
        (
            "manifestVersion: 1.0.0\nmodel:\n  - path: a\n",
            "Kitfile:3: model must be a mapping, not a list",
        ),
        (
            "manifestVersion: 1.0.0\ncode:\n  path: src\n",
            "Kitfile:3: code must be a list, not a mapping",
        ),
        (
            "manifestVersion: 1.0.0\nmodel:\n  name: {a: 1}\n",
            "Kitfile:3: 'name' in model must be a string, not a mapping",
        ),
        (
            "- just\n- a list\n",
            "Kitfile:1: the top level must be a mapping, not a list",
        ),
        (
            "manifestVersion: 1.0.0\npackage:\n  name: a\n  name: b\n",
            "Kitfile:4: mapping key 'name' already defined at line 3",
        ),
        (
            "manifestVersion: 1.0.0\nmodel:\n  path: m\n  parameters: {1: a}\n",
            "Kitfile:4: key 1 in model.parameters is not a string",
        ),
        (
            "manifestVersion: 1.0.0\nmodel:\n  path: m\n  parameters: {a: .nan}\n",
            "Kitfile:4: .nan in model.parameters cannot be written as JSON",
        ),
        (
            "manifestVersion: 1.0.0\nmodel:\n  path: m\n  parameters: &a [*a]\n",
            "Kitfile:4: an anchor's value contains itself",
        ),
        (
            "manifestVersion: 1.0.0\nmodel:\n  path: [unclosed\n",
            "Kitfile:4: invalid YAML:",
        ),
        ("", 'Kitfile: empty Kitfile (expected at least manifestVersion: "1.0.0")'),
        (
            "package:\n  name: x\n",
            'Kitfile:1: missing manifestVersion: kit requires manifestVersion: "1.0.0"',
        ),
        (
            "package:\n  name: x\nmanifestVersion: 1.0\n",
            "Kitfile:3: unsupported manifestVersion '1.0': kit requires \"1.0.0\"",
        ),
        (
            "manifestVersion: 1.0.0\nmodel:\n  path: /abs/model\n",
            "Kitfile:3: absolute path '/abs/model' in model: paths are relative to the pack",
        ),
        (
            "manifestVersion: 1.0.0\ndatasets:\n  - path: data/../../outside\n",
            "Kitfile:3: path 'data/../../outside' in datasets[0] leaves the pack context directory",
        ),
        (
            "manifestVersion: 1.0.0\nmodel:\n  path: model\n"
            "code:\n  - path: src\n  - path: ./model/\n",
            "Kitfile:6: model and code[1] use the same path 'model' (first at line 3)",
        ),
        (
            "manifestVersion: 1.0.0\nmodel:\n  parts:\n"
            "    - name: p\n      path: a\n      type: -bad\n",
            "Kitfile:6: invalid type '-bad' in model.parts[0]: use letters, digits,",
        ),
        (
            "manifestVersion: 1.0.0\nmodel:\n  parts:\n    - path: a\n      type: "
            + "x" * 65
            + "\n",
            "Kitfile:5: type in model.parts[0] is too long (at most 64 characters)",
        ),
        (
            "manifestVersion: 1.0.0\ndocs:\n  - path: https://example.com/readme\n",
            "Kitfile:3: invalid path for docs[0]: HTTP URLs are not supported in paths",
        ),
        (
            "manifestVersion: 1.0.0\ncode:\n  - path: org/repo:v1\n",
            "Kitfile:3: invalid path for code[0] (org/repo:v1): only model.path may name",
        ),
        (
            "manifestVersion: 1.0.0\nprompts:\n  - path: s3://bucket/p\n",
            "Kitfile:3: invalid path for prompts[0] (s3://bucket/p): only local paths are",
        ),
        (
            "manifestVersion: 1.0.0\ndatasets:\n  - path: d\n    remotePath: s3://b/k\n",
            "Kitfile:4: remoteHash is required with an s3:// remotePath in datasets[0]",
        ),
        (
            "manifestVersion: 1.0.0\ndatasets:\n"
            "  - path: d\n    remotePath: mybucket.s3.amazonaws.com\n",
            "Kitfile:4: invalid remotePath 'mybucket.s3.amazonaws.com' in datasets[0]",
        ),
        (
            "manifestVersion: 1.0.0\ndatasets:\n  - path: d\n    remoteHash: abc\n",
            "Kitfile:4: remoteHash in datasets[0] is only meaningful with remotePath",
        ),
        (
            "manifestVersion: 1.0.0\ndatasets:\n  - path: data/train\n    remotePath: org/ds:v1\n"
            "  - path: data/train/extra\n",
            "Kitfile:5: datasets[1] uses a path (data/train/extra) that is within the path",
        ),
        (
            "manifestVersion: 1.0.0\nmcpServers:\n  - path: fs.mcpb\n",
            "Kitfile:3: mcpServers[0] (path fs.mcpb) must have a name",
        ),
        (
            "manifestVersion: 1.0.0\nmcpServers:\n  - name: fs\n    path: fs.zip\n",
            "Kitfile:4: invalid path for mcpServers[0] (fs.zip): it must name a single .mcpb file",
        ),
        (
            "manifestVersion: 1.0.0\nmcpServers:\n"
            "  - name: fs\n    path: a.mcpb\n  - name: fs\n    path: b.mcpb\n",
            "Kitfile:5: duplicate mcpServer name 'fs' (mcpServers[0] and mcpServers[1])",
        ),
    ],
)
def test_strictness_errors(text: str, expected: str) -> None:
    assert _error(text).startswith(expected)


def test_several_problems_report_the_first_and_count_the_rest() -> None:
    message = _error(
        "manifestVersion: 2\nmodel:\n  path: /abs\ncode:\n  - path: /abs2\n", source="dir/Kitfile"
    )
    assert message == (
        "dir/Kitfile:1: unsupported manifestVersion '2': kit requires \"1.0.0\""
        " (and 2 more problems)"
    )


def test_non_utf8_input() -> None:
    with pytest.raises(KitfileError, match="Kitfile: not UTF-8 text"):
        load_kitfile(b"manifestVersion: \xff\n")


def test_validate_false_accepts_what_kit_decodes() -> None:
    kf = load_kitfile("model:\n  path: /tmp/abs\n", validate=False)
    assert kf == Kitfile(model=Model(path="/tmp/abs"))


def test_valid_kitfile_passes_everything() -> None:
    kf = load_kitfile(
        """\
manifestVersion: "1.0.0"
package:
  name: demo
  version: 1.2.3
  authors: [Jane Doe]
model:
  name: llama
  path: models/llama.gguf
  framework: llama.cpp
  parts:
    - name: tokenizer
      path: models/tokenizer.json
      type: tokenizer.v1
code:
  - path: src/../lib
datasets:
  - name: train
    path: data/train
    remotePath: s3://bucket/train
    remoteHash: sha256:abc
  - path: data/train-eval
prompts:
  - path: ./skills/personal/
mcpServers:
  - name: fs
    path: servers/fs.mcpb
"""
    )
    assert kf.package.version == "1.2.3"
    assert kf.datasets[0].remote_path == "s3://bucket/train"
    assert [e.kind for e in kf.layer_entries()] == [
        "model",
        "modelpart",
        "code",
        "dataset",
        "prompt",
        "mcpserver",
    ]
