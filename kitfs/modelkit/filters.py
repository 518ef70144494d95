"""`kit unpack --filter` semantics, so a mount shows exactly what unpack would write.

A filter is `<type>[,<type>...][:<id>[,<id>...]]` (pkg/cmd/unpack/filter.go):
types are `kitfile`, `model`, `datasets`, `code`, `docs` (and `prompts` in
newer kit); ids match an entry's `name` or its path exactly as written in the
Kitfile. `model` also covers model parts. A layer is kept when any filter
matches it; no filters keeps everything.
"""

from __future__ import annotations

from dataclasses import dataclass

from kitfs.errors import UsageError

_FILTER_TYPES = {
    "kitfile": "kitfile",
    "model": "model",
    "datasets": "dataset",
    "code": "code",
    "docs": "docs",
    "prompts": "prompt",
}


@dataclass(frozen=True)
class Filter:
    kinds: frozenset[str]
    ids: frozenset[str]

    def matches(self, kind: str, name: str | None, path: str | None) -> bool:
        if kind == "modelpart":
            kind = "model"
        if kind not in self.kinds:
            return False
        if not self.ids:
            return True
        return (name is not None and name in self.ids) or (path is not None and path in self.ids)


def parse_filter(text: str) -> Filter:
    parts = text.split(":")
    if len(parts) > 2:
        raise UsageError(
            f"invalid filter {text!r}: use <type1>,<type2>[:<name-or-path1>,<name-or-path2>]"
        )
    kinds = set()
    for word in parts[0].split(","):
        kind = _FILTER_TYPES.get(word.strip())
        if kind is None:
            raise UsageError(
                f"invalid filter type {word!r} in {text!r} "
                "(must be one of kitfile, model, datasets, code, docs, prompts)"
            )
        kinds.add(kind)
    ids = frozenset(p for p in parts[1].split(",") if p) if len(parts) == 2 else frozenset()
    return Filter(frozenset(kinds), ids)


@dataclass(frozen=True)
class FilterSet:
    """The filters given on one command line; empty means everything."""

    filters: tuple[Filter, ...] = ()

    @classmethod
    def parse(cls, texts: list[str] | tuple[str, ...] | None) -> FilterSet:
        return cls(tuple(parse_filter(t) for t in texts or ()))

    def keeps_layer(self, kind: str, name: str | None, path: str | None) -> bool:
        return not self.filters or any(f.matches(kind, name, path) for f in self.filters)

    def keeps_kitfile(self) -> bool:
        return not self.filters or any("kitfile" in f.kinds for f in self.filters)
