"""When to try a registry request again, and how long to wait first.

Registries shed load with 429 and 503 and drop connections when they restart;
a mount must ride that out without hammering them and without waiting
forever. One `RetryBudget` per call bounds the total time spent waiting, and
tighter windows bound the failures that seldom pass by themselves: a refused
connection and a server error. Those are reported, naming what the registry
said, while the reader that asked is still waiting for an answer; retried for
a reader's whole deadline, all the reader could be told was that it ran out.
"""

from __future__ import annotations

import email.utils
import random
import time

import trio

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

_FIRST_DELAY = 0.1
_MAX_DELAY = 8.0
_ATTEMPT_ROOM = 1.0
"""Seconds an attempt needs before its caller's deadline to be worth starting."""


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class RetryBudget:
    """Jittered exponential backoff that stops once `budget` seconds are spent.

    Connection errors stop after `connect_window` and server errors (5xx, 408)
    after `server_window`, both counted from the start and capped by `budget`.
    The caller's own deadline (the enclosing cancel scope's, such as a
    reader's bound) counts too: an attempt that could not get an answer before
    it is not started, so the caller hears what the registry said rather than
    its own timeout.
    """

    def __init__(
        self, budget: float, connect_window: float, server_window: float | None = None
    ) -> None:
        now = trio.current_time()
        budget = max(0.0, budget)
        self._deadline = now + budget
        self._connect_deadline = now + max(0.0, min(budget, connect_window))
        self._server_deadline = now + (
            budget if server_window is None else max(0.0, min(budget, server_window))
        )
        self._attempt = 0
        self.retries = 0

    def _next_delay(self, hint: float | None) -> float:
        base = min(_MAX_DELAY, _FIRST_DELAY * (2**self._attempt))
        self._attempt += 1
        # "Full jitter" keeps many readers that failed together from retrying together.
        delay = random.uniform(base / 2, base)
        if hint is not None:
            delay = max(delay, hint)
        return delay

    async def wait(
        self,
        *,
        retry_after: float | None = None,
        connect_error: bool = False,
        server_error: bool = False,
    ) -> bool:
        """Sleep before the next attempt; False (without sleeping) when the budget is spent."""
        delay = self._next_delay(retry_after)
        if connect_error:
            deadline = self._connect_deadline
        elif server_error:
            deadline = self._server_deadline
        else:
            deadline = self._deadline
        deadline = min(deadline, trio.current_effective_deadline() - _ATTEMPT_ROOM)
        if trio.current_time() + delay > deadline:
            remaining = deadline - trio.current_time()
            # A server asking for more than we have left is not worth waiting for;
            # a plain backoff step is shortened to fit the budget.
            if retry_after is not None or remaining < 0.01:
                return False
            delay = remaining
        await trio.sleep(delay)
        self.retries += 1
        return True
