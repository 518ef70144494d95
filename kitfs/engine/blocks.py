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
  blocks again meanwhile.

Invariants of a Claim: every (chunk, block) in `wanted` is in its partial's
`flights` with the chunk's event in `events`, from `add` until its fetch
ends them all; `wanted` is in blob order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import trio

from kitfs.buffers import new_buffer
from kitfs.engine.geometry import Chunk
from kitfs.errors import IntegrityError


def blocks_of(block_size: int, lo: int, hi: int) -> range:
    """The blocks bytes [lo, hi) of a chunk fall in."""
    return range(lo // block_size, (hi - 1) // block_size + 1)


class Partial:
    __slots__ = ("bad", "buffer", "completing", "flights", "have")

    def __init__(self, size: int) -> None:
        self.buffer = new_buffer(size)
        self.have: set[int] = set()
        self.flights: dict[int, trio.Event] = {}
        self.completing = False
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
