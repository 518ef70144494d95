"""The `kitfs` command line.

Every failure a user can cause or meet (bad input, registry trouble, a full
disk) reaches the user as one line on stderr and a non-zero exit status; a
traceback means a bug in kitfs and is shown only with `--debug`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from kitfs import __version__
from kitfs.commands import (
    cache,
    csi,
    diff,
    info,
    init,
    inspect,
    login,
    logout,
    ls,
    mount,
    pack,
    pull,
    push,
    remove,
    sign,
    status,
    tag,
    umount,
    unpack,
    verify,
)
from kitfs.commands import list as list_
from kitfs.commands.command import Command
from kitfs.errors import KitfsError

log = logging.getLogger(__name__)

EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

MAIN_HELP = """\
Mount, pack and inspect KitOps ModelKits straight from OCI registries.

A reference is what `kit` takes: REGISTRY/REPO[:TAG][@DIGEST]. A first
path segment without '.' or ':' means kit's local storage (the ModelKits
`kit list` shows), e.g. `mymodel:v1`; `localhost:5000/mymodel:v1` and
`ghcr.io/org/model:v1` are registries. Registries on loopback are spoken to
over plain HTTP; others over HTTPS unless --plain-http.

examples:
  kitfs init ./my-model --name llama --desc "Llama fine-tune"
  kitfs pack ./my-model -t registry.example.com/team/llama:v1
  kitfs pull registry.example.com/team/llama:v1 && kitfs list
  kitfs tag registry.example.com/team/llama:v1 llama:v1
  kitfs push llama:v1 registry.example.com/other/llama:v1
  kitfs remove llama:v1
  kitfs mount registry.example.com/team/llama:v1 /mnt/llama
  kitfs inspect registry.example.com/team/llama:v1
  kitfs info -r registry.example.com/team/llama:v1 --filter package.name
  kitfs diff registry.example.com/team/llama:v1 registry.example.com/team/llama:v2
  kitfs ls registry.example.com/team/llama:v1 --filter model
  kitfs unpack registry.example.com/team/llama:v1 -d ./llama --filter model
  echo "$TOKEN" | kitfs login registry.example.com -u me --password-stdin
"""


def add_global_options(p: argparse.ArgumentParser) -> None:
    """The options every verb takes (kitfs-init and kitfs-kserve parse them too)."""
    p.add_argument("--config", metavar="DIR", dest="kitops_home",
                   help="kit's home directory (credentials, local storage); default "
                        "$KITOPS_HOME, else ~/.local/share/kitops")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for internal errors")


#: Every verb, in the order `kitfs --help` lists them.
COMMANDS: tuple[Command, ...] = (
    pack.COMMAND, init.COMMAND, pull.COMMAND, push.COMMAND, tag.COMMAND, list_.COMMAND,
    remove.COMMAND, inspect.COMMAND, info.COMMAND, diff.COMMAND, ls.COMMAND,
    unpack.COMMAND, login.COMMAND, logout.COMMAND, mount.COMMAND, umount.COMMAND,
    status.COMMAND,
    sign.COMMAND, verify.COMMAND,
    cache.COMMAND, csi.COMMAND,
)


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kitfs", description=MAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"kitfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in commands:
        p = sub.add_parser(command.name, help=command.help, description=command.description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_global_options(p)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="kitfs: %(levelname)s: %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return run_parsed(parser.parse_args(argv))


def run_parsed(args: argparse.Namespace) -> int:
    """Run a parsed verb, every failure one line and an exit status: shared with the
    container entrypoints (kitfs/entrypoint.py), which build their verb's arguments
    from the environment rather than from `kitfs`'s own command line."""
    _configure_logging(args.verbose)
    if isinstance(sys.stdout, io.TextIOWrapper):
        # Names and Kitfiles come from whoever packed the ModelKit: what the terminal's
        # encoding cannot show is printed escaped, never an internal error mid-listing.
        sys.stdout.reconfigure(errors="backslashreplace")
    if args.kitops_home:
        os.environ["KITOPS_HOME"] = str(Path(args.kitops_home).expanduser())
    try:
        run: Callable[[argparse.Namespace], int] = args.run
        return run(args)
    except KitfsError as exc:
        print(f"kitfs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kitfs: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `kitfs ls ... | head`: the reader left; say nothing, as other tools do.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:
        if args.debug:
            raise
        log.debug("internal error", exc_info=True)
        print(f"kitfs: internal error: {type(exc).__name__}: {exc} (rerun with --debug "
              "for a traceback, and please report it)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
