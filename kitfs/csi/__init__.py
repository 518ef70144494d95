"""A Kubernetes CSI node driver serving ModelKits as inline ephemeral volumes.

The only package that imports grpc. The generated stubs (csi_pb2*) come from
csi.proto by scripts/gen-csi; the rest is split by what it holds: identity.py
and node.py (the two gRPC services), volumes.py (the driver's records on disk),
binds.py (bind mounts), codes.py (errors to gRPC status codes), server.py (the
gRPC server), supervisor.py (the process that keeps the server running),
mounter.py (the process in another pod that starts the mount daemons, and its
client; it imports no grpc) and sockets.py (endpoint paths).
"""

from __future__ import annotations

#: The CSI driver name: reverse-domain, as the spec asks; the CSIDriver object and
#: every pod's `csi.driver` field name it.
DRIVER_NAME = "kitfs.kitops.org"
#: How long the mounter waits for a daemon's ready line (resolving, fetching the
#: manifest and mounting take seconds) before it stops the daemon; kubelet retries a
#: publish that fails. `kitfs csi mounter --launch-wait` changes it. Here, not in
#: mounter.py, so that `kitfs --help` need not import the mounter to show it.
LAUNCH_WAIT = 300.0
