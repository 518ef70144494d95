"""`kitfs csi`: the Kubernetes CSI node driver (Identity and Node services).

Run twice, like `kitfs mount`: once as the supervisor (the container's first
process), which starts this command again with --serve as the gRPC server and
restarts it if it dies. `kitfs csi mounter` is the other DaemonSet's process,
which starts the mount daemons for the driver (kitfs/csi/mounter.py). What
only the server needs (grpc, the stubs) is imported in `run`.
"""

from __future__ import annotations

import argparse
import logging
import socket

from kitfs.commands.command import Command
from kitfs.commands.common import (
    absolute_path,
    add_network_options,
    client_options,
    daemon_env,
)
from kitfs.csi import LAUNCH_WAIT
from kitfs.errors import UsageError
from kitfs.units import parse_cache_size

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "unix:///csi/csi.sock"
DEFAULT_STATE_DIR = "/run/kitfs/csi"
#: Under /var/lib/kubelet (the Bidirectional mount, so the FUSE mounts reach the host) but
#: outside the plugin dir kubelet's sidecars mount with private propagation: each of
#: their starts would copy every live FUSE mount there into a namespace nobody cleans.
DEFAULT_STAGING_DIR = "/var/lib/kubelet/kitfs/volumes"
DEFAULT_CACHE_DIR = "/var/cache/kitfs"
DEFAULT_METRICS_ADDR = ":9810"
DEFAULT_MOUNTER_SOCKET = "unix:///run/kitfs/mounter.sock"

MOUNTER_DESCRIPTION = """\
Start the kitfs mount daemons for the CSI driver of this node, so that they
live outside the driver's container: an upgrade or restart of the driver
leaves running pods' mounts serving. The driver (`kitfs csi --mounter
SOCKET`) asks over a root-only Unix socket, in plain fields (protocol v1);
this process builds each `kitfs mount ... --foreground` command line itself,
mounting only at STAGING-DIR/<key>/mnt, caching only under --cache-dir, and
passing on only the proxy and CA variables of the driver's environment. It
answers with each daemon's ready line, stops a daemon not mounted within
--launch-wait, and reaps them when the driver stops them. Stopping it leaves
the daemons running, but in Kubernetes its container's end kills them: it
runs in the kitfs-mounter DaemonSet (deploy/kubernetes/mounter.yaml),
upgraded by drain. Give it the driver's directories (the defaults are the
driver's) and the driver's node credentials as its KITOPS_HOME.

examples:
  kitfs csi mounter --socket unix:///run/kitfs/mounter.sock
  kitfs csi mounter --socket /tmp/mounter.sock --staging-dir /tmp/csi/staging \\
      --cache-dir /tmp/csi/cache --state-dir /tmp/csi/state
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, metavar="ENDPOINT",
                   help=f"the Unix socket kubelet dials (default {DEFAULT_ENDPOINT}; a plain "
                        "path works too)")
    p.add_argument("--node-id", metavar="ID", help="this node's id (default: the host name)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, metavar="DIR",
                   help="the node's chunk caches, one per repository (DIR/repos/<hash>), "
                        f"shared by that repository's volumes (default {DEFAULT_CACHE_DIR})")
    p.add_argument("--cache-size", metavar="SIZE",
                   help="bound each repository's chunk cache under --cache-dir: its daemons "
                        "evict least-recently-used chunks beyond this much disk (default: "
                        "none, no limit; recommended: the cache volume's size divided by the "
                        "number of repositories a node serves at once, with 20%% to spare)")
    p.add_argument("--cache-scope", choices=("repository", "node"), default="repository",
                   help="repository (default): one chunk cache per repository, so that a "
                        "pod reads cached bytes only of repositories it proved access to; "
                        "node: one cache for every volume (less disk and download when "
                        "repositories share layers) - only where every pod on the node may "
                        "read every model any of them uses")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR",
                   help=f"the driver's records of volumes and daemons (default "
                        f"{DEFAULT_STATE_DIR})")
    p.add_argument("--staging-dir", default=DEFAULT_STAGING_DIR, metavar="DIR",
                   help="where shared daemons mount before the bind mounts into pods "
                        f"(default {DEFAULT_STAGING_DIR})")
    p.add_argument("--metrics-addr", default=DEFAULT_METRICS_ADDR, metavar="HOST:PORT",
                   help=f"serve Prometheus metrics here (default {DEFAULT_METRICS_ADDR}); "
                        "off or none disables them")
    p.add_argument("--trusted-root", metavar="FILE",
                   help="sigstore trusted_root.json for volumes whose attributes ask for a "
                        "signature (keyless ones need it; keyed ones check their "
                        "transparency-log entry with it)")
    p.add_argument("--mounter", metavar="SOCKET",
                   help="have the `kitfs csi mounter` at this socket start the mount "
                        f"daemons (e.g. {DEFAULT_MOUNTER_SOCKET}), so that they outlive "
                        "this driver's container; default: start them here")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    add_network_options(p)
    roles = p.add_subparsers(dest="role", metavar="[mounter]", title="the other role",
                             description="without it, this runs the driver")
    mounter = roles.add_parser(
        "mounter", help="run the mounter: the process that owns the mount daemons",
        description=MOUNTER_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    mounter.add_argument("--socket", default=DEFAULT_MOUNTER_SOCKET, metavar="SOCKET",
                         help=f"where the driver asks (default {DEFAULT_MOUNTER_SOCKET}; "
                              "a plain path works too)")
    # The driver's directories, as the driver's own flags (same defaults): a request
    # naming anything outside them is refused.
    mounter.add_argument("--staging-dir", default=DEFAULT_STAGING_DIR, metavar="DIR",
                         help="the driver's --staging-dir: daemons mount only at "
                              f"DIR/<key>/mnt (default {DEFAULT_STAGING_DIR})")
    mounter.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, metavar="DIR",
                         help="the driver's --cache-dir: daemons cache only under it "
                              f"(default {DEFAULT_CACHE_DIR})")
    mounter.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR",
                         help="the driver's --state-dir: daemons read per-volume "
                              f"credentials only from DIR/homes/<key> (default "
                              f"{DEFAULT_STATE_DIR}); else this process's kit home")
    mounter.add_argument("--launch-wait", type=float, default=LAUNCH_WAIT, metavar="SECONDS",
                         help="stop a daemon that is not mounted this long after its start "
                              f"(default {LAUNCH_WAIT:g})")
    mounter.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                         help="log more (-vv: debug)")


def metrics_address(text: str) -> str | None:
    """--metrics-addr checked (kitfs.metrics.parse_addr's rules); None for off/none."""
    if text.strip().lower() in ("off", "none", ""):
        return None
    from kitfs.metrics import parse_addr

    parse_addr(text)
    return text


def _logging(verbose: int, name: str = "kitfs-csi") -> None:
    """The driver's log is its container's: timestamps, INFO and up (debug with -vv)."""
    logging.basicConfig(
        force=True, level=logging.DEBUG if verbose >= 2 else logging.INFO,
        format=f"%(asctime)s {name}[%(process)d] %(levelname)s: %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    from kitfs.csi.sockets import socket_path

    if args.role == "mounter":
        from kitfs.csi.mounter import Bounds
        from kitfs.csi.mounter import serve as serve_mounter

        path = socket_path(args.socket, "--socket")
        if not args.launch_wait > 0:
            raise UsageError("--launch-wait must be positive")
        _logging(args.verbose, "kitfs-mounter")
        return serve_mounter(path, Bounds(
            staging_dir=absolute_path(args.staging_dir), cache_dir=absolute_path(args.cache_dir),
            state_dir=absolute_path(args.state_dir), launch_wait=args.launch_wait))
    metrics = metrics_address(args.metrics_addr)
    cache_size = parse_cache_size(args.cache_size)  # a bad size fails before the server
    options = client_options(args)
    # bad sockets fail here, not in a restart loop
    mounter = socket_path(args.mounter, "--mounter") if args.mounter else None
    socket_path(args.endpoint)
    if args.trusted_root:
        from kitfs.enforcement import read_file
        from kitfs.signing.policy import load_root

        load_root(args.trusted_root, "--trusted-root", read_file)  # a bad file fails at start
    _logging(args.verbose)
    if not args.serve:
        from kitfs.csi.supervisor import server_argv, supervise

        return supervise(server_argv())

    from kitfs.csi.node import DriverConfig
    from kitfs.csi.server import serve

    if args.cache_scope == "node":
        log.warning("--cache-scope node: every volume on this node shares one chunk cache, "
                    "so a pod can read cached bytes of a private ModelKit by naming a "
                    "registry of its own that claims the same digests; use it only where "
                    "every pod on the node may read every model any of them uses")

    config = DriverConfig(
        node_id=args.node_id or socket.gethostname(),
        state_dir=absolute_path(args.state_dir), staging_dir=absolute_path(args.staging_dir),
        cache_dir=absolute_path(args.cache_dir), cache_size=cache_size,
        cache_scope=args.cache_scope, client=options,
        daemon_env=daemon_env(options), verbose=args.verbose, mounter=mounter,
        trusted_root=str(absolute_path(args.trusted_root)) if args.trusted_root else None,
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
repository). The daemons run outside the gRPC server: killing it leaves the
mounts serving, and the next server adopts them from --state-dir. With
--mounter, the daemons are started by `kitfs csi mounter` in another
container, so that a restart or upgrade of this driver's container leaves
them serving too. Meant to run in the DaemonSets of deploy/kubernetes/.

Signatures: a volume with the attribute signatureKey (a cosign public key's
PEM text), or signatureIdentity and signatureIssuer (keyless, with
--trusted-root), is published only when the digest its reference resolves
to carries a valid cosign signature (signatureIgnoreTlog: "true" accepts
keyed signatures without a transparency-log entry); the node's
/etc/kitfs/policy.yaml ($KITFS_POLICY) is applied to every volume as well.
A refused volume fails its publish with PERMISSION_DENIED and the reason.

examples:
  kitfs csi --endpoint unix:///csi/csi.sock --node-id "$NODE_NAME" \\
      --mounter unix:///run/kitfs/mounter.sock
  kitfs csi mounter --socket unix:///run/kitfs/mounter.sock
  kitfs csi --endpoint /tmp/csi.sock --state-dir /tmp/csi-state --metrics-addr off
""",
    add_arguments=add_arguments,
    run=run,
)
