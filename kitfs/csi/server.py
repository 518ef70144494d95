"""The gRPC server: Identity and Node services on the Unix socket kubelet dials.

It runs as the supervisor's child. Killing it at any moment loses nothing:
every volume and daemon is on disk (volumes.py), the daemons run in their own
sessions, and the next server adopts them before it takes calls.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType

import grpc

from kitfs.csi import DRIVER_NAME, csi_pb2_grpc
from kitfs.csi.identity import IdentityService
from kitfs.csi.node import DriverConfig, Node, NodeService
from kitfs.csi.sockets import socket_path
from kitfs.errors import KitfsError, UsageError
from kitfs.mounts import MountState, read_state

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kitfs.metrics import MetricsServer

log = logging.getLogger(__name__)

WORKERS = 8  # kubelet publishes a node's pods in parallel
#: Calls past this many (running and queued) are answered RESOURCE_EXHAUSTED at once, which
#: kubelet retries, instead of piling up behind slow publishes.
MAX_RPCS = 4 * WORKERS
#: Publishes and unpublishes at once: the other workers stay free for Identity calls
#: (Probe) and NodeGetCapabilities, whatever the registry or the mounts are doing.
VOLUME_SLOTS = WORKERS - 2
STOP_GRACE = 10.0
SWEEP_EVERY = 10.0  # seconds between sweeps for unused daemons


class Sweeper:
    """Stops daemons no volume uses, every SWEEP_EVERY seconds, in a thread of its own.

    A daemon that would not stop at its last unpublish (or at adoption) is tried again
    here rather than inside a call: each try may wait out umount's timeout, and Probe
    must answer within the livenessprobe sidecar's 3 s. Probe reports its last result.
    """

    def __init__(self, node: Node, every: float = SWEEP_EVERY) -> None:
        self.node = node
        self.every = every
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="csi-sweeper", daemon=True)

    def _run(self) -> None:
        while not self._stopping.wait(self.every):
            try:
                self.node.stop_unused()
            except Exception:  # a bad sweep must not end the sweeping
                log.exception("sweeping unused daemons")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop sweeping; a sweep in progress gets STOP_GRACE to finish (the process
        exits without it: a stop it interrupts is retried by the next server)."""
        self._stopping.set()
        self._thread.join(STOP_GRACE)


def _node_states(node: Node) -> Callable[[], list[MountState]]:
    """The mounts this driver manages, read from their daemons' state files at scrape time."""

    def states() -> list[MountState]:
        found = []
        for daemon in node.records.daemons():
            state = read_state(Path(daemon.mountpoint))
            if state is not None:
                found.append(state)
        return found

    return states


def _start_metrics(address: str | None, node: Node) -> MetricsServer | None:
    """A taken port is logged, not fatal: publishing models matters more than their metrics,
    and a server that exits here would only be restarted into the same failure."""
    if address is None:
        return None
    from kitfs.metrics import start_metrics_server

    try:
        return start_metrics_server(address, _node_states(node))
    except KitfsError as exc:
        log.error("serving without metrics: %s", exc)
        return None


def grpc_server(node: Node, path: Path) -> grpc.Server:
    """The Identity and Node services of `node` on the Unix socket `path`, not started."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by the server before this one
    server = grpc.server(ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="csi"),
                         maximum_concurrent_rpcs=MAX_RPCS)
    # the generated registration functions carry no annotations
    csi_pb2_grpc.add_IdentityServicer_to_server(  # type: ignore[no-untyped-call]
        IdentityService(node), server)
    csi_pb2_grpc.add_NodeServicer_to_server(  # type: ignore[no-untyped-call]
        NodeService(node, VOLUME_SLOTS), server)
    if server.add_insecure_port(f"unix://{path}") == 0:
        raise UsageError(f"cannot listen on {path}")
    return server


def serve(config: DriverConfig, endpoint: str, metrics: str | None) -> int:
    path = socket_path(endpoint)
    node = Node(config)
    node.adopt()
    server = grpc_server(node, path)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    exporter = _start_metrics(metrics, node)
    sweeper = Sweeper(node)
    sweeper.start()
    server.start()
    log.info("serving %s on %s (node %s, pid %d)", DRIVER_NAME, path, config.node_id,
             os.getpid())
    while not stop.wait(1.0):
        pass
    log.info("stopping; the mounts stay (their daemons run on)")
    server.stop(STOP_GRACE).wait()
    sweeper.stop()
    if exporter is not None:
        exporter.stop()
    return 0
