"""Layer planning and .kitignore matching, checked against what `kit pack` does.

The expected entry lists below were confirmed byte for byte against a Go
program that runs kit's `writeLayerToTar` logic (filepath.Walk, sameDirTree,
moby/patternmatcher v0.6.0, archive/tar) over the same tree.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from kitfs.errors import KitfileError
from kitfs.modelkit.kitignore import (
    KitIgnore,
    go_clean,
    go_rel,
    read_ignore_patterns,
)
from kitfs.modelkit.layers import PlannedEntry, plan_layer

KITIGNORE = (
    b"\xef\xbb\xbf# comment\n"
    b"*.pyc\n"
    b"**/*.tmp\n"
    b"models/cache/\n"
    b"!models/cache/keep.txt\n"
    b"/models/secret\r\n"
    b"models/sub/ignored?.bin\n"
)
LONG_NAME = "L" * 150
DEEP_DIR = "/".join(["d" * 40] * 6)
DEEP_FILE = f"{DEEP_DIR}/{'f' * 50}"  # a 307-character path under models/


def make_tree(root: Path) -> Path:
    """A pack context with every case the layer rules care about; modes set explicitly."""
    files: dict[str, tuple[bytes, int]] = {
        "Kitfile": (b"manifestVersion: 1.0.0\n", 0o644),
        ".kitignore": (KITIGNORE, 0o644),
        "x.pyc": (b"", 0o644),
        "models/Kitfile": (b"only the root Kitfile is excluded", 0o644),
        "models/a.txt": (b"hello\n", 0o644),
        "models/x.pyc": (b"root-anchored pattern: kept", 0o644),
        "models/deep/y.tmp": (b"tmp", 0o644),
        "models/cache/drop.bin": (b"drop", 0o644),
        "models/cache/keep.txt": (b"keep", 0o644),
        "models/secret": (b"s", 0o644),
        "models/sub/ignored1.bin": (b"i", 0o644),
        "models/sub/ignored12.bin": (b"kept", 0o644),
        "models/empty": (b"", 0o644),
        "models/block512": (b"b" * 512, 0o644),
        "models/block513": (b"c" * 513, 0o600),
        "models/exec.sh": (b"#!/bin/sh\n", 0o755),
        "models/setuid": (b"u", 0o4755),
        "models/v1..2/inside": (b"dropped by kit", 0o644),
        "models/a..b.bin": (b"dropped by kit", 0o644),
        "models/odd name #1 [x] {y} (z) $v +w.txt": (b"odd", 0o644),
        "models/ünïcödé/ファイル.txt": (b"unicode", 0o644),
        f"models/{LONG_NAME}": (b"150-character name", 0o644),
        f"models/{'m' * 94}": (b"101-character path", 0o644),
        f"models/{DEEP_FILE}": (b"307-character path", 0o644),
        "models/nested/inner.bin": (b"belongs to another layer", 0o644),
        "models2/x": (b"string-prefix of another layer", 0o644),
        "data/train.csv": (b"a,b\n1,2\n", 0o644),
    }
    dirs = {"models/emptydir": 0o755, "models/sticky": 0o1777, f"models/{'D' * 120}": 0o750}
    root.mkdir(parents=True, exist_ok=True)
    for rel, (data, mode) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
    for rel, mode in dirs.items():
        (root / rel).mkdir(parents=True, exist_ok=True)
        (root / rel).chmod(mode)
    (root / "models" / "link").symlink_to("a.txt")
    (root / "models" / "dirlink").symlink_to("../data")
    os.mkfifo(root / "models" / "fifo")
    for dirpath, _dirnames, _files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel in dirs:
            continue
        os.chmod(dirpath, 0o755)
    return root


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "ctx")


OTHER_LAYERS = ["models", "models/nested", "data"]


def _names(entries: list[PlannedEntry]) -> list[str]:
    return [e.name for e in entries]


def test_plan_models_layer_matches_kit(ctx: Path, caplog: pytest.LogCaptureFixture) -> None:
    ignore = KitIgnore.from_context(ctx)
    with caplog.at_level(logging.WARNING):
        entries = plan_layer(ctx, "./models/", OTHER_LAYERS, ignore)
    deep_dirs = ["models/" + "/".join(["d" * 40] * i) for i in range(1, 7)]
    assert _names(entries) == [
        "models",
        f"models/{'D' * 120}",
        "models/Kitfile",
        f"models/{LONG_NAME}",
        "models/a.txt",  # models/a..b.bin, before it, is dropped by kit's ".." check
        "models/block512",
        "models/block513",
        "models/cache/keep.txt",  # dir ignored, file re-included: no "models/cache" entry
        *deep_dirs,
        f"models/{DEEP_FILE}",
        "models/deep",  # y.tmp excluded by **/*.tmp
        "models/empty",
        "models/emptydir",
        "models/exec.sh",
        f"models/{'m' * 94}",
        "models/odd name #1 [x] {y} (z) $v +w.txt",
        "models/setuid",
        "models/sticky",
        "models/sub",
        "models/sub/ignored12.bin",  # ? matches exactly one character
        "models/x.pyc",  # *.pyc is anchored at the root
        "models/ünïcödé",
        "models/ünïcödé/ファイル.txt",
    ]
    by_name = {e.name: e for e in entries}
    assert by_name["models/setuid"].mode == 0o4755
    assert by_name["models/sticky"].mode == 0o1777
    assert by_name["models/block513"].mode == 0o600
    assert by_name[f"models/{'D' * 120}"].mode == 0o750
    assert by_name["models/block513"].size == 513
    assert by_name["models"].size == 0 and by_name["models"].kind == "dir"
    assert by_name["models/a.txt"].source == ctx / "models" / "a.txt"
    assert by_name["models/a.txt"].size == 6
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "symlink models/link" in messages and "models/fifo" in messages
    assert "models/v1..2" in messages and "models/a..b.bin" in messages


def test_plan_order_is_bytewise_walk_order(ctx: Path) -> None:
    names = _names(plan_layer(ctx, "models", OTHER_LAYERS, KitIgnore.from_context(ctx)))
    # A directory comes before its contents and sorting is per directory, by bytes:
    # "models/D..." < "models/Kitfile" < "models/a.txt" (uppercase first), and
    # "models/d.../..." (a directory's contents) before "models/deep".
    assert names.index("models/sub") < names.index("models/sub/ignored12.bin")
    assert names.index(f"models/{'D' * 120}") < names.index("models/Kitfile")
    assert names.index("models/Kitfile") < names.index("models/a.txt")
    assert names.index(f"models/{DEEP_FILE}") < names.index("models/deep")


def test_plan_excludes_other_layers_and_kit_files(ctx: Path) -> None:
    names = _names(plan_layer(ctx, "models", OTHER_LAYERS, KitIgnore.from_context(ctx)))
    assert not any(n.startswith("models/nested") for n in names)
    assert "Kitfile" not in names and ".kitignore" not in names
    for dropped in ("models/secret", "models/cache", "models/cache/drop.bin", "models/deep/y.tmp"):
        assert dropped not in names
    for skipped in ("models/link", "models/dirlink", "models/fifo", "models/v1..2/inside"):
        assert skipped not in names


def test_plan_nested_layer_gets_its_ancestors(ctx: Path) -> None:
    entries = plan_layer(ctx, "models/nested", OTHER_LAYERS, KitIgnore.from_context(ctx))
    assert [(e.name, e.kind) for e in entries] == [
        ("models", "dir"),
        ("models/nested", "dir"),
        ("models/nested/inner.bin", "file"),
    ]


def test_plan_single_file_layer(ctx: Path) -> None:
    entries = plan_layer(ctx, f"models/{DEEP_FILE}", ["models"], KitIgnore.from_context(ctx))
    assert _names(entries) == [
        "models",
        *("models/" + "/".join(["d" * 40] * i) for i in range(1, 7)),
        f"models/{DEEP_FILE}",
    ]
    assert entries[-1].kind == "file" and entries[-1].size == len(b"307-character path")


def test_plan_whole_context(ctx: Path) -> None:
    names = _names(plan_layer(ctx, ".", [], KitIgnore.from_context(ctx)))
    assert "Kitfile" not in names and ".kitignore" not in names and "x.pyc" not in names
    assert names[:3] == ["data", "data/train.csv", "models"]
    assert "models2" in names and "models/nested/inner.bin" in names
    # With the Kitfile's other layers, the "." layer keeps only what no other layer has,
    # by string prefix: models2/ goes with "models".
    names = _names(plan_layer(ctx, ".", ["models", "data", "."], KitIgnore.from_context(ctx)))
    assert names == []


def test_plan_string_prefix_quirk(ctx: Path) -> None:
    # kit compares layer paths as strings: "models2/x" counts as under layer "models".
    names = _names(plan_layer(ctx, "models2", ["models", "models2"], KitIgnore.from_context(ctx)))
    assert names == ["models2", "models2/x"]
    names = _names(plan_layer(ctx, "data", ["models", "data"], KitIgnore.from_context(ctx)))
    assert names == ["data", "data/train.csv"]


def test_plan_missing_path(ctx: Path) -> None:
    with pytest.raises(KitfileError, match="no/such/dir"):
        plan_layer(ctx, "no/such/dir", [], KitIgnore())


@pytest.mark.parametrize("bad", ["../outside", "/etc", "models/../../x"])
def test_plan_path_outside_context(ctx: Path, bad: str) -> None:
    with pytest.raises(KitfileError):
        plan_layer(ctx, bad, [], KitIgnore())


def test_plan_ignored_layer_path_warns(ctx: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        entries = plan_layer(ctx, "models/secret", [], KitIgnore.from_context(ctx))
    assert _names(entries) == ["models"]
    assert any("ignored by .kitignore" in r.getMessage() for r in caplog.records)


# --- .kitignore ------------------------------------------------------------------------


def test_read_ignore_patterns() -> None:
    data = b"\xef\xbb\xbf# c\n  # not a comment \n\n/abs/path/\n!  neg/dir/ \r\nx/./y/../z\n*.pyc\n"
    assert read_ignore_patterns(data) == [
        "# not a comment",
        "abs/path",
        "!neg/dir",
        "x/z",
        "*.pyc",
    ]


# kitops pkg/lib/filesystem/ignore_test.go: (patterns, layer paths, path, layer path, ignored)
KIT_IGNORE_TABLE = [
    (["dir1"], [], "dir1/subdir1/subdir2/file.txt", "", True),
    (["dir1/*.txt"], [], "dir1/testfile.txt", "", True),
    (["**/testfile.txt"], [], "dir1/subdir1/subdir2/testfile.txt", "", True),
    (["dir1", "!dir1/testfile.txt"], [], "dir1/testfile.txt", "", False),
    ([], ["main", "main/subdir"], "main/subdir/testfile.txt", "main", True),
    ([], ["main", "main/subdir"], "main/subdir/testfile.txt", "main/subdir", False),
    (["**/testfile.txt"], ["main", "main/subdir"], "main/subdir/testfile.txt", "main/subdir", True),
]


@pytest.mark.parametrize(("patterns", "layers", "path", "layer", "ignored"), KIT_IGNORE_TABLE)
def test_kit_ignore_table(
    patterns: list[str], layers: list[str], path: str, layer: str, ignored: bool
) -> None:
    assert KitIgnore(patterns).excludes(path, layer, layers) is ignored


@pytest.mark.parametrize(
    ("pattern", "path", "matched"),
    [
        ("*.pyc", "a.pyc", True),
        ("*.pyc", "d/a.pyc", False),  # anchored at the root, unlike gitignore
        ("**/*.pyc", "d/e/a.pyc", True),
        ("**/*.pyc", "a.pyc", True),
        ("d/**", "d/e/f", True),
        ("d/**", "dx", False),
        ("**/cache", "a/b/cache/x", True),
        ("**/cache", "cache", True),
        ("**/cache", "acache", False),
        ("a?c", "abc", True),
        ("a?c", "a/c", False),
        ("[a-c]x", "bx", True),
        ("[^a-c]x", "bx", False),
        ("a\\*b", "a*b", True),
        ("a\\*b", "axb", False),
        ("f.txt", "fxtxt", False),  # "." is literal
        ("dir/", "dir/file", True),  # trailing slash cleaned: matches the dir and below
        ("a/*/c", "a/b/c/d", True),  # a parent matches
        ("a*", "a\nb", True),  # [^/]* crosses a newline in Go's regexp too
        ("a", "a\n", False),  # Go's $ is the very end of the text
        ("a?", "a\n", True),
    ],
)
def test_pattern_semantics(pattern: str, path: str, matched: bool) -> None:
    ignore = KitIgnore([pattern])
    assert ignore.matches(path) is matched


def test_default_patterns_come_last() -> None:
    ignore = KitIgnore(["!Kitfile", "!.kitignore"])
    assert ignore.matches("Kitfile") and ignore.matches(".kitignore")
    assert ignore.matches(".kitfile") and ignore.matches("kitfile")
    assert not ignore.matches("models/Kitfile")
    assert ignore.has_exclusions


def test_last_matching_pattern_wins() -> None:
    ignore = KitIgnore(["data", "!data/keep", "data/keep/drop"])
    assert ignore.matches("data/x")
    assert not ignore.matches("data/keep/y")
    assert ignore.matches("data/keep/drop")
    assert not KitIgnore(["data"]).has_exclusions


@pytest.mark.parametrize("bad", ["!", "[", "a[", "[]", "x\\", "[a-]", "[z"])
def test_bad_patterns_are_kitfile_errors(bad: str) -> None:
    with pytest.raises(KitfileError, match="kitignore"):
        KitIgnore([bad])


def test_go_path_helpers() -> None:
    assert go_clean("./a//b/./c/") == "a/b/c"
    assert go_clean("") == "."
    assert go_clean("a/../..") == ".."
    assert go_clean("//x/../y") == "/y"
    assert go_rel("a/b", "a/b/c") == "c"
    assert go_rel("a/b/c", "a") == "../.."
    assert go_rel("a/b", "a/c") == "../c"
    assert go_rel(".", "x") == "x"
    assert go_rel("x", ".") == "../."  # sic: Go's filepath.Rel("x", ".")
    assert go_rel("a", "a") == "."
    assert go_rel("/a", "b") is None


def test_symlinked_layer_path_is_not_followed(ctx: Path, caplog: pytest.LogCaptureFixture) -> None:
    # os.Stat says it exists, but filepath.Walk only Lstat()s: kit packs no content.
    (ctx / "models" / "alias").symlink_to("sub")
    with caplog.at_level(logging.WARNING):
        entries = plan_layer(ctx, "models/alias", [], KitIgnore.from_context(ctx))
    assert _names(entries) == ["models"]
    assert any("symlink models/alias" in r.getMessage() for r in caplog.records)
    with pytest.raises(KitfileError, match="neither a file nor a directory"):
        plan_layer(ctx, "models/fifo", [], KitIgnore())
