"""`kitfs status`: every kitfs mount and what its daemon is doing."""

from __future__ import annotations

import argparse
import sys

from kitfs.commands.command import Command

TYPE_CHECKING = False  # typing's, without importing typing: command.py says why
if TYPE_CHECKING:
    from kitfs.health import Health
    from kitfs.mounts import MountState


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list with one object per mount")
    p.add_argument("--check", action="store_true",
                   help="exit with status 1 when any mount listed is unhealthy (for systemd "
                        "and monitoring scripts); the output says why")


def _status_doc(state: MountState, mounted: bool, alive: bool, health: Health
                ) -> dict[str, object]:
    return {
        "mountpoint": state.mountpoint, "reference": state.reference, "digest": state.digest,
        "pid": state.pid, "alive": alive, "mounted": mounted,
        "healthy": health.healthy, "problems": health.problems,
        "started": _iso(state.started), "updated": _iso(state.updated) if state.updated else None,
        "files": state.files, "size": state.size, "filters": state.filters,
        "cacheDir": state.cache_dir, "log": state.log, "status": state.status,
        "signatures": state.signatures,
    }


def _iso(t: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds")


def _flatten(prefix: str, value: object, out: list[str]) -> None:
    if isinstance(value, dict) and "buckets" in value and "count" in value:
        # A latency histogram (fs/latency.py): its count and mean, not fifteen buckets.
        count, total = value.get("count") or 0, value.get("sum") or 0.0
        mean = f" mean={1000 * total / count:.2f}ms" if count else ""
        out.append(f"{prefix} count={count}{mean}")
    elif isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, dict):  # e.g. one line per layer
                fields = " ".join(f"{k}={v}" for k, v in item.items() if v not in (None, ""))
                out.append(f"{prefix}[{i}] {fields}")
            else:
                out.append(f"{prefix}[{i}]={item}")
    elif value is not None:
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        out.append(f"{prefix}={shown}")


def run(args: argparse.Namespace) -> int:
    import json
    import time

    from kitfs.health import mount_health
    from kitfs.mounts import MountError, absolute_mountpoint, all_states, mount_table, read_state
    from kitfs.units import human_bytes

    mounted = {m.mountpoint for m in mount_table()}
    if args.mountpoint:
        mountpoint = absolute_mountpoint(args.mountpoint)
        state = read_state(mountpoint)
        if state is None:
            raise MountError(f"no kitfs mount at {mountpoint}")
        states = [state]
    else:
        states = all_states()
    now = time.time()
    alive = [s.alive for s in states]
    healths = [mount_health(s, now, alive=a) for s, a in zip(states, alive, strict=True)]
    docs = [_status_doc(s, s.mountpoint in mounted, a, h)
            for s, a, h in zip(states, alive, healths, strict=True)]
    verdict = 1 if args.check and not all(h.healthy for h in healths) else 0
    if args.json:
        json.dump(docs, sys.stdout, indent=2)
        print()
        return verdict
    if not docs:
        print("no kitfs mounts")
        return 0
    width = max(len("MOUNTPOINT"), *(len(str(d["mountpoint"])) for d in docs))
    print(f"{'MOUNTPOINT':<{width}}  {'STATE':<8} {'HEALTH':<9} {'PID':>7}  {'FILES':>6} "
          f"{'SIZE':>10}  REFERENCE")
    for d, s in zip(docs, states, strict=True):
        state_name = "mounted" if d["alive"] and d["mounted"] else (
            "starting" if d["alive"] else "dead")
        health = "ok" if d["healthy"] else "unhealthy"
        print(f"{s.mountpoint:<{width}}  {state_name:<8} {health:<9} {s.pid:>7}  {s.files:>6} "
              f"{human_bytes(s.size):>10}  {s.reference}")
    for h, s in zip(healths, states, strict=True):
        counters: list[str] = []
        _flatten("", s.status, counters)
        print(f"\n{s.mountpoint}  {s.digest}")
        for problem in h.problems:
            print(f"  unhealthy: {problem}")
        for line in s.signatures:
            print(f"  signed: {line}")
        for line in counters:
            print(f"  {line}")
    return verdict


COMMAND = Command(
    name="status",
    help="show kitfs mounts and what their daemons are doing",
    description="""\
List every kitfs mount of this user (root: of the machine), or just the one
at MOUNTPOINT: reference, digest, daemon pid and whether it is alive, and
the engine's counters (bytes fetched and served, cache hits, prefetch
progress, layer verification, registry requests), and the signatures that
were checked before it was mounted, if any were required. A mount whose daemon died
shows as `dead`: `kitfs umount` cleans it up.

HEALTH is `unhealthy` when the daemon is dead or stuck (its state not
refreshed for 10s), a layer is poisoned (its bytes did not match their
digest), or the registry cannot be reached (its last request got no
answer or a 5xx, and none was answered since; the daemon asks it again
every 20s, so health comes back with the registry). The problems are
listed under the mount, and in --json as "healthy" and "problems". With
--check, the exit status is 1 when any mount listed is unhealthy, else 0.

examples:
  kitfs status
  kitfs status /mnt/llama --check || systemctl restart model-server
  kitfs status /mnt/llama --json | jq '.[0].status.engine.hit_rate'
""",
    add_arguments=add_arguments,
    run=run,
)
