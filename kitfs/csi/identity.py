"""The CSI Identity service: who the driver is, and whether it and its mounts are well."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from kitfs import __version__
from kitfs.csi import DRIVER_NAME, csi_pb2, csi_pb2_grpc
from kitfs.csi.codes import answer_unimplemented, rpc
from kitfs.csi.node import Node
from kitfs.health import mount_health
from kitfs.mounts import read_state

log = logging.getLogger(__name__)


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    @rpc
    def GetPluginInfo(self, request: Any, context: Any) -> Any:
        return csi_pb2.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=__version__)

    @rpc
    def GetPluginCapabilities(self, request: Any, context: Any) -> Any:
        # A node-only plugin: no CONTROLLER_SERVICE, no topology.
        return csi_pb2.GetPluginCapabilitiesResponse()

    @rpc
    def Probe(self, request: Any, context: Any) -> Any:
        """Ready while every daemon this driver manages serves a healthy mount.

        Not ready is a report, not a reason to restart the driver: a restart of its
        container would end every daemon in it (see the README's Kubernetes section).
        Reads state files only: the sidecar gives up after 3 s, so the unused daemons
        that would not stop are the sweeper's last finding, not a new attempt.
        """
        unhealthy = [f"{reference} (unused, will not stop)"
                     for reference in self.node.unused]
        now = time.time()
        for daemon in self.node.records.daemons():
            state = read_state(Path(daemon.mountpoint))
            if state is None:
                unhealthy.append(f"{daemon.reference}: its daemon left no state")
                continue
            health = mount_health(state, now)
            if not health.healthy:
                unhealthy.append(f"{daemon.reference}: {'; '.join(health.problems)}")
        if unhealthy:
            log.warning("probe: unhealthy mounts: %s", " | ".join(unhealthy))
        response = csi_pb2.ProbeResponse()
        response.ready.value = not unhealthy
        return response


answer_unimplemented(IdentityService, csi_pb2_grpc.IdentityServicer)
