"""Whether a mount is healthy, judged from its state file alone, in one place.

`kitfs status` (its HEALTH column and `--check`), the metrics endpoint
(`kitfs_mount_healthy`) and the CSI driver's Probe all ask this, so they
never disagree. A mount is unhealthy when its daemon is gone, when its
state stopped being refreshed (the daemon writes it every second: a stale
one means its event loop is stuck), when a layer is poisoned (its bytes did
not match their digest: reads of its files fail), or when it cannot reach
a registry it fetches from (the last request there got no answer or a
server error, and none was answered since; a client error such as a 404 is
an answer: see oci/stats.py). The daemon re-checks such a registry in the
background, so health comes back without a reader having to try.

Pure: nothing here reads files or imports more than the state's shape.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kitfs.mounts import MountState

#: A live daemon's state older than this is stale (it is refreshed every second).
STALE_AFTER_S = 10.0


@dataclass(frozen=True)
class Health:
    healthy: bool
    problems: list[str] = field(default_factory=list)


def mount_health(state: MountState, now: float, *, alive: bool | None = None) -> Health:
    """The health of the mount `state` describes at Unix time `now`.

    `alive`: whether its daemon runs, if the caller knows already (else the
    state is asked, which looks the pid up in /proc).
    """
    problems: list[str] = []
    if not (state.alive if alive is None else alive):
        problems.append(f"daemon (pid {state.pid}) is not running; `kitfs umount "
                        f"{state.mountpoint}` cleans up")
        return Health(False, problems)
    if state.updated and now - state.updated > STALE_AFTER_S:
        problems.append(f"state not refreshed for {now - state.updated:.0f}s: the daemon "
                        f"(pid {state.pid}) is stuck")
    engine = state.status.get("engine") if isinstance(state.status, dict) else None
    if isinstance(engine, dict):
        problems += _poisoned(engine)
        problems += _unreachable(engine)
    return Health(not problems, problems)


def _poisoned(engine: dict[str, Any]) -> list[str]:
    found = []
    for layer in _dicts(engine.get("layers")):
        if layer.get("state") == "poisoned":
            what = layer.get("path") or layer.get("kind") or "layer"
            reason = f": {layer['reason']}" if layer.get("reason") else ""
            found.append(f"layer {layer.get('digest')} ({what}) is poisoned{reason}")
    return found


def _unreachable(engine: dict[str, Any]) -> list[str]:
    found = []
    for registry in _dicts(engine.get("registry")):
        if registry.get("answering") is not False:
            continue
        outcome = registry.get("last_outcome")
        at = registry.get("last_failure")
        when = f" at {_clock(at)}" if isinstance(at, int | float) else ""
        found.append(f"registry {registry.get('registry')} {_VERDICT.get(str(outcome), outcome)}"
                     f" (last request failed{when}, none answered since): "
                     f"{registry.get('last_error')}")
    return found


_VERDICT = {"connection_error": "unreachable", "timeout": "not answering",
            "server_error": "failing"}


def _dicts(value: object) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _clock(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%H:%M:%SZ")
