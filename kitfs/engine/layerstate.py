"""One mounted layer: how far its bytes and its file list are bound to its digest.

A layer starts UNVERIFIED unless this node verified it before (its chunks'
digests then come from that record). VERIFYING while it is hashed whole
(fetching what is missing); VERIFIED once its bytes matched the layer
digest, and with them every chunk digest and tar header it was served by;
POISONED once anything said it lied. The transitions, and only these:

    UNVERIFIED -> VERIFYING -> VERIFIED
    UNVERIFIED -> VERIFIED                  (a verified record at mount; a streamed layer
                                             whose digest matched at the stream's end)
    UNVERIFIED | VERIFYING -> UNVERIFIED    (a hash postponed: the registry failed it)
    any -> POISONED                         (final: nothing un-poisons a layer but a remount)

The methods below refuse to leave POISONED; the engine calls them only in
the order above.

Invariants of a LayerState:
- `verified_event` is set exactly when the state is VERIFIED or POISONED
  (strict mode's readers wait on it);
- `attempt_over` is set when the verification attempt under way (or the
  next one) is over: poisoned, postponed, or verified with its records
  written (Integrity.mark_verified); a postponement sets it and puts a fresh
  one in its place for the next attempt, with its cause in `postponed_by`
  (what `Engine.verified` waits on and reports);
- `hashed` is how far (bytes of its stream) the whole-layer hash under way
  has got; `hash_moved` is set, and replaced, whenever it moves or the
  attempt ends (a caller pacing itself on the hash waits on it);
- `reason` is non-empty exactly when POISONED;
- `recorded` holds the BLAKE3 of chunks this engine fetched that carry no
  digest of their own (for a streamed layer verified before, every chunk's,
  from its verified record), and is emptied when the layer is poisoned (a stream
  failing at that moment may still add a chunk, but no read of a poisoned
  layer reaches the disk);
- `layout_ok` is False until the listed entries are known to be those the
  tar's own headers give (see Engine._check_layout); once True it stays.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import trio

from kitfs.engine.geometry import LayerGeometry
from kitfs.errors import IntegrityError, KitfsError
from kitfs.inspection import LayerLayout
from kitfs.modelkit.manifest import LayerInfo


class State(enum.StrEnum):
    UNVERIFIED = "unverified"
    VERIFYING = "verifying"
    VERIFIED = "verified"
    POISONED = "poisoned"


@dataclass
class LayerState:
    info: LayerInfo
    geo: LayerGeometry
    state: State = State.UNVERIFIED
    reason: str = ""
    # Where the layer's entries came from; None: not known to this engine (tests).
    layout: LayerLayout | None = None
    layout_ok: bool = True
    layout_check: trio.Event | None = None  # set when a check in progress ends
    layout_error: KitfsError | None = None  # why the last check could not finish
    recorded: dict[int, str] = field(default_factory=dict)
    verified_event: trio.Event = field(default_factory=trio.Event)
    attempt_over: trio.Event = field(default_factory=trio.Event)
    postponed_by: KitfsError | None = None  # why the last verification could not finish
    hashed: int = 0  # bytes of the stream the whole-layer hash in progress has passed
    hash_moved: trio.Event = field(default_factory=trio.Event)
    fetched: set[int] = field(default_factory=set)
    verify_started: bool = False
    # stream-shaped layers
    stream_running: bool = False
    stream_next: int = 0  # index of the next chunk the stream task will produce
    stream_chunks: int | None = None  # known once the stream reached its end
    stream_digests: dict[int, str] = field(default_factory=dict)

    def check(self) -> None:
        """IntegrityError if the layer is poisoned: no byte of it is served any more."""
        if self.state is State.POISONED:
            raise IntegrityError(f"layer {self.info.digest} failed verification: {self.reason}")

    def verifying(self) -> None:
        if self.state is not State.POISONED:
            self.state = State.VERIFYING
        self.hashed = 0

    def hashed_to(self, offset: int) -> None:
        """The hash in progress has passed `offset`: wake who waits for it (Engine.hashed_past)."""
        self.hashed = offset
        self._moved()

    def _moved(self) -> None:
        moved, self.hash_moved = self.hash_moved, trio.Event()
        moved.set()

    def postponed(self, why: KitfsError) -> None:
        """A hash or stream could not finish (the registry failed it): it may be tried again."""
        if self.state is State.VERIFYING:
            self.state = State.UNVERIFIED
        self.verify_started = False
        self.postponed_by = why
        over, self.attempt_over = self.attempt_over, trio.Event()
        over.set()
        self._moved()

    def verified(self) -> bool:
        """The layer matched its digest; False if it was poisoned meanwhile (that stays)."""
        if self.state is State.POISONED:
            return False
        self.state = State.VERIFIED
        self.verified_event.set()
        self._moved()
        return True

    def poisoned(self, reason: str) -> bool:
        """The layer lied; False if it was poisoned already (the first reason stays)."""
        if self.state is State.POISONED:
            return False
        self.state = State.POISONED
        self.reason = reason
        self.verified_event.set()
        self.attempt_over.set()
        self._moved()
        self.recorded.clear()
        return True
