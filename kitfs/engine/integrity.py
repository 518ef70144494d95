"""Binding what a mount serves to the digests the ModelKit names (SECURITY.md).

A chunk with a known digest (kitfs table of contents, or a layer verified
end to end by an earlier mount) is checked before anyone sees it
(engine/chunks.py). On top of that, here:

- layout: the tar headers of a layer listed by a table of contents are
  walked over checked chunks before its first file is served
  (`layout_ready`); entries that disagree with them poison the layer;
- verification: every layer is hashed end to end once all of it has been
  here (`got` notices, `_verify` hashes, engine/verify.py), which binds its
  bytes, and a table's chunk digests, to the layer digest; a verified layer
  is recorded so later mounts check its chunks by digest from the start;
- poisoning: a mismatch anywhere in a layer checked only as a whole makes
  every later read of it fail with EIO; its records and unverified chunks
  are purged, the kernel's pages of its files dropped, `status` says why.
  Where every chunk carries its own digest a lie fails just that chunk.

The layer's state machine and its invariants are in engine/layerstate.py.
"""

from __future__ import annotations

import logging
from functools import partial

import trio

from kitfs.cache.fileformat import CacheError
from kitfs.cache.keys import chunk_key_for_digest
from kitfs.cache.memory import ChunkData
from kitfs.engine.chunks import Chunks, checked
from kitfs.engine.context import Context, LayerRead, foreign
from kitfs.engine.geometry import verified_record
from kitfs.engine.layerstate import LayerState, State
from kitfs.engine.streamed import Streams
from kitfs.engine.verify import hash_ranged, hash_seekable, walk_layout
from kitfs.errors import IntegrityError, KitfsError
from kitfs.inspection import layout_record

log = logging.getLogger(__name__)

#: Chunks a whole-layer hash asks for ahead of the one it hashes.
HASH_AHEAD = 8


class Integrity:
    """Layout checks, end-to-end verification and poisoning of the mounted layers.

    Made before the parts that report to it (it is their `Verdicts`), then
    given them with `attach` before the engine starts.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._chunks: Chunks | None = None
        self._streams: Streams | None = None
        self._read: LayerRead | None = None

    def attach(self, chunks: Chunks, streams: Streams, read: LayerRead) -> None:
        self._chunks, self._streams, self._read = chunks, streams, read

    # -- what the chunks report (chunks.Verdicts) -------------------------------------

    def got(self, layer: LayerState, index: int) -> None:
        """Chunk `index` is here; once all are, the layer is hashed against its digest."""
        layer.fetched.add(index)
        if (layer.state is State.UNVERIFIED and len(layer.fetched) == len(layer.geo.chunks)
                and self.ctx.config.verify_when_whole):
            self.ensure_verification(layer)

    def failed(self, layer: LayerState, error: KitfsError) -> None:
        """A fetch or a check went wrong: noted, and a lie (IntegrityError) poisons a layer
        checked only as a whole.

        Where every chunk carries its own digest, a lie fails just the chunk it
        was in: nothing wrong was served, and the next read fetches it again
        (one bad response from a flaky proxy must not take a model away until
        remount).
        """
        if isinstance(error, IntegrityError):
            for client in self.ctx.source.clients():  # a mirror's lie: the next host next time
                client.refuse_mirror_bytes(layer.info.digest)
        if isinstance(error, IntegrityError) and not layer.geo.verified_by_chunk:
            self.poison(layer, str(error))
        self.ctx.note_error(str(error))

    # -- the layer's layout -----------------------------------------------------------

    async def layout_ready(self, layer: LayerState) -> None:
        """Wait until the layer's entries are known to be its tar's (one check, many waiters).

        A check that could not finish (the registry failed it) fails the reads
        waiting for it; the next read starts another.
        """
        while not layer.layout_ok:
            layer.check()
            event = layer.layout_check
            if event is None:
                event = layer.layout_check = trio.Event()
                layer.layout_error = None
                if self.ctx.nursery is None:
                    await self._check_layout(layer, event)
                else:
                    self.ctx.spawn(self._check_layout, layer, event)
            await event.wait()
            layer.check()
            if not layer.layout_ok and layer.layout_error is not None:
                raise layer.layout_error

    async def _check_layout(self, layer: LayerState, event: trio.Event) -> None:
        """Walk the tar headers over verified chunks and hold the listed entries to them.

        Only headers are read (a block or chunk per big file, one window per
        run of small ones), each checked like any chunk. A table of contents
        that disagrees poisons the layer: its author tried to show other files
        than `kit unpack` writes.
        """
        assert layer.layout is not None and self._read is not None
        read = self._read
        size = layer.geo.stream_size if layer.geo.stream_size is not None else layer.info.size
        try:
            problem = await walk_layout(layer.layout, size,
                                        lambda offset, length: read(layer, offset, length))
            if problem is not None:
                self.poison(layer, problem)
                return
            layer.layout_ok = True
            if layer.layout.origin == "walked":
                await self._keep_layout(layer)
        except Exception as exc:
            layer.layout_error = foreign(exc, "checking a layer's layout")
            self.ctx.note_error(f"checking the files of layer {layer.info.digest[:19]}: "
                                f"{layer.layout_error}")
        finally:
            layer.layout_check = None
            event.set()

    async def _keep_layout(self, layer: LayerState) -> None:
        """Cache a layout now bound to the layer digest, so later mounts skip the walk."""
        if self.ctx.toc_cache is None or layer.layout is None:
            return
        await self.ctx.record(self.ctx.toc_cache.put, layer.info.digest,
                              layout_record(layer.info, layer.layout.entries))

    # -- verification -----------------------------------------------------------------

    def ensure_verification(self, layer: LayerState) -> None:
        if layer.state in (State.VERIFIED, State.POISONED) or layer.verify_started:
            return
        layer.verify_started = True
        if layer.geo.shape == "stream":
            assert self._streams is not None
            if not layer.stream_running:
                self._streams.start(layer)
            return
        self.ctx.spawn(self._verify, layer)

    async def _verify(self, layer: LayerState) -> None:
        """Hash the whole layer against its digest (fetching what is missing), in order.

        Until then nothing binds what was served to the layer digest: neither
        the bytes of a layer without chunk digests, nor the chunk digests a
        table of contents claims. The tar headers of a layer listed by range
        are walked over the same bytes and must give the entries it was
        listed with.
        """
        assert self._chunks is not None
        layer.verifying()
        try:
            if layer.geo.shape == "seekable":
                problem = await hash_seekable(layer.info, layer.geo.chunks, self.ctx.source,
                                              partial(checked, layer))
                digests = [c.digest or "" for c in layer.geo.chunks]
            else:
                problem, digests = await hash_ranged(
                    layer.info, layer.geo.chunks, layer.layout,
                    partial(self._in_order, layer), layer.recorded, layer.hashed_to)
        except Exception as exc:
            why = foreign(exc, "verification")
            layer.postponed(why)
            self.ctx.note_error(f"verification of {layer.info.digest[:19]} postponed: {why}")
            return
        if problem is not None:
            self.poison(layer, problem)
            return
        if layer.state is State.POISONED:  # by a reader while this hashed: stays so
            return
        if layer.layout is not None and layer.layout.origin == "walked":
            await self._keep_layout(layer)
        await self.mark_verified(layer, digests)

    async def _in_order(self, layer: LayerState, index: int) -> ChunkData:
        """Chunk `index` for the hash, the next HASH_AHEAD asked for ahead of it: a hash
        that fell behind its readers finds its chunks on disk, and reading them one at a
        time left it further behind with every chunk."""
        assert self._chunks is not None
        if index % HASH_AHEAD == 0:
            self._chunks.ahead(layer, range(index + 1, index + 1 + HASH_AHEAD))
        return await self._chunks.get(layer, index, background=True)

    async def _adopt(self, layer: LayerState, digests: list[str]) -> None:
        """Give a verified layer's chunk files the digest keys later mounts look them up by."""
        ctx = self.ctx
        await ctx.writes.flush()  # a chunk still being written would keep its old key
        geo = layer.geo
        moves = [(geo.position_key(i), chunk_key_for_digest(d))
                 for i, d in enumerate(digests) if geo.chunks[i].digest is None]
        try:
            await trio.to_thread.run_sync(
                lambda: [ctx.store.adopt(old, new) for old, new in moves])
        except CacheError as exc:
            ctx.note_error(str(exc))

    async def mark_verified(self, layer: LayerState, digests: list[str]) -> None:
        """The layer matched its digest: recorded, so later mounts check chunks by digest
        (a streamed layer's chunks, by position, are then read back instead of streamed
        again), and its chunk files moved to the keys those digests give; then the
        attempt is over (`Engine.verified` returns once all of that is on disk)."""
        if not layer.verified():  # poisoned meanwhile: that is final
            return
        log.info("layer %s verified end to end", layer.info.digest)
        ctx = self.ctx
        if ctx.toc_cache is not None:
            await ctx.record(ctx.toc_cache.put_verified, layer.info.digest,
                             verified_record(layer.geo.chunk_size, layer.info.size, digests))
        if any(c.digest is None for c in layer.geo.chunks):
            await self._adopt(layer, digests)
        layer.attempt_over.set()

    # -- poisoning --------------------------------------------------------------------

    def poison(self, layer: LayerState, reason: str) -> None:
        """The layer lied: fail every read of it from now on and forget what it left."""
        if not layer.poisoned(reason):
            return
        ctx = self.ctx
        log.error("layer %s poisoned: %s; every read of it fails from now on",
                  layer.info.digest, reason)
        ctx.counters.errors.append(f"layer {layer.info.digest[:19]} poisoned: {reason}")
        ctx.partials.forget_layer(layer.info.digest)
        for key in [c.key for c in layer.geo.chunks if c.digest is None]:
            ctx.memory.discard(key)
        if layer.geo.shape == "stream":
            for i in range(layer.stream_next):
                ctx.memory.discard(layer.geo.position_key(i))
        if ctx.on_poison is not None:
            nodes = [n for n in ctx.tree.files() if n.layer == layer.info.digest]
            ctx.spawn(ctx.on_poison, nodes)
        ctx.spawn(self._purge, layer)

    async def _purge(self, layer: LayerState) -> None:
        ctx = self.ctx
        try:
            await trio.to_thread.run_sync(ctx.store.remove_layer, layer.info.digest)
            if ctx.toc_cache is not None:
                await trio.to_thread.run_sync(ctx.toc_cache.remove_verified, layer.info.digest)
                await trio.to_thread.run_sync(ctx.toc_cache.remove, layer.info.digest)
        except CacheError as exc:
            ctx.note_error(str(exc))
