"""Each small part of the engine held to the invariants its module states."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from kitfs.engine.blocks import Claim, Partial, blocks_of
from kitfs.engine.flights import Flights
from kitfs.engine.geometry import plan_layer
from kitfs.engine.layerstate import LayerState, State
from kitfs.engine.prefetch import READER_IDLE_S, Pacer
from kitfs.engine.readahead import READAHEAD_MIN_RUN, READAHEAD_MIN_RUN_MIDFILE, Cursor
from kitfs.errors import IntegrityError, KitfsError, UnreachableError
from kitfs.modelkit import mediatypes as mt
from kitfs.modelkit.manifest import LayerInfo

MiB = 1 << 20


async def test_a_flight_is_joined_while_in_progress_and_gone_once_ended() -> None:
    flights: Flights[str, bytes] = Flights()
    first = flights.start("k")
    assert flights.joined("k") is first and "k" in flights and len(flights) == 1
    got: list[bytes] = []

    async def waiter() -> None:
        got.append(await first.result())

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(waiter)
        await trio.sleep(0.01)
        flights.land("k", b"x")
        assert "k" not in flights  # nobody joins a flight that ended
    assert got == [b"x"] * 3
    assert flights.joined("k") is not first  # a new one
    second = flights.get("k")
    assert second is not None
    flights.abort("k", UnreachableError("gone"))
    with pytest.raises(UnreachableError):
        await second.result()
    flights.land("k", b"late")  # ending a flight not in progress changes nothing
    assert not flights and second.error is not None


async def test_drop_leaves_a_flight_to_its_owner() -> None:
    flights: Flights[int, bytes] = Flights()
    mine = flights.start(1)
    flights.drop(1, mine)
    other = flights.start(1)
    flights.drop(1, mine)  # not mine any more: stays
    assert flights.get(1) is other and not mine.ended


def test_a_cursor_reads_ahead_only_of_a_long_enough_run() -> None:
    c = Cursor()
    assert c.step(0, MiB)  # the first read starts a run
    for off in range(MiB, READAHEAD_MIN_RUN, MiB):
        assert not c.step(off, off + MiB)
        if off + MiB < READAHEAD_MIN_RUN:
            assert c.window(0, 1 << 30, 2 * MiB, 64 * MiB, 32 * MiB) is None
    ahead = c.window(0, 1 << 30, 2 * MiB, 64 * MiB, 32 * MiB)
    assert ahead is not None and ahead.start == READAHEAD_MIN_RUN // (2 * MiB)
    assert c.requested == ahead[-1]
    assert c.window(0, 1 << 30, 2 * MiB, 64 * MiB, 32 * MiB) is None  # already asked for
    assert c.step(5 * MiB, 6 * MiB) and c.requested == -1  # a jump: a new run, mid-file
    assert not c.from_start
    for off in range(6 * MiB, 5 * MiB + READAHEAD_MIN_RUN, MiB):
        c.step(off, off + MiB)
    assert READAHEAD_MIN_RUN < READAHEAD_MIN_RUN_MIDFILE
    assert c.window(0, 1 << 30, 2 * MiB, 64 * MiB, 32 * MiB) is None  # mid-file needs more


def test_two_cursors_do_not_share_a_run() -> None:
    a, b = Cursor(), Cursor()
    for off in range(0, 20 * MiB, MiB):
        a.step(off, off + MiB)
        b.step(100 * MiB - off, 100 * MiB - off + 4096)
    assert a.from_start and a.window(0, 1 << 30, 2 * MiB, 64 * MiB, 32 * MiB) is not None


def layer_state() -> LayerState:
    """A 4 MiB uncompressed model layer, planned as a mount plans it."""
    info = LayerInfo(0, "sha256:" + "a" * 64, 4 * MiB, mt.layer_media_type("model"), "model",
                     "model", "tar", "none", "kitops", "./model", "model", None, 0, {},
                     "sha256:" + "a" * 64)
    return LayerState(info, plan_layer(info, None, MiB))


def test_poison_is_final_and_says_why() -> None:
    layer = layer_state()
    assert layer.state is State.UNVERIFIED and not layer.verified_event.is_set()
    layer.verifying()
    layer.recorded[0] = "blake3:" + "0" * 64
    assert layer.poisoned("lied")
    assert not layer.poisoned("again") and layer.reason == "lied"
    assert layer.verified_event.is_set() and not layer.recorded
    assert not layer.verified() and layer.state is State.POISONED
    layer.postponed(KitfsError("registry gone"))
    layer.verifying()  # a hash scheduled before the poison, starting after it
    assert layer.state is State.POISONED
    with pytest.raises(IntegrityError, match="lied"):
        layer.check()


def test_a_postponed_hash_may_run_again_and_verified_wakes_strict_readers() -> None:
    layer = layer_state()
    layer.verify_started = True
    layer.verifying()
    attempt = layer.attempt_over
    layer.postponed(KitfsError("registry gone"))
    assert layer.state is State.UNVERIFIED and not layer.verify_started
    assert attempt.is_set() and not layer.attempt_over.is_set()  # the next attempt's
    assert str(layer.postponed_by) == "registry gone"
    assert layer.verified() and layer.verified_event.is_set()
    assert layer.state == "verified"  # status shows the plain word
    layer.check()


def test_a_claim_holds_its_blocks_until_released_and_fetches_adjacent_runs() -> None:
    layer = layer_state()
    chunks, bs = layer.geo.chunks, 256 << 10
    first, second = Partial(MiB), Partial(MiB)
    first.have.add(0)
    claim = Claim()
    claim.add(0, first, blocks_of(bs, 0, MiB))  # block 0 is here: blocks 1-3 claimed
    claim.add(1, second, blocks_of(bs, 0, bs + 1))  # blocks 0-1 of the next chunk
    assert claim.wanted == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert set(first.flights) == {1, 2, 3} and set(second.flights) == {0, 1}
    other = Claim()
    other.add(0, first, range(4))  # nothing left to claim: all here or in flight
    assert not other.wanted
    assert claim.runs(chunks, bs) == [claim.wanted]  # adjacent in the blob: one request
    events = list(claim.events.values())
    claim.release()
    assert not first.flights and not second.flights and all(e.is_set() for e in events)
    assert not first.whole(bs)
    first.have.update({1, 2, 3})
    assert first.whole(bs) and first.has(range(4))


async def test_pacing_holds_prefetch_near_an_active_reader_only(autojump_clock: object) -> None:
    pacer = Pacer(trio.current_time())

    async def absent(index: int) -> bool:
        return False

    with trio.fail_after(0.1):  # no reader, chunk not on disk: at once
        await pacer.pace("L", 100, 4, absent)
    pacer.read("L", 10)
    with trio.fail_after(0.1):  # within the lead of the reader
        await pacer.pace("L", 14, 4, absent)
    released: list[float] = []

    async def far_ahead() -> None:
        await pacer.pace("L", 30, 4, absent)
        released.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        started = trio.current_time()
        nursery.start_soon(far_ahead)
        for last in range(11, 30, 2):  # a reader streaming on, faster than idle
            await trio.sleep(READER_IDLE_S / 4)
            pacer.read("L", last)
            if released:
                break
    assert released and released[0] - started < READER_IDLE_S * 3
    # a reader that went quiet holds nothing back after READER_IDLE_S
    pacer.read("L", 0)
    with trio.fail_after(READER_IDLE_S * 3):
        await pacer.pace("L", 500, 4, absent)


async def test_write_back_survives_a_write_that_fails_unexpectedly(tmp_path: Path) -> None:
    """Regression (review of write batching): a put that raised anything but CacheError
    ended its writer with the rest of its batch unwritten and `pending` never falling, so
    flush() and every background fetch's backpressure waited forever."""
    from kitfs.cache.store import ChunkStore
    from kitfs.engine.writeback import WriteBack

    store = ChunkStore(tmp_path / "cache", sync=False)
    real_put = store.put

    def put(key: str, data: bytes | bytearray | memoryview) -> None:
        if key.endswith(("01", "09")):
            raise OSError(5, "an I/O error nobody wrapped")
        real_put(key, data)

    store.put = put  # type: ignore[method-assign]
    notes: list[str] = []
    async with trio.open_nursery() as nursery:
        writes = WriteBack(store, nursery.start_soon, notes.append)
        for i in range(20):
            writes.later(f"{i:064x}", bytes([i]) * 4096)
        with trio.fail_after(10):
            await writes.flush()
    assert writes.pending == 0
    assert store.usage().chunks == 18
    assert len(notes) == 2 and all("OSError" in n for n in notes)
