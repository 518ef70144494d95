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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType

import grpc

from kitfs.csi import DRIVER_NAME, csi_pb2_grpc
from kitfs.csi.identity import IdentityService
from kitfs.csi.node import DriverConfig, Node, NodeService
from kitfs.errors import UsageError

log = logging.getLogger(__name__)

WORKERS = 8  # kubelet publishes a node's pods in parallel
#: Calls past this many (running and queued) are answered RESOURCE_EXHAUSTED at once, which
#: kubelet retries, instead of piling up behind slow publishes.
MAX_RPCS = 4 * WORKERS
STOP_GRACE = 10.0


def socket_path(endpoint: str) -> Path:
    """`unix:///csi/csi.sock`, `unix:/csi/csi.sock` or a plain absolute path."""
    path = endpoint
    for prefix in ("unix://", "unix:"):
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    if not path.startswith("/"):
        raise UsageError(f"--endpoint {endpoint}: use unix:///ABSOLUTE/PATH or an absolute path")
    return Path(path)


# STUB (merge): the lead wires the Prometheus endpoint from the metrics branch here
# (prometheus-client's start_http_server on `address`). `address` is None when
# --metrics-addr is off/none.
def start_metrics(address: tuple[str, int] | None) -> None:
    if address is not None:
        log.info("metrics on %s:%d: not wired in this build", *address)


def serve(config: DriverConfig, endpoint: str,
          metrics: tuple[str, int] | None) -> int:
    path = socket_path(endpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by the server before this one
    node = Node(config)
    node.adopt()
    server = grpc.server(ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="csi"),
                         maximum_concurrent_rpcs=MAX_RPCS)
    # the generated registration functions carry no annotations
    csi_pb2_grpc.add_IdentityServicer_to_server(  # type: ignore[no-untyped-call]
        IdentityService(node), server)
    csi_pb2_grpc.add_NodeServicer_to_server(NodeService(node), server)  # type: ignore[no-untyped-call]
    if server.add_insecure_port(f"unix://{path}") == 0:
        raise UsageError(f"cannot listen on {path}")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    start_metrics(metrics)
    server.start()
    log.info("serving %s on %s (node %s, pid %d)", DRIVER_NAME, path, config.node_id,
             os.getpid())
    while not stop.wait(1.0):
        pass
    log.info("stopping; the mounts stay (their daemons run on)")
    server.stop(STOP_GRACE).wait()
    return 0
