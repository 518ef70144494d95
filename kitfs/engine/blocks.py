"""Partial chunks: a random reader's part of a chunk, fetched and checked block by block.

Layers `kitfs pack` wrote carry a digest for every 256 KiB block of each
chunk. A reader that wants a few hundred KiB of a chunk no readahead or
prefetch brings whole (one tensor of a random reader, the kernel reading on
past its end) fetches just the blocks its read falls in; they gather in a
`Partial` until all of the chunk is there, when it is checked whole and
kept like a fetched chunk. A `Claim` is the blocks one request fetches.

Invariants of a Partial:
- a block is in `have` only once it matched its digest, and is never
  taken out (its bytes in `buffer` never change after that);
- a block is in `flights` while one fetch holds it, until that fetch's claim
  is released; the event is set once the chunk's claimed blocks have all
  landed or the fetch ended, whether or not they arrived (a waiter then
  looks at `have` and `bad` again);
- a block in `bad` arrived wrong: the next reader of it fails with that
  error and clears it, so the read after fetches the block again;
- `completing` is True while the whole-chunk check runs: nobody claims its
  blocks again meanwhile; `completed` is set once that check has ended, with
  `checked` the chunk if it passed, so a reader that finds the check running
  waits for its outcome instead of racing it (and is served from it even
  where neither memory nor disk keeps the chunk).

Invariants of a Claim: every (chunk, block) in `wanted` is in its partial's
`flights` with the chunk's event in `events`, from `add` until its fetch
ends them all; `wanted` is in blob order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import trio

from kitfs.cache.fileformat import new_frame_buffer
from kitfs.engine.geometry import Chunk
from kitfs.errors import IntegrityError


def blocks_of(block_size: int, lo: int, hi: int) -> range:
    """The blocks bytes [lo, hi) of a chunk fall in."""
    return range(lo // block_size, (hi - 1) // block_size + 1)


class Partial:
    __slots__ = ("bad", "buffer", "checked", "completed", "completing", "flights", "have")

    def __init__(self, size: int) -> None:
        self.buffer = new_frame_buffer(size)  # kept with O_DIRECT once whole
        self.have: set[int] = set()
        self.flights: dict[int, trio.Event] = {}
        self.completing = False
        self.completed = trio.Event()  # set when the whole-chunk check has ended
        self.checked: memoryview | None = None  # the chunk, if that check passed
        self.bad: dict[int, IntegrityError] = {}

    def has(self, blocks: Iterable[int]) -> bool:
        return all(b in self.have for b in blocks)

    def whole(self, block_size: int) -> bool:
        return len(self.have) * block_size >= len(self.buffer)


class Claim:
    __slots__ = ("events", "owners", "wanted")

    def __init__(self) -> None:
        self.wanted: list[tuple[int, int]] = []
        self.events: dict[int, trio.Event] = {}
        self.owners: dict[int, Partial] = {}

    def add(self, index: int, gathered: Partial, blocks: Iterable[int]) -> None:
        """Claim the blocks of chunk `index` that nobody has or fetches: in flight from
        here on, until `release` ends them."""
        mine = [b for b in blocks if b not in gathered.have and b not in gathered.flights]
        if not mine:
            return
        done = self.events.setdefault(index, trio.Event())
        self.owners[index] = gathered
        for b in mine:
            gathered.flights[b] = done
        self.wanted.extend((index, b) for b in mine)

    def release(self) -> None:
        """End every flight of this claim (its fetch is over, whatever happened)."""
        for index, b in self.wanted:
            self.owners[index].flights.pop(b, None)
        for done in self.events.values():
            done.set()

    def runs(self, chunks: Sequence[Chunk], block_size: int) -> list[list[tuple[int, int]]]:
        """The claimed blocks in runs adjacent in the blob (one range request each), across
        chunk boundaries too."""
        runs: list[list[tuple[int, int]]] = []
        run_end = -1
        for index, b in self.wanted:
            start = chunks[index].blob_offset + b * block_size
            if runs and start == run_end:
                runs[-1].append((index, b))
            else:
                runs.append([(index, b)])
            run_end = start + min(block_size, chunks[index].size - b * block_size)
        return runs


#: Chunks being gathered block by block at once (a random reader's edges); beyond
#: this the least recently used one with nothing in flight is dropped.
MAX_PARTIALS = 16


class Partials:
    """The chunks being gathered, by (layer, chunk), least recently used first.

    Bounded by MAX_PARTIALS idle entries: one with blocks in flight or being
    completed is never dropped (its fetch or check still writes into it).
    """

    def __init__(self) -> None:
        self._table: dict[tuple[str, int], Partial] = {}  # insertion order = LRU

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._table

    def __len__(self) -> int:
        return len(self._table)

    def values(self) -> list[Partial]:
        return list(self._table.values())

    def get(self, key: tuple[str, int]) -> Partial | None:
        return self._table.get(key)

    def used(self, key: tuple[str, int]) -> Partial | None:
        """The partial, now the most recently used."""
        gathered = self._table.pop(key, None)
        if gathered is not None:
            self._table[key] = gathered
        return gathered

    def new(self, key: tuple[str, int], size: int) -> Partial:
        """A partial for a chunk that has none; idle ones beyond the bound are dropped."""
        gathered = self._table[key] = Partial(size)
        excess = len(self._table) - MAX_PARTIALS
        if excess > 0:
            idle = [k for k, p in self._table.items()
                    if not p.flights and not p.completing and k != key]
            for old in idle[:excess]:
                del self._table[old]
        return gathered

    def busy(self, key: tuple[str, int]) -> bool:
        """Blocks of this chunk are being fetched."""
        gathered = self._table.get(key)
        return gathered is not None and bool(gathered.flights)

    def discard(self, key: tuple[str, int], gathered: Partial | None = None) -> None:
        """Forget the chunk's partial (only `gathered`, if given: not a newer one)."""
        if gathered is None or self._table.get(key) is gathered:
            self._table.pop(key, None)

    def forget_layer(self, digest: str) -> None:
        for key in [k for k in self._table if k[0] == digest]:
            del self._table[key]
