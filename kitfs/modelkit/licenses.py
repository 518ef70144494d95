"""Which license a LICENSE file holds, for `kitfs init` (kit init fills the Kitfile's license).

kit (pkg/lib/kitfile/generate: detectLicense) runs google/licensecheck over
the file and takes the SPDX id of the only license it matches; several
matches, or none, leave the license empty. licensecheck matches hundreds of
license texts word by word; this recognises the licenses models and code
are usually published under by the phrases that set each apart, and gives
the ids licensecheck gives them (licensecheck's `licenses/*.lre` names).
A text that matches none of them, or more than one, names no license: kit's
answer for a text it cannot place.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_SPACE = re.compile(r"\s+")


def _all(*phrases: str) -> Callable[[str], bool]:
    return lambda text: all(p in text for p in phrases)


def _gpl_family(text: str) -> str | None:
    """One of the GNU licenses: each quotes the others' names, so the title decides."""
    if "gnu affero general public license" in text:
        return "AGPL-3.0" if "version 3" in text else None
    if "gnu lesser general public license" in text:
        if "version 3" in text:
            return "LGPL-3.0"
        return "LGPL-2.1" if "version 2.1" in text else None
    if "gnu library general public license" in text:
        return "LGPL-2.0"
    if "gnu general public license" in text:
        if "version 3, 29 june 2007" in text:
            return "GPL-3.0"
        return "GPL-2.0" if "version 2, june 1991" in text else None
    return None


def _bsd(text: str) -> str | None:
    if "redistribution and use in source and binary forms" not in text:
        return None
    return "BSD-3-Clause" if "neither the name" in text else "BSD-2-Clause"


_RULES: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("Apache-2.0", _all("apache license", "version 2.0")),
    ("MIT", _all("permission is hereby granted, free of charge, to any person obtaining a copy")),
    ("ISC", _all("permission to use, copy, modify, and/or distribute this software for any "
                 "purpose with or without fee is hereby granted")),
    ("MPL-2.0", lambda t: "mozilla public license version 2.0" in t
     or "mozilla public license, v. 2.0" in t),
    ("Unlicense", _all("this is free and unencumbered software released into the public domain")),
    ("CC0-1.0", _all("cc0 1.0 universal")),
    ("CC-BY-4.0", _all("attribution 4.0 international", "creative commons")),
)


def detect_license(text: str) -> str:
    """The SPDX id of the one license `text` holds, or "" (none recognised, or several)."""
    flat = _SPACE.sub(" ", text).lower()
    found = {name for name, matches in _RULES if matches(flat)}
    for family in (_gpl_family, _bsd):
        name = family(flat)
        if name is not None:
            found.add(name)
    return found.pop() if len(found) == 1 else ""
