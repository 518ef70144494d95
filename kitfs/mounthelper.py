"""`mount.fuse.kitfs`: the helper mount(8) runs for `-t fuse.kitfs` (fstab, systemd .mount).

For a type with a subtype, util-linux runs `/sbin/mount.fuse.kitfs SPEC DIR
[-sfnv] [-o OPTIONS]`, always with `rw` or `ro` first in OPTIONS, `_netdev`
and `nofail` kept, `x-*`, `comment=` and `noauto` already taken out (checked
against util-linux 2.38). systemd's .mount units run mount(8) the same way.
The helper turns OPTIONS into `kitfs mount` flags and runs that command in
this process (`kitfs.cli.main`), so both read one parser: the daemon starts
detached, and the helper returns only once the files answer, which is when
mount(8) and systemd must see the mount.

An fstab field cannot hold a comma and kit's filter syntax is built on them
(`model,docs:readme`), so a filter may be written in double quotes, which
libmount keeps together (`filter="model,docs:a,b"`), or with `+` for each
comma between type names (`filter=model+docs`). Only there: after the `:`
come names and paths, which may hold a `+` of their own (`filter=code:c++`
keeps it), so several of them need the double quotes.

Each value goes to `kitfs mount` as `--flag=VALUE`, one word, so that a value
starting with `-` is never read as a flag of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import getopt
import io
import sys
from collections.abc import Sequence

from kitfs.errors import UsageError

PROG = "mount.fuse.kitfs"

#: -o NAME=VALUE -> the `kitfs mount` flag that takes VALUE.
VALUE_OPTIONS = {
    "cache_dir": "--cache-dir",
    "cache_size": "--cache-size",
    "memory": "--memory",
    "filter": "--filter",
    "prefetch": "--prefetch",
    "verify": "--verify",
    "timeout": "--timeout",
    "config": "--config",
    "tls_verify": "--tls-verify",
    "ca_file": "--ca-file",
    "cert": "--cert",
    "key": "--key",
    "proxy": "--proxy",
    "metrics_addr": "--metrics-addr",
    "signature_key": "--signature-key",
    "signature_identity": "--signature-identity",
    "signature_issuer": "--signature-issuer",
    "trusted_root": "--trusted-root",
}

#: -o NAME -> the `kitfs mount` switch.
SWITCH_OPTIONS = {"allow_other": "--allow-other", "plain_http": "--plain-http",
                  "insecure_ignore_tlog": "--insecure-ignore-tlog"}

#: What mount(8), systemd and fstab conventions put in OPTIONS that means nothing to kitfs:
#: the mount is always read-only, nosuid and nodev, so `rw` (which mount(8) adds whenever
#: `ro` is missing), `suid` and `dev` cannot change it.
GENERIC_OPTIONS = frozenset({
    "ro", "rw", "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group",
    "_netdev", "nofail", "dev", "nodev", "suid", "nosuid", "exec", "async", "sync",
    "atime", "noatime", "relatime", "nodiratime", "strictatime", "lazytime", "nolazytime",
    "loud", "silent",
})
#: Prefixes of options meant for others: systemd's and mount(8)'s own, comments, the
#: `user=NAME` libmount records for user mounts.
GENERIC_PREFIXES = ("x-", "X-", "comment=", "user=")


def split_options(text: str) -> list[str]:
    """OPTIONS split at commas outside double quotes, as libmount splits them; quotes dropped."""
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    if quoted:
        raise UsageError(f"-o {text}: unbalanced double quote")
    out.append("".join(current))
    return [o for o in out if o]


def kitfs_mount_argv(
    spec: str, directory: str, options: Sequence[str], *, sloppy: bool = False,
    verbose: bool = False, known_flags: frozenset[str] = frozenset(),
) -> list[str]:
    """The `kitfs mount` argv that the -o `options` mean.

    `known_flags` are the flags `kitfs mount` has: an option whose flag is missing (an
    older kitfs without --metrics-addr) is refused rather than passed on to fail later.
    """
    argv = ["mount", spec, directory]
    for option in options:
        name, eq, value = option.partition("=")
        if name in VALUE_OPTIONS:
            flag = VALUE_OPTIONS[name]
            if not eq or not value:
                raise UsageError(f"option {name} needs a value: {name}=...")
            if flag not in known_flags:
                raise UsageError(f"option {name}: this kitfs mount has no {flag}")
            if name == "filter":
                kinds, colon, ids = value.partition(":")
                value = kinds.replace("+", ",") + colon + ids
            if name == "proxy" and "@" in value:
                # OPTIONS show in `ps` (mount's and this helper's argv) and fstab is
                # world-readable: a proxy password must come from the environment.
                raise UsageError(
                    "option proxy: a proxy URL with credentials must not be in mount options "
                    "(they show in ps and fstab); set KITFS_PROXY or HTTPS_PROXY in the "
                    "environment of mount (in a .mount unit: Environment= or EnvironmentFile=)"
                )
            argv.append(f"{flag}={value}")
        elif name in SWITCH_OPTIONS and not eq:
            argv.append(SWITCH_OPTIONS[name])
        elif option in GENERIC_OPTIONS or option.startswith(GENERIC_PREFIXES):
            continue
        elif option == "noexec":
            raise UsageError("option noexec: not supported by kitfs mounts yet")
        elif sloppy:
            continue  # mount -s: tolerate what this helper does not know
        else:
            raise UsageError(
                f"unknown mount option {option!r} (kitfs takes "
                + ", ".join(sorted([*(f"{n}=" for n in VALUE_OPTIONS), *SWITCH_OPTIONS]))
                + ")"
            )
    if verbose:
        argv.append("-v")
    return argv


def _mount_flags() -> frozenset[str]:
    """Every long flag `kitfs mount` has, read off its own parser (the names of what a
    minimal command line parses to), so that this helper never lists them a second time."""
    from kitfs.commands import mount

    parser = argparse.ArgumentParser(add_help=False)
    mount.add_arguments(parser)
    names = vars(parser.parse_args(["REF", "DIR"]))
    return frozenset("--" + name.replace("_", "-") for name in names) | {"--config"}


def _exit_status(code: int) -> int:
    """mount(8)'s statuses: 1 for bad usage, 32 for a mount that failed."""
    if code == 0:
        return 0
    return 1 if code == UsageError.exit_code else 32


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(args)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


def _main(args: list[str]) -> int:
    try:
        opts, positional = getopt.gnu_getopt(args, "sfnvho:t:")
    except getopt.GetoptError as exc:
        raise UsageError(f"{exc} (usage: {PROG} REF DIR [-sfnv] [-o OPTIONS])") from None
    flags = [flag for flag, _ in opts]
    if "-h" in flags:
        print(f"usage: {PROG} REF DIR [-sfnv] [-o OPTIONS]\n{__doc__}")
        return 0
    if len(positional) != 2:
        raise UsageError(f"usage: {PROG} REF DIR [-sfnv] [-o OPTIONS]")
    for flag, value in opts:
        if flag == "-t" and value not in ("fuse.kitfs", "kitfs"):
            raise UsageError(f"-t {value}: this helper mounts fuse.kitfs only")
    options = [o for flag, value in opts if flag == "-o" for o in split_options(value)]
    verbose = "-v" in flags
    spec, directory = positional
    kitfs_argv = kitfs_mount_argv(spec, directory, options, sloppy="-s" in flags, verbose=verbose,
                                  known_flags=_mount_flags())
    if "-f" in flags:  # mount -f: check everything, mount nothing
        return _run_quietly([*kitfs_argv, "--check-only"], verbose)
    return _run_quietly(kitfs_argv, verbose)


def _run_quietly(kitfs_argv: list[str], verbose: bool) -> int:
    """`kitfs ...` in this process, as silent as mount(8) unless -v; a failure in one line.

    What the command says on success (`mounted REF at DIR` and its daemon) is for
    -v. A failure is its last line: an argparse complaint comes after a usage text
    that names `kitfs mount` flags, not the -o options the user wrote.
    """
    from kitfs import cli

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(kitfs_argv)
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 2
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    if code != 0:
        if lines and not verbose:
            last = lines[-1]
            for prefix in ("kitfs: error: ", "kitfs mount: error: "):
                last = last.removeprefix(prefix)
            lines = [f"{PROG}: {last}"]
        print("\n".join(lines) or f"{PROG}: kitfs mount failed (status {code})",
              file=sys.stderr)
        return _exit_status(code)
    if verbose:
        sys.stdout.write(out.getvalue())
    if lines:
        print("\n".join(lines), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
