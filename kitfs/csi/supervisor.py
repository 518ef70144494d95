"""`kitfs csi`'s first process: keep the gRPC server running, never the mounts' owner.

It is PID 1 of the driver's container. It starts the server as a child,
restarts it with backoff when it dies, forwards SIGTERM/SIGINT to it, and
collects every process that ends below it: as a child subreaper it inherits
the daemons a dead server started (they keep serving their mounts) and reaps
them when a later server stops them. It holds no state, so it has nothing to
get wrong after a restart of the server.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
#: A server that ran this long before dying starts the backoff over.
HEALTHY_RUN = 60.0


def become_subreaper() -> None:
    """Inherit the orphans of every process below this one, to reap them (the mounter
    shares this: its daemons' own children)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("cannot become a child subreaper: %s", os.strerror(ctypes.get_errno()))


def supervise(argv: Sequence[str]) -> int:
    """Run `argv` (the server) until told to stop; return its last exit status."""
    become_subreaper()
    stopping = False
    server = 0

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if server:
            # It may have ended a moment ago, not yet reaped (a zombie takes the signal).
            with contextlib.suppress(ProcessLookupError):
                os.kill(server, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    backoff = BACKOFF_FIRST
    while True:
        started = time.monotonic()
        server = os.posix_spawn(argv[0], list(argv), os.environ)
        if stopping:  # the signal came while spawning
            os.kill(server, signal.SIGTERM)
        log.info("started the CSI server, pid %d", server)
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid == server:
                # At once: a reaped pid can be reused, and a signal must not reach another
                # process that took it.
                server = 0
                break
            log.info("reaped process %d (a daemon an earlier server started)", pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            return code if code >= 0 else 0
        if time.monotonic() - started > HEALTHY_RUN:
            backoff = BACKOFF_FIRST
        log.warning("the CSI server (pid %d) exited with status %d; restarting in %gs "
                    "(the mounts stay)", pid, code, backoff)
        deadline = time.monotonic() + backoff
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        if stopping:
            return 0
        backoff = min(backoff * 2, BACKOFF_MAX)


def server_argv() -> list[str]:
    """This command again, as the server: `python -m kitfs.cli csi ... --serve`."""
    return [sys.executable, "-m", "kitfs.cli", *sys.argv[1:], "--serve"]
