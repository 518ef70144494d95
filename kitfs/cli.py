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
  kitfs pack ./my-model -t registry.example.com/team/llama:v1
  kitfs mount registry.example.com/team/llama:v1 /mnt/llama
  kitfs inspect registry.example.com/team/llama:v1
  kitfs ls registry.example.com/team/llama:v1 --filter model
  echo "$TOKEN" | kitfs login registry.example.com -u me --password-stdin
"""


def _add_network_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("registry connection")
    g.add_argument("--plain-http", action="store_true",
                   help="talk HTTP, not HTTPS (automatic for loopback registries)")
    g.add_argument("--tls-verify", choices=("true", "false"), default="true",
                   help="verify the registry's TLS certificate (default: true)")
    g.add_argument("--ca-file", metavar="PEM", help="trust these CA certificates too")
    g.add_argument("--cert", metavar="PEM", help="client certificate for mutual TLS")
    g.add_argument("--key", metavar="PEM", help="private key for --cert")
    g.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="give up on a registry that stays silent this long (default: 30)")


def _add_global_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="DIR", dest="kitops_home",
                   help="kit's home directory (credentials, local storage); default "
                        "$KITOPS_HOME, else ~/.local/share/kitops")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for internal errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kitfs", description=MAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"kitfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_global_options(p)
        return p

    p = command("pack", "pack a directory into a ModelKit and push or store it", """\
Pack DIR (which holds a Kitfile) into a ModelKit that `kit` reads, exactly as
`kit pack` lays it out, and push it to REF's registry; a REF without a
registry (e.g. `mymodel:v1`) goes to kit's local storage, where `kit list`
sees it. The same directory always packs to the same layer digests.

kitfs also stores a table of contents (file offsets, BLAKE3 of every 2 MiB
chunk and, uncompressed, of every 256 KiB block) with the ModelKit, as an OCI
referrer, so that `kitfs mount` starts at once, verifies every byte it reads,
and fetches only the blocks a random reader needs. `kit` ignores it.

examples:
  kitfs pack . -t localhost:5000/demo/llm:v1
  kitfs pack ./model-dir -t registry.example.com/llm:v1,latest --compression zstd
""")
    p.add_argument("directory", type=Path, metavar="DIR",
                   help="the pack context (holds the Kitfile)")
    p.add_argument("-t", "--tag", required=True, metavar="REF",
                   help="where to put it: [REGISTRY/]REPO:TAG[,TAG2...]")
    p.add_argument("-f", "--file", type=Path, metavar="KITFILE",
                   help="Kitfile to use (default: DIR/Kitfile)")
    p.add_argument("--compression", choices=("none", "gzip", "zstd"), default="none",
                   help="layer compression (default: none; weights barely compress and "
                        "uncompressed layers are fastest to mount)")
    p.add_argument("--work-dir", type=Path, metavar="DIR",
                   help="where layers are staged before a push (default: $TMPDIR); needs "
                        "room for the packed model")
    p.add_argument("--jobs", type=int, default=4, metavar="N",
                   help="blobs pushed in parallel (default: 4)")
    _add_network_options(p)
    p.set_defaults(handler="kitfs.commands:cmd_pack")

    p = command("inspect", "show a ModelKit's manifest, Kitfile and layers", """\
Fetch only the manifest and config of REF and show what it holds: its digest,
the Kitfile, and every layer with its type, path, format and size. Works for
ModelKits made by kitfs and by every generation of `kit`, and for ModelPack
manifests.

examples:
  kitfs inspect localhost:5000/demo/llm:v1
  kitfs inspect mymodel:v1 --json | jq .layers
""")
    p.add_argument("reference", metavar="REF")
    p.add_argument("--json", action="store_true", help="print everything as one JSON document")
    _add_network_options(p)
    p.set_defaults(handler="kitfs.commands:cmd_inspect")

    p = command("ls", "list the files a mount (or `kit unpack`) of a ModelKit would show", """\
List every file of REF with its size and the layer it comes from, without
downloading file data: kitfs reads its table of contents where one exists,
otherwise the tar headers of each layer with range requests.

examples:
  kitfs ls localhost:5000/demo/llm:v1
  kitfs ls localhost:5000/demo/llm:v1 --filter model --long
""")
    p.add_argument("reference", metavar="REF")
    p.add_argument("--filter", action="append", metavar="FILTER", default=[],
                   help="as `kit unpack --filter`: TYPES[:IDS], TYPES from kitfile, model, "
                        "datasets, code, docs, prompts (repeatable)")
    p.add_argument("-l", "--long", action="store_true", help="show mode and layer too")
    p.add_argument("--json", action="store_true", help="print the listing as JSON")
    _add_network_options(p)
    p.set_defaults(handler="kitfs.commands:cmd_ls")

    p = command("login", "log in to a registry (writes the credentials `kit` reads)", """\
Check USERNAME and the password against REGISTRY and, if they work, save them
in $KITOPS_HOME/credentials.json, the file `kit login` writes.

examples:
  echo "$TOKEN" | kitfs login ghcr.io -u me --password-stdin
""")
    p.add_argument("registry", metavar="REGISTRY")
    p.add_argument("-u", "--username", required=True)
    p.add_argument("-p", "--password", help="the password (prefer --password-stdin)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    _add_network_options(p)
    p.set_defaults(handler="kitfs.commands:cmd_login")

    p = command("logout", "forget the credentials saved for a registry", """\
Remove REGISTRY from $KITOPS_HOME/credentials.json.
""")
    p.add_argument("registry", metavar="REGISTRY")
    p.set_defaults(handler="kitfs.commands:cmd_logout")

    p = command("mount", "mount a ModelKit as a lazy, read-only directory", """\
Mount REF at MOUNTPOINT (an existing, empty directory) and return once the
files are there. Nothing is downloaded up front: file bytes are fetched when
read, plus what --prefetch predicts, into a chunk cache that every mount on
the machine shares, and checked against the ModelKit's digests. The daemon
runs in the background until `kitfs umount`; its log sits next to its state
(`kitfs status` shows where) and is kept after it exits only if something
went wrong. Readers get EIO, never a hang, when the registry stops
answering (--timeout).

examples:
  kitfs mount registry.example.com/team/llama:v1 /mnt/llama
  kitfs mount localhost:5000/demo/llm:v1 /mnt/llm --filter model --prefetch none
  kitfs mount mymodel:v1 /mnt/m --cache-dir /nvme/kitfs --cache-size 200G --allow-other
  kitfs umount /mnt/llama
""")
    p.add_argument("reference", metavar="REF")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="the shared chunk cache (default: $KITFS_CACHE_DIR, else "
                        "/var/cache/kitfs for root, else $XDG_CACHE_HOME/kitfs)")
    p.add_argument("--cache-size", metavar="SIZE",
                   help="evict least-recently-used chunks beyond this much disk, e.g. 200G "
                        "(default: no limit; trim with `kitfs cache gc`)")
    p.add_argument("--memory", metavar="SIZE", default="256M",
                   help="chunks the daemon keeps in memory (default 256M); its whole RSS "
                        "stays within about 3x this, whatever the model size")
    p.add_argument("--filter", action="append", metavar="FILTER", default=[],
                   help="show only part of the ModelKit, as `kit unpack --filter`: "
                        "TYPES[:IDS] with TYPES from kitfile, model, datasets, code, docs, "
                        "prompts (repeatable)")
    p.add_argument("--prefetch", choices=("none", "model", "all"), default="model",
                   help="fetch ahead of readers: the Kitfile, small files, then weights in "
                        "load order (model, the default), every file (all), or only what "
                        "is read (none)")
    p.add_argument("--verify", choices=("lazy", "strict"), default="lazy",
                   help="lazy (default): serve bytes as they arrive and verify each layer "
                        "in the background (a mismatch makes later reads fail); strict: "
                        "serve only verified bytes (a layer without per-chunk digests is "
                        "read whole before its first byte is served)")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users read the mount (non-root needs user_allow_other "
                        "in /etc/fuse.conf)")
    p.add_argument("--foreground", action="store_true",
                   help="stay in the foreground and log to stderr; Ctrl-C unmounts")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    _add_network_options(p)
    p.set_defaults(handler="kitfs.commands:cmd_mount")

    p = command("umount", "unmount a ModelKit mount and stop its daemon", """\
Stop the daemon serving MOUNTPOINT and wait until the mount is gone. If the
daemon died (killed, crashed), the stale mount (every access fails with
"Transport endpoint is not connected") is detached and its state removed.

examples:
  kitfs umount /mnt/llama
""")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for the daemon to exit (default: 30)")
    p.set_defaults(handler="kitfs.commands:cmd_umount")

    p = command("status", "show kitfs mounts and what their daemons are doing", """\
List every kitfs mount of this user (root: of the machine), or just the one
at MOUNTPOINT: reference, digest, daemon pid and whether it is alive, and
the engine's counters (bytes fetched and served, cache hits, prefetch
progress, layer verification). A mount whose daemon died shows as `dead`:
`kitfs umount` cleans it up.

examples:
  kitfs status
  kitfs status /mnt/llama --json | jq '.[0].status.engine.hit_rate'
""")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list with one object per mount")
    p.set_defaults(handler="kitfs.commands:cmd_status")

    p = command("cache", "show, trim, check or empty the shared chunk cache", """\
Every mount on a node shares one content-addressed chunk cache. These actions
are safe while mounts run: a removed chunk is simply fetched again.

  du       how much the cache holds
  gc       evict least-recently-used chunks until it holds at most --max-size
  verify   check every chunk's checksum; remove bad ones (exit 1 if any)
  clear    remove every chunk

examples:
  kitfs cache du
  kitfs cache gc --max-size 200G
  kitfs cache verify --cache-dir /mnt/nvme/kitfs
""")
    p.add_argument("action", choices=("du", "gc", "verify", "clear"))
    p.add_argument("--cache-dir", metavar="DIR",
                   help="the cache (default: $KITFS_CACHE_DIR, else /var/cache/kitfs for "
                        "root, else $XDG_CACHE_HOME/kitfs)")
    p.add_argument("--max-size", metavar="SIZE", help="for gc: the size to trim down to")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler="kitfs.cachecmd:cmd_cache")
    return parser


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="kitfs: %(levelname)s: %(name)s: %(message)s")


def _load_handler(spec: str) -> Callable[[argparse.Namespace], int]:
    import importlib

    module_name, func_name = spec.split(":")
    handler: Callable[[argparse.Namespace], int] = getattr(
        importlib.import_module(module_name), func_name
    )
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    if isinstance(sys.stdout, io.TextIOWrapper):
        # Names and Kitfiles come from whoever packed the ModelKit: what the terminal's
        # encoding cannot show is printed escaped, never an internal error mid-listing.
        sys.stdout.reconfigure(errors="backslashreplace")
    if args.kitops_home:
        os.environ["KITOPS_HOME"] = str(Path(args.kitops_home).expanduser())
    try:
        return _load_handler(args.handler)(args)
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
