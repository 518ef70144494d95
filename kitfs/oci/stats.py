"""What one registry client has seen: requests by outcome, bytes received, last success
and last failure.

Kept per client, in this package, so that every consumer (a mount's state file, its
metrics, its health) reads the same numbers without the oci layer knowing any of them.
A request is counted once, when its answer is final (retries and auth challenges
inside it are not separate requests); its outcome says what an operator alerts on:
the registry answered (`ok`), refused (`client_error`, 4xx), failed (`server_error`,
5xx), said nothing in time (`timeout`), or could not be reached or dropped the
connection (`connection_error`).

`answering` is what health asks: whether the registry's latest answer came
at all and was not a server error. A client error leaves it answering: a 404
is often expected (kitfs asks for optional tables of contents and tags), and
a refusal is reported to the reader that asked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from kitfs.errors import UnreachableError

Outcome = Literal["ok", "client_error", "server_error", "timeout", "connection_error"]
OUTCOMES: tuple[Outcome, ...] = (
    "ok", "client_error", "server_error", "timeout", "connection_error",
)
_TRANSPORT = (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, OSError)


@dataclass
class RequestStats:
    registry: str
    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    bytes_received: int = 0
    last_success: float | None = None  # Unix time
    last_failure: float | None = None
    last_outcome: Outcome | None = None
    last_error: str | None = None
    answering: bool | None = None  # None: nothing asked yet
    # Mirrors (hosts.toml; oci/mirrors.py): reads a mirror did not serve and the next host
    # did; of them, ranges a mirror answered with the whole blob (a pull-through cache
    # that had not cached it: the body is not read); and blobs whose bytes a mirror got
    # wrong (refused: the next host serves them).
    mirror_fallbacks: int = 0
    mirror_full_answers: int = 0
    mirror_bad_blobs: int = 0
    mirrors: list[RequestStats] = field(default_factory=list)
    """Each mirror's own requests (its `registry` is the mirror's host)."""

    def succeeded(self) -> None:
        self.requests["ok"] += 1
        self.last_success = time.time()
        self.last_outcome = "ok"
        self.answering = True

    def failed(self, outcome: Outcome, message: str) -> None:
        self.requests[outcome] += 1
        self.last_failure = time.time()
        self.last_outcome = outcome
        self.last_error = message
        self.answering = outcome == "client_error"

    def received(self, n: int) -> None:
        self.bytes_received += n

    @property
    def failing(self) -> bool:
        """The last request got no answer, or a server error, and none was answered since."""
        return self.answering is False

    def to_json(self) -> dict[str, Any]:
        return {
            "registry": self.registry, "requests": dict(self.requests),
            "bytes_received": self.bytes_received, "last_success": self.last_success,
            "last_failure": self.last_failure, "last_outcome": self.last_outcome,
            "last_error": self.last_error, "answering": self.answering,
            "mirror_fallbacks": self.mirror_fallbacks,
            "mirror_full_answers": self.mirror_full_answers,
            "mirror_bad_blobs": self.mirror_bad_blobs,
            **({"mirrors": [m.to_json() for m in self.mirrors]} if self.mirrors else {}),
        }


def outcome_of(exc: BaseException, status: int | None) -> Outcome:
    """The outcome of a request that raised `exc` (a kitfs error, its transport cause
    chained), `status` being the last HTTP status it got, if any."""
    current: BaseException | None = exc
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, httpx.TimeoutException):
            return "timeout"
        if isinstance(current, _TRANSPORT):
            return "connection_error"
        current = current.__cause__
    if isinstance(exc, UnreachableError):
        return "connection_error"
    if status is not None and status >= 500:
        return "server_error"
    return "client_error"
