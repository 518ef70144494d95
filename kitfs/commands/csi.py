"""`kitfs csi`: the Kubernetes CSI node driver (Identity and Node services).

Run twice, like `kitfs mount`: once as the supervisor (the container's first
process), which starts this command again with --serve as the gRPC server and
restarts it if it dies. What only the server needs (grpc, the stubs) is
imported in `run`.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path

from kitfs.commands.command import Command
from kitfs.commands.common import add_network_options, client_options, daemon_env
from kitfs.errors import UsageError
from kitfs.units import parse_cache_size

DEFAULT_ENDPOINT = "unix:///csi/csi.sock"
DEFAULT_STATE_DIR = "/run/kitfs/csi"
DEFAULT_STAGING_DIR = "/var/lib/kubelet/plugins/kitfs.kitops.org/volumes"
DEFAULT_METRICS_ADDR = ":9810"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, metavar="ENDPOINT",
                   help=f"the Unix socket kubelet dials (default {DEFAULT_ENDPOINT}; a plain "
                        "path works too)")
    p.add_argument("--node-id", metavar="ID", help="this node's id (default: the host name)")
    p.add_argument("--cache-dir", default="/var/cache/kitfs", metavar="DIR",
                   help="the node's chunk caches, one per repository (DIR/repos/<hash>), "
                        "shared by that repository's volumes (default /var/cache/kitfs)")
    p.add_argument("--cache-size", metavar="SIZE",
                   help="bound each repository's chunk cache under --cache-dir: its daemons "
                        "evict least-recently-used chunks beyond this much disk (default: "
                        "none, no limit; recommended: the cache volume's size divided by the "
                        "number of repositories a node serves at once, with 20%% to spare)")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR",
                   help=f"the driver's records of volumes and daemons (default "
                        f"{DEFAULT_STATE_DIR})")
    p.add_argument("--staging-dir", default=DEFAULT_STAGING_DIR, metavar="DIR",
                   help="where shared daemons mount before the bind mounts into pods "
                        f"(default {DEFAULT_STAGING_DIR})")
    p.add_argument("--metrics-addr", default=DEFAULT_METRICS_ADDR, metavar="HOST:PORT",
                   help=f"serve Prometheus metrics here (default {DEFAULT_METRICS_ADDR}); "
                        "off or none disables them")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    add_network_options(p)


def parse_metrics_addr(text: str) -> tuple[str, int] | None:
    """`HOST:PORT`, `:PORT` (every interface); None for off/none."""
    if text.strip().lower() in ("off", "none", ""):
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--metrics-addr {text}: use HOST:PORT, :PORT, or off")
    return host.strip("[]"), int(port)


def _logging(verbose: int) -> None:
    """The driver's log is its container's: timestamps, INFO and up (debug with -vv)."""
    logging.basicConfig(
        force=True, level=logging.DEBUG if verbose >= 2 else logging.INFO,
        format="%(asctime)s kitfs-csi[%(process)d] %(levelname)s: %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    metrics = parse_metrics_addr(args.metrics_addr)
    cache_size = parse_cache_size(args.cache_size)  # a bad size fails before the server
    options = client_options(args)
    _logging(args.verbose)
    if not args.serve:
        from kitfs.csi.server import socket_path
        from kitfs.csi.supervisor import server_argv, supervise

        socket_path(args.endpoint)  # a bad endpoint fails here, not in a restart loop
        return supervise(server_argv())

    from kitfs.csi.node import DriverConfig
    from kitfs.csi.server import serve

    def absolute(text: str) -> Path:
        return Path(os.path.abspath(Path(text).expanduser()))

    config = DriverConfig(
        node_id=args.node_id or socket.gethostname(),
        state_dir=absolute(args.state_dir), staging_dir=absolute(args.staging_dir),
        cache_dir=absolute(args.cache_dir), cache_size=cache_size, client=options,
        daemon_env=daemon_env(options), verbose=args.verbose,
    )
    return serve(config, args.endpoint, metrics)


COMMAND = Command(
    name="csi",
    help="run the Kubernetes CSI node driver (kitfs.kitops.org)",
    description="""\
Serve the CSI Identity and Node services on a Unix socket for kubelet, so
that pods mount ModelKits as inline ephemeral volumes:

  volumes:
    - name: model
      csi:
        driver: kitfs.kitops.org
        readOnly: true
        volumeAttributes: {reference: ghcr.io/org/model:v1, filter: model}

Pods on one node asking for the same manifest digest in the same repository
(and filter, verify, prefetch) share one daemon; the daemons of one repository
share its chunk cache (never another repository's: access is granted per
repository). The
daemons run outside this process: killing or restarting the driver leaves
the mounts serving, and the next driver adopts them from --state-dir.
Meant to run in the DaemonSet of deploy/kubernetes/.

examples:
  kitfs csi --endpoint unix:///csi/csi.sock --node-id "$NODE_NAME"
  kitfs csi --endpoint /tmp/csi.sock --state-dir /tmp/csi-state --metrics-addr off
""",
    add_arguments=add_arguments,
    run=run,
)
