"""Unix socket endpoints as the CSI world writes them, shared by the gRPC server and the
mounter (which must not import grpc just to parse a path)."""

from __future__ import annotations

from pathlib import Path

from kitfs.errors import UsageError


def socket_path(endpoint: str, flag: str = "--endpoint") -> Path:
    """`unix:///csi/csi.sock`, `unix:/csi/csi.sock` or a plain absolute path."""
    path = endpoint
    for prefix in ("unix://", "unix:"):
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    if not path.startswith("/"):
        raise UsageError(f"{flag} {endpoint}: use unix:///ABSOLUTE/PATH or an absolute path")
    return Path(path)
