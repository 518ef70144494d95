"""`kitfs umount`: stop a mount's daemon, or clean up after one that died."""

from __future__ import annotations

import argparse

from kitfs.commands.command import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for the daemon to exit (default: 30)")


def run(args: argparse.Namespace) -> int:
    from kitfs.mounts import absolute_mountpoint, umount

    print(umount(absolute_mountpoint(args.mountpoint), timeout=args.wait))
    return 0


COMMAND = Command(
    name="umount",
    help="unmount a ModelKit mount and stop its daemon",
    description="""\
Stop the daemon serving MOUNTPOINT and wait until the mount is gone. If the
daemon died (killed, crashed), the stale mount (every access fails with
"Transport endpoint is not connected") is detached and its state removed.

examples:
  kitfs umount /mnt/llama
""",
    add_arguments=add_arguments,
    run=run,
)
