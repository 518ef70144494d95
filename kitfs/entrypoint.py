"""What kitfs-init and kitfs-kserve share: kit's container contracts, run as `kitfs unpack`.

kit ships two images whose entrypoints are shell scripts around `kit unpack`
(build/dockerfiles/init/entrypoint.sh, build/dockerfiles/KServe/entrypoint.sh):
settings come from environment variables and a storage URI, extra `kit unpack`
flags from one variable that the shell splits. kitfs serves the same
contracts in-process: the flags are parsed by the very argument parser of
`kitfs unpack` (commands/unpack.py) and the parsed command is run the way
`kitfs` runs it (cli.run_parsed), so the two can never disagree about a flag.

Lines for the container log go to stdout, flushed at once (a pod's log is a
pipe, and a killed container keeps only what was flushed); the one-line error
goes to stderr, as `kitfs` prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NoReturn

from kitfs import __version__
from kitfs.errors import KitfsError, UsageError

#: Refused in a flags variable with a word of why: `--help` would print help and exit 0,
#: an init container that "succeeded" without unpacking anything.
_HELP_FLAGS = ("-h", "--help")

#: How often a container's log gets a progress line ($KITFS_PROGRESS_LINES overrides it).
PROGRESS_LINES_SECONDS = "10"


class _FlagsParser(argparse.ArgumentParser):
    """`kitfs unpack`'s parser that reports a bad flag as one line naming the variable."""

    def __init__(self, variable: str) -> None:
        super().__init__(prog=variable, add_help=False, allow_abbrev=False)
        self.variable = variable

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.variable}: {shown_flags(message.split(' '))}")


def shown_flags(words: list[str]) -> str:
    """Flags as the log shows them: a password in a URL (`--proxy=http://me:pw@host`)
    masked. kit's scripts echo the variable as it is; kitfs logs no secret."""
    from kitfs.oci.proxy import mask_url

    def one(word: str) -> str:
        flag, eq, value = word.partition("=")
        return f"{flag}={mask_url(value)}" if eq and flag.startswith("-") else mask_url(word)

    return " ".join(one(word) for word in words)


def unpack_parser(variable: str) -> argparse.ArgumentParser:
    """The arguments of `kitfs unpack` (and the options every verb takes), for flags that
    come from the environment variable `variable`. `--dir` defaults to None here so
    the caller can tell whether the flags named a directory."""
    from kitfs.cli import add_global_options
    from kitfs.commands import unpack

    parser = _FlagsParser(variable)
    add_global_options(parser)
    unpack.COMMAND.add_arguments(parser)
    parser.set_defaults(dir=None, run=unpack.COMMAND.run)
    return parser


def split_flags(variable: str, environ: Mapping[str, str]) -> list[str]:
    """The variable's flags split as a shell splits words (kit's scripts use bash's
    `read -a`, which splits on blanks only; quotes here group words as in a shell)."""
    text = environ.get(variable, "")
    try:
        flags = shlex.split(text)
    except ValueError as exc:
        raise UsageError(f"{variable}: cannot split {text!r}: {exc}") from None
    for flag in flags:
        if flag in _HELP_FLAGS:
            raise UsageError(f"{variable}: {flag} makes no sense here (it unpacks nothing)")
    return flags


def parse_unpack(variable: str, flags: list[str], reference: str,
                 first: tuple[str, ...] = ()) -> argparse.Namespace:
    """`kitfs unpack` arguments: `first` (the contract's own flags), then the user's
    `flags` from `variable` (so a flag given twice takes the user's value, as kit's
    scripts do), then the reference after `--` (so no reference reads as a flag)."""
    args, unknown = unpack_parser(variable).parse_known_args([*first, *flags, "--", reference])
    if args.reference != reference:
        # A word of the flags took the reference's place (and the reference is "unknown").
        raise UsageError(f"{variable}: unexpected argument {shown_flags([args.reference])!r}: "
                         "only flags go here, the reference is given apart")
    if unknown:
        raise UsageError(f"{variable}: unrecognized arguments: {shown_flags(unknown)}")
    return args


def required(environ: Mapping[str, str], name: str) -> str:
    value = environ.get(name, "").strip()
    if not value:
        raise UsageError(f"environment variable ${name} is required")
    return value


def say(line: str) -> None:
    """One line of the container log, flushed at once."""
    print(line, flush=True)


def say_version(prog: str) -> None:
    """kit's scripts print `kit version` first: which build ran is in the log."""
    say(f"{prog}: kitfs {__version__} (python {sys.version.split()[0]})")


def term_as_interrupt() -> None:
    """A pod that is deleted gets SIGTERM: treat it as Ctrl-C, so the unpack removes its
    temporary files and a private credentials home is removed (SIGINT goes through
    trio's own handling; raising from this handler would not)."""
    signal.signal(signal.SIGTERM, lambda _signo, _frame: os.kill(os.getpid(), signal.SIGINT))


@contextlib.contextmanager
def scratch_directory() -> Iterator[Path]:
    """A directory of this run's own (0700), removed with what it holds on exit: kserve's
    credentials home and, unless one is chosen, the chunk cache. Kept in an init
    container's writable layer, a cache as big as the model would stay on the node's
    ephemeral storage, counted against the pod, for as long as the pod lives."""
    path = Path(tempfile.mkdtemp(prefix="kitfs-entry-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_entry(prepare: Callable[[Path], argparse.Namespace],
              after: Callable[[argparse.Namespace], None] | None = None) -> int:
    """Parse the contract with `prepare` (given a scratch directory), run the unpack as
    `kitfs` runs a verb, and say how it went; every failure is one line on stderr and a
    non-zero status."""
    from kitfs.cli import EXIT_INTERRUPTED, run_parsed
    from kitfs.progress import LINES_ENV

    # Nobody watches a terminal bar in a pod; `kubectl logs` shows lines.
    os.environ.setdefault(LINES_ENV, PROGRESS_LINES_SECONDS)
    with scratch_directory() as scratch:
        try:
            args = prepare(scratch)
        except KitfsError as exc:
            print(f"kitfs: error: {exc}", file=sys.stderr, flush=True)
            return exc.exit_code
        except KeyboardInterrupt:
            print("kitfs: interrupted", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        if args.cache_dir is None and not os.environ.get("KITFS_CACHE_DIR"):
            args.cache_dir = str(scratch / "cache")
        start = time.monotonic()
        status = run_parsed(args)
    if status == 0:
        say(f"Unpacked {args.reference} to {args.dir} in {time.monotonic() - start:.1f}s")
        if after is not None:
            after(args)
    return status
