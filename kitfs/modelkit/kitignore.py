""".kitignore matching, exactly as `kit pack` applies it.

kit does not use gitignore rules: it reads `.kitignore` with moby's
`ignorefile.ReadAll` and matches with `patternmatcher.MatchesOrParentMatches`
(the `.dockerignore` engine, github.com/moby/patternmatcher v0.6.0), see
`pkg/lib/filesystem/ignore.go` in kitops. What follows from that:

- Patterns are anchored at the context root: `*.pyc` matches `x.pyc` but not
  `a/x.pyc` (write `**/*.pyc` for that). A leading `/` is dropped.
- A pattern that matches a directory also matches everything under it
  (`models` or `models/` excludes `models/a/b`).
- `*` and `?` never cross `/`; `**` crosses any number of directories.
- `!pattern` re-includes; the last matching pattern wins.
- `Kitfile`, `kitfile`, `.kitfile` and `.kitignore` are appended after the
  user's patterns, so a `!Kitfile` cannot re-include the Kitfile.

On top of the patterns, kit drops anything that lies under another layer's
path, by plain string prefix (`ignorePaths.Matches`): `KitIgnore.excludes`.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kitfs.errors import KitfileError

IGNORE_FILE_NAME = ".kitignore"
DEFAULT_KITFILE_NAMES = ("Kitfile", "kitfile", ".kitfile")

# Go's unicode.IsSpace, which strings.TrimSpace uses (Python's str.strip() also
# strips U+001C..U+001F, which Go keeps).
_GO_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_UTF8_BOM = "\ufeff"


def go_trim_space(s: str) -> str:
    """Go's strings.TrimSpace."""
    return s.strip(_GO_SPACE)


def go_clean(path: str) -> str:
    """Go's path/filepath.Clean for slash-separated paths (Unix)."""
    if path == "":
        return "."
    rooted = path.startswith("/")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not rooted:
                parts.append("..")
            continue
        parts.append(part)
    out = "/".join(parts)
    if rooted:
        return "/" + out
    return out or "."


def go_rel(basepath: str, targpath: str) -> str | None:
    """Go's filepath.Rel on Unix; None where Go returns an error."""
    base = go_clean(basepath)
    targ = go_clean(targpath)
    if targ == base:
        return "."
    if base == ".":
        base = ""
    if base.startswith("/") != targ.startswith("/"):
        return None
    bl, tl = len(base), len(targ)
    b0 = bi = t0 = ti = 0
    while True:
        while bi < bl and base[bi] != "/":
            bi += 1
        while ti < tl and targ[ti] != "/":
            ti += 1
        if targ[t0:ti] != base[b0:bi]:
            break
        if bi < bl:
            bi += 1
        if ti < tl:
            ti += 1
        b0 = bi
        t0 = ti
    if base[b0:bi] == "..":
        return None
    if b0 != bl:
        seps = base[b0:bl].count("/")
        up = "/".join([".."] * (seps + 1))
        if t0 != tl:
            return up + "/" + targ[t0:]
        return up
    return targ[t0:]


def read_ignore_patterns(data: bytes) -> list[str]:
    """moby `ignorefile.ReadAll`: the pattern list of a `.kitignore` file's bytes."""
    text = data.decode("utf-8", "surrogateescape")
    patterns: list[str] = []
    # bufio.Scanner's ScanLines: split on \n, drop one trailing \r per line.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for index, raw in enumerate(lines):
        line = raw[:-1] if raw.endswith("\r") else raw
        if index == 0 and line.startswith(_UTF8_BOM):
            line = line[len(_UTF8_BOM) :]
        if line.startswith("#"):
            continue
        pattern = go_trim_space(line)
        if pattern == "":
            continue
        invert = pattern[0] == "!"
        if invert:
            pattern = go_trim_space(pattern[1:])
        if pattern:
            pattern = go_clean(pattern)
            if len(pattern) > 1 and pattern[0] == "/":
                pattern = pattern[1:]
        if invert:
            pattern = "!" + pattern
        patterns.append(pattern)
    return patterns


_MatchType = Literal["exact", "prefix", "suffix", "regexp"]
_ESCAPED = frozenset(".+()|{}$")


def _check_glob_syntax(pattern: str) -> None:
    """Reject what Go's filepath.Match(pattern, ".") reports as ErrBadPattern."""
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            if i + 1 >= n:
                raise ValueError("trailing backslash")
            i += 2
            continue
        if ch != "[":
            i += 1
            continue
        i += 1
        if i < n and pattern[i] == "^":
            i += 1
        ranges = 0
        while True:
            if i < n and pattern[i] == "]" and ranges > 0:
                i += 1
                break
            i = _class_char(pattern, i)
            if i < n and pattern[i] == "-":
                i = _class_char(pattern, i + 1)
            ranges += 1


def _class_char(pattern: str, i: int) -> int:
    """Go's getEsc: one (possibly escaped) character of a character class."""
    n = len(pattern)
    if i >= n or pattern[i] in "-]":
        raise ValueError("malformed character class")
    if pattern[i] == "\\":
        i += 1
        if i >= n:
            raise ValueError("trailing backslash in character class")
    return i + 1


@dataclass
class _Pattern:
    cleaned: str
    exclusion: bool
    match_type: _MatchType = "exact"
    regexp: re.Pattern[str] | None = None

    def compile(self) -> None:
        """patternmatcher's Pattern.compile, with Go's regexp turned into Python's."""
        pattern = self.cleaned
        reg = "^"
        match_type: _MatchType = "exact"
        i = 0
        pos = 0
        n = len(pattern)
        while pos < n:
            ch = pattern[pos]
            pos += 1
            if ch == "*":
                if pos < n and pattern[pos] == "*":
                    pos += 1
                    if pos < n and pattern[pos] == "/":
                        pos += 1
                    if pos >= n:
                        if match_type == "exact":
                            match_type = "prefix"
                        else:
                            reg += ".*"
                            match_type = "regexp"
                    else:
                        reg += "(.*/)?"
                        match_type = "regexp"
                    if i == 0:
                        match_type = "suffix"
                else:
                    reg += "[^/]*"
                    match_type = "regexp"
            elif ch == "?":
                reg += "[^/]"
                match_type = "regexp"
            elif ch in _ESCAPED:
                reg += "\\" + ch
            elif ch == "\\":
                if pos < n:
                    reg += "\\" + pattern[pos]
                    pos += 1
                    match_type = "regexp"
                else:
                    reg += "\\\\"
            elif ch in "[]":
                reg += ch
                match_type = "regexp"
            else:
                reg += ch
            i += 1
        self.match_type = match_type
        if match_type == "regexp":
            # Go's `$` only matches at the very end; Python's also before a final "\n".
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # "possible nested set"
                self.regexp = re.compile(reg + r"\Z")

    def match(self, path: str) -> bool:
        if self.match_type == "exact":
            return path == self.cleaned
        if self.match_type == "prefix":
            return path.startswith(self.cleaned[:-2])
        if self.match_type == "suffix":
            suffix = self.cleaned[2:]
            if path.endswith(suffix):
                return True
            return suffix[:1] == "/" and path == suffix[1:]
        assert self.regexp is not None
        return self.regexp.match(path) is not None


class KitIgnore:
    """The exclusion rules of one pack context: `.kitignore` patterns plus kit's defaults."""

    def __init__(self, patterns: Iterable[str] = (), *, extra_patterns: Iterable[str] = ()) -> None:
        """`patterns` as read from `.kitignore` (see `read_ignore_patterns`).

        `extra_patterns` go after them (e.g. a Kitfile given with a custom name);
        kit's own (`Kitfile`, `kitfile`, `.kitfile`, `.kitignore`) always come last.
        """
        all_patterns = [*patterns, *extra_patterns, *DEFAULT_KITFILE_NAMES, IGNORE_FILE_NAME]
        self.patterns: tuple[str, ...] = tuple(all_patterns)
        self._compiled: list[_Pattern] = []
        self._exclusions = False
        for raw in all_patterns:
            p = go_trim_space(raw)
            if p == "":
                continue
            p = go_clean(p)
            exclusion = False
            if p[0] == "!":
                if len(p) == 1:
                    raise KitfileError(
                        f'invalid {IGNORE_FILE_NAME} file: illegal exclusion pattern: "!"'
                    )
                exclusion = True
                p = p[1:]
                self._exclusions = True
            try:
                _check_glob_syntax(p)
                compiled = _Pattern(p, exclusion)
                compiled.compile()
            except (ValueError, re.error) as exc:
                raise KitfileError(
                    f"invalid {IGNORE_FILE_NAME} file: bad pattern {raw!r}: {exc}"
                ) from None
            self._compiled.append(compiled)

    @classmethod
    def from_context(cls, context_dir: Path, *, extra_patterns: Iterable[str] = ()) -> KitIgnore:
        """Read `<context_dir>/.kitignore` (absent means no user patterns)."""
        path = context_dir / IGNORE_FILE_NAME
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            raise KitfileError(f"failed to open {IGNORE_FILE_NAME} file: {exc}") from None
        return cls(read_ignore_patterns(data), extra_patterns=extra_patterns)

    @property
    def has_exclusions(self) -> bool:
        """True when some pattern starts with `!` (kit then walks into ignored directories)."""
        return self._exclusions

    def matches(self, path: str) -> bool:
        """patternmatcher.MatchesOrParentMatches on a cleaned, slash-separated path."""
        parent = os.path.dirname(path) or "."
        parent_dirs = parent.split("/")
        matched = False
        for pattern in self._compiled:
            if pattern.exclusion != matched:
                continue
            match = pattern.match(path)
            if not match and parent != ".":
                for i in range(len(parent_dirs)):
                    if pattern.match("/".join(parent_dirs[: i + 1])):
                        match = True
                        break
            if match:
                matched = not pattern.exclusion
        return matched

    def excludes(self, path: str, layer_path: str, layer_paths: Sequence[str]) -> bool:
        """kit's `ignorePaths.Matches`: is `path` left out of the layer at `layer_path`?

        True when the patterns match it, or when it lies under another layer's
        path. As in kit, "under" is a plain string prefix (`models2/x` is under
        `models`), and layers whose path is a prefix of `layer_path` (the layer
        itself, its parents) are skipped.
        """
        path = go_clean(go_trim_space(path))
        layer_path = go_clean(go_trim_space(layer_path))
        if self.matches(path):
            return True
        for layer in layer_paths:
            layer = go_clean(go_trim_space(layer))
            if layer_path.startswith(layer):
                continue
            if path.startswith(layer):
                return True
        return False
