"""The composition root of a mount: build every object, mount, serve, unmount.

One daemon process serves one mountpoint. `serve` owns the root nursery;
everything that runs in the background (pyfuse3's workers, the engine's
prefetch and verification, the state file refresher, the signal watcher)
lives there, so stopping is one cancel. On the way out: the FUSE loop
returns (SIGTERM/SIGINT/SIGHUP call `pyfuse3.terminate`, or someone ran
`umount`), the kernel mount goes, the engine's pending cache writes finish
(bounded), the root scope is cancelled, the registry client closes.

A signal that arrives before the mount exists just abandons the start-up;
one that arrives after `pyfuse3.init` always ends in an unmount, so a daemon
stopped by anything but SIGKILL never leaves a dead mount behind.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from kitfs.buffers import trim_memory, tune_malloc
from kitfs.engine.api import FileReader
from kitfs.engine.reader import EngineConfig
from kitfs.engine.session import open_kit
from kitfs.errors import KitfsError, user_error
from kitfs.fs.operations import FsConfig, KitfsOperations
from kitfs.inspection import Inspection
from kitfs.modelkit.filters import FilterSet
from kitfs.modelkit.tree import Node
from kitfs.mounts import (
    MountConfig,
    MountError,
    MountState,
    find_mount,
    process_start_time,
    remove_state,
    write_state,
)
from kitfs.oci.client import RegistryClient
from kitfs.oci.reference import Reference, parse_reference
from kitfs.offline import offline_note
from kitfs.signing.flags import MOUNT_FLAGS, signatures_asked

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STATE_INTERVAL_S = 1.0
# Writing fetched chunks out on the way down must not hold `kitfs umount` for long.
FLUSH_TIMEOUT_S = 10.0
READ_BOUND_MARGIN_S = 5.0
# After a stop signal, how long requests in flight may take before they are abandoned.
STOP_GRACE_S = 3.0
# How often a registry whose last request failed is asked again (kitfs/health.py).
REGISTRY_RECHECK_S = 20.0


class _Stopper:
    """What a stop signal means depends on how far start-up got."""

    def __init__(self, scope: trio.CancelScope) -> None:
        self._scope = scope
        self.fuse_scope = trio.CancelScope()  # around pyfuse3.main()
        self.fuse_running = False
        self.signalled: int | None = None

    async def stop(self, signum: int) -> None:
        self.signalled = signum
        notify_systemd("STOPPING=1")
        if not self.fuse_running:
            self._scope.cancel()
            return
        # The loop returns once the requests being served are answered. A read
        # waiting on a dead registry could hold it for the whole read bound, so
        # after a grace period the stragglers are cancelled: closing the session
        # then fails them with ENOTCONN instead of keeping `kitfs umount` waiting.
        pyfuse3.terminate()
        await trio.sleep(STOP_GRACE_S)
        if not self.fuse_scope.cancel_called:
            log.warning("requests still running %gs after the stop signal: abandoning them",
                        STOP_GRACE_S)
            self.fuse_scope.cancel()


async def _watch_signals(signals: Any, stopper: _Stopper) -> None:
    async for signum in signals:
        log.info("%s: unmounting", signal.Signals(signum).name)
        await stopper.stop(signum)


async def serve(config: MountConfig, ready: Callable[[MountState], None]) -> None:
    """Mount `config.reference` at `config.mountpoint` and serve it until stopped.

    `ready` is called once the mount answers requests. Errors before that are
    raised as KitfsError (nothing is left mounted); a stop signal before it
    raises MountError.
    """
    trim = tune_malloc()
    troubles = _WarningCounter()
    logging.getLogger().addHandler(troubles)
    try:
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async with trio.open_nursery() as root:
                stopper = _Stopper(root.cancel_scope)
                root.start_soon(_watch_signals, signals, stopper)
                if trim is not None:
                    root.start_soon(trim_memory, trim)
                await _serve(config, ready, root, stopper)
                root.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise user_error(group) from None
    finally:
        logging.getLogger().removeHandler(troubles)
    if stopper.signalled is not None and not stopper.fuse_running:
        name = signal.Signals(stopper.signalled).name
        raise MountError(f"interrupted ({name}) before {config.mountpoint} was mounted")
    if config.log_file is not None and not troubles.count:
        # Mounted, served, unmounted, nothing went wrong: nobody needs this log,
        # and /run would otherwise collect one per mountpoint ever used.
        config.log_file.unlink(missing_ok=True)


class _WarningCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


async def _serve(
    config: MountConfig, ready: Callable[[MountState], None], root: trio.Nursery,
    stopper: _Stopper,
) -> None:
    # Bound before anything is fetched or mounted: a port in use fails the mount at once.
    published: list[MountState] = []
    async with contextlib.AsyncExitStack() as stack:
        if config.metrics_addr is not None:
            from kitfs.metrics import serving_metrics

            await stack.enter_async_context(
                serving_metrics(config.metrics_addr, lambda: list(published)))
        await _serve_kit(config, ready, root, stopper, published)


async def _serve_kit(
    config: MountConfig, ready: Callable[[MountState], None], root: trio.Nursery,
    stopper: _Stopper, published: list[MountState],
) -> None:
    reference = parse_reference(config.reference)
    filters = FilterSet.parse(list(config.filters))
    engine_config = EngineConfig(
        prefetch=config.prefetch, verify=config.verify, read_timeout=config.request_timeout,
        memory_bytes=config.memory,
    )
    gate = None
    if signatures_asked(config.signature, os.environ):
        from kitfs.enforcement import signature_gate

        gate = signature_gate(config.signature, MOUNT_FLAGS, config.client)
    async with open_kit(
        reference, config.client, config.cache_dir, filters=filters, config=engine_config,
        cache_budget=config.cache_size, gate=gate,
    ) as kit:
        ops = KitfsOperations(kit.tree, kit.engine, FsConfig(
            uid=os.getuid(), gid=os.getgid(), time_ns=_tree_time_ns(kit.inspection),
            request_timeout=config.request_timeout,
            # Only catches an engine that hangs: it must never fire before the engine's own.
            read_timeout=kit.engine.longest_wait + READ_BOUND_MARGIN_S,
        ))
        state = MountState(
            pid=os.getpid(), start_time=process_start_time(os.getpid()),
            reference=config.reference, digest=kit.inspection.digest,
            mountpoint=str(config.mountpoint), cache_dir=str(config.cache_dir),
            log=str(config.log_file) if config.log_file is not None else None,
            started=time.time(), files=sum(1 for _ in kit.tree.files()),
            size=kit.tree.total_size, filters=list(config.filters),
            signatures=list(gate.passed) if gate is not None else [],
            parents=[p.inspection.digest for p in kit.inspection.parents],
            offline=offline_note(kit.source),
        )

        async def poisoned(nodes: list[Node]) -> None:
            await ops.forget_pages(nodes)
            if ops.attached:  # `kitfs status` says so now, not at the next refresh
                _refresh(state, ops, kit.engine)

        published.append(state)
        kit.engine.on_poison = poisoned
        await kit.engine.start(root)
        root.start_soon(recheck_registries, kit.source.clients(), REGISTRY_RECHECK_S)
        await _mount_and_run(config, ops, kit.engine, state, ready, stopper)
        with trio.move_on_after(FLUSH_TIMEOUT_S):
            await kit.engine.flush()  # before the cancel: the engine's writes run in `root`
        root.cancel_scope.cancel()


async def recheck_registries(clients: Sequence[RegistryClient], interval: float) -> None:
    """While a registry's last request failed, ask it again (GET /v2/) every `interval`.

    A mount marked unreachable would otherwise stay so until a reader tried
    again (nothing is fetched once prefetch is done): health must come back
    when the registry does, without a read that would fail meanwhile.
    """
    while True:
        await trio.sleep(interval)
        for client in clients:
            if client.stats.failing:
                try:
                    await client.ping()
                    log.info("registry %s answers again", client.registry)
                except KitfsError as exc:
                    log.debug("registry %s still failing: %s", client.registry, exc)
                except Exception:  # a health probe must never take the mount down
                    log.exception("asking registry %s again failed", client.registry)


def _tree_time_ns(inspection: Inspection) -> int:
    """Timestamps of every node: when the ModelKit was made if it says, else now.

    Tar entries `kit` writes all carry mtime 0, which would show as 1970 and
    tell nobody anything; the ModelKit's creation time is the truth that is
    stable across remounts.
    """
    created = inspection.view.created
    if created:
        with contextlib.suppress(ValueError):
            stamp = datetime.datetime.fromisoformat(created.replace("Z", "+00:00"))
            if stamp.tzinfo is None:
                stamp = stamp.replace(tzinfo=datetime.UTC)
            return int(stamp.timestamp()) * 1_000_000_000
    return time.time_ns()


# -- mounting -----------------------------------------------------------------------


def fuse_options(config: MountConfig) -> set[str]:
    """Read-only, nosuid and nodev whatever the ModelKit's tar modes say. The reference is
    the mount's source, as fstab names it: `mount -a` then sees the line is mounted.

    libfuse splits every option at commas, and kit's references may carry extra
    tags after one (`repo:v1,v2`): the source is the parsed reference without
    them, which holds no comma (pyfuse3 takes a set: an option that arrived in a
    comma could otherwise undo nosuid or nodev, whatever the order).
    """
    ref = parse_reference(config.reference)
    source = str(Reference(ref.registry, ref.repository, ref.tag, ref.digest))
    options = {f"fsname={source}", "subtype=kitfs", "default_permissions", "ro", "nosuid",
               "nodev"}
    if config.allow_other:
        options.add("allow_other")
    return options


async def _mount_and_run(
    config: MountConfig, ops: KitfsOperations, reader: FileReader, state: MountState,
    ready: Callable[[MountState], None], stopper: _Stopper,
) -> None:
    mountpoint = str(config.mountpoint)
    try:
        pyfuse3.init(ops, mountpoint, fuse_options(config))
    except RuntimeError:
        hint = " (allow_other needs user_allow_other in /etc/fuse.conf)" \
            if config.allow_other and os.geteuid() != 0 else ""
        raise MountError(f"the kernel refused to mount {mountpoint}{hint}") from None
    stopper.fuse_running = True
    ops.attached = True
    log.info("mounted %s (%s) at %s", config.reference, state.digest, mountpoint)
    try:
        async with trio.open_nursery() as mount_tasks:
            mount_tasks.start_soon(_announce, config, ops, reader, state, ready)
            with stopper.fuse_scope:
                await pyfuse3.main()
            stopper.fuse_scope.cancel()  # the loop is done: the grace timer has nothing to do
            mount_tasks.cancel_scope.cancel()
    finally:
        ops.attached = False
        pyfuse3.close(unmount=True)
        remove_state(config.mountpoint, state.pid)
        log.info("unmounted %s", mountpoint)


async def _announce(
    config: MountConfig, ops: KitfsOperations, reader: FileReader, state: MountState,
    ready: Callable[[MountState], None],
) -> None:
    """Tune the mount, prove it answers, publish its state, then keep the state fresh."""
    with trio.fail_after(max(config.request_timeout, 10.0)):
        await trio.to_thread.run_sync(os.stat, config.mountpoint)  # served by our own loop
    # Only now: the kernel lowers the readahead to what FUSE_INIT negotiated, and
    # INIT has certainly been answered once a request has come through.
    set_read_ahead(config.mountpoint, config.read_ahead_kb)
    _refresh(state, ops, reader)
    ready(state)
    notify_systemd(f"READY=1\nSTATUS=serving {state.reference} at {state.mountpoint}")
    while True:
        await trio.sleep(STATE_INTERVAL_S)
        _refresh(state, ops, reader)


def _refresh(state: MountState, ops: KitfsOperations, reader: FileReader) -> None:
    try:
        engine = reader.status()
    except Exception:
        log.exception("engine status failed")
        engine = {}
    state.status = {"fs": ops.status(), "engine": engine}
    state.updated = time.time()
    write_state(state)


def set_read_ahead(mountpoint: Path, kb: int) -> bool:
    """Set the kernel readahead of the mount: at the default 128 KiB FUSE reads crawl."""
    info = find_mount(mountpoint)
    if info is None:
        log.warning("cannot set readahead: %s is not in the mount table", mountpoint)
        return False
    path = Path("/sys/class/bdi") / info.device / "read_ahead_kb"
    try:
        path.write_text(f"{kb}\n")
    except OSError as exc:
        level = logging.WARNING if os.geteuid() == 0 else logging.INFO
        log.log(level, "could not set readahead of %s to %d KiB (%s): reads stay small",
                mountpoint, kb, exc.strerror)
        return False
    log.info("readahead of %s (bdi %s): %d KiB", mountpoint, info.device, kb)
    return True


def notify_systemd(message: str) -> None:
    """Tell systemd (Type=notify units) that the mount is ready or going away.

    The protocol is one datagram to $NOTIFY_SOCKET; without that variable
    this does nothing. A unit can then order services that read the mount
    after it is really mounted, not merely after the daemon started.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.warning("could not notify systemd at %s: %s", os.environ["NOTIFY_SOCKET"], exc)
