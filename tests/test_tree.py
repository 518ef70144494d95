"""The tree a ModelKit unpacks to: placement, legacy layouts, and refusal of unsafe paths."""

from __future__ import annotations

import pytest

from kitfs.errors import FormatError
from kitfs.modelkit.toc import TocEntry
from kitfs.modelkit.tree import Placement, build_tree


def f(name: str, size: int, offset: int, mode: int = 0o644) -> TocEntry:
    return TocEntry(name, "file", mode, size, offset)


def d(name: str, mode: int = 0o755) -> TocEntry:
    return TocEntry(name, "dir", mode)


def test_modern_layers_land_at_their_names() -> None:
    model = Placement("sha256:aa", (d("model"), f("model/w.safetensors", 10, 1024),
                                   f("model/config.json", 3, 2048, 0o600)))
    docs = Placement("sha256:bb", (f("README.md", 5, 512),))
    tree = build_tree([model, docs], b"manifestVersion: 1.0.0\n")
    assert [n.path for n in tree.walk()] == [
        "Kitfile", "README.md", "model", "model/config.json", "model/w.safetensors"]
    w = tree.nodes["model/w.safetensors"]
    assert (w.layer, w.offset, w.size) == ("sha256:aa", 1024, 10)
    assert tree.nodes["model/config.json"].mode == 0o600
    assert tree.nodes["Kitfile"].inline == b"manifestVersion: 1.0.0\n"
    assert tree.total_size == 10 + 3 + 5 + 23


def test_legacy_layers_root_at_parent_of_path_and_dirs_are_implied() -> None:
    tree = build_tree([Placement("sha256:cc", (f("bert.pkl", 4, 512),), prefix="models")], None)
    assert tree.nodes["models"].kind == "dir"
    assert tree.nodes["models/bert.pkl"].size == 4
    assert "Kitfile" not in tree.nodes


@pytest.mark.parametrize("bad", ["../etc/passwd", "/abs/file", "a/../../b"])
def test_unsafe_paths_are_refused(bad: str) -> None:
    with pytest.raises(FormatError):
        build_tree([Placement("sha256:dd", (f(bad, 1, 0),))], None)


def test_file_directory_clash_is_an_error() -> None:
    with pytest.raises(FormatError, match="both"):
        build_tree([Placement("sha256:ee", (f("a", 1, 0), f("a/b", 1, 512)))], None)
