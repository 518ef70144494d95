"""JSON bytes the way Go's encoding/json writes them.

cosign's payloads and signature manifests are Go `json.Marshal` output; kitfs
writes the same bytes so that what it signs and pushes is what cosign would
have, byte for byte (struct field order is kept by passing dicts in that order).
"""

from __future__ import annotations

import json
from typing import Any

# Go escapes these even inside strings that need no escaping in JSON (HTML safety).
_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028",
               "\u2029": "\\u2029"}


def go_json(value: Any) -> bytes:
    """Compact JSON, non-ASCII kept as UTF-8, with Go's extra escapes; dict order is kept."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in _GO_ESCAPES.items():
        text = text.replace(char, escaped)
    return text.encode()
