"""Single flight: one fetch, chunk-file read or header read per key at a time, awaited by all.

The kernel asks for a chunk's two halves at once, prefetch and readahead
want it too, and a random reader's neighbours share its blocks: whoever
comes first starts the flight, everyone else waits for its landing. One
table type serves every such place in the engine (chunks being fetched,
chunk files being read, safetensors headers being read).

Invariants of a `Flights` table:
- a key is in the table exactly while its flight is in progress: `start`
  puts it there; `land` and `abort` take it out and wake every waiter in the
  same step, so nobody can join a flight that already ended;
- a flight ends once: with a value (which may be None: "not found"), or
  with the error every waiter then raises;
- `drop` takes a flight out without ending it, only for its owner, which
  then ends it itself (a waiter must never sleep on a flight nobody ends).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

import trio

from kitfs.errors import KitfsError

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Flight(Generic[T]):
    __slots__ = ("error", "event", "value")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: T | None = None
        self.error: KitfsError | None = None

    @property
    def ended(self) -> bool:
        return self.event.is_set()

    def end(self, value: T | None, error: KitfsError | None = None) -> None:
        self.value, self.error = value, error
        self.event.set()

    async def wait(self) -> T | None:
        """Its value once it ended, or None; its error is left for `result`."""
        await self.event.wait()
        return self.value

    async def result(self) -> T:
        """Its value once it ended; its error raised. Only for flights that land a value."""
        await self.event.wait()
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value


class Flights(Generic[K, T]):
    def __init__(self) -> None:
        self._table: dict[K, Flight[T]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._table

    def __len__(self) -> int:
        return len(self._table)

    def get(self, key: K) -> Flight[T] | None:
        return self._table.get(key)

    def pending(self) -> list[K]:
        """The keys of the flights in progress (a copy: ending them while iterating is fine)."""
        return list(self._table)

    def start(self, key: K) -> Flight[T]:
        """A new flight for `key`, which must have none in progress."""
        assert key not in self._table, key
        flight = self._table[key] = Flight()
        return flight

    def joined(self, key: K) -> Flight[T]:
        """The flight in progress for `key`, or a new one."""
        return self._table.get(key) or self.start(key)

    def land(self, key: K, value: T | None) -> None:
        """End `key`'s flight, if one is in progress, with `value`."""
        flight = self._table.pop(key, None)
        if flight is not None:
            flight.end(value)

    def abort(self, key: K, error: KitfsError) -> None:
        """End `key`'s flight, if one is in progress, with `error` for every waiter."""
        flight = self._table.pop(key, None)
        if flight is not None:
            flight.end(None, error)

    def drop(self, key: K, flight: Flight[T]) -> None:
        """Take `flight` out of the table if it is still there (its owner ends it)."""
        if self._table.get(key) is flight:
            del self._table[key]
