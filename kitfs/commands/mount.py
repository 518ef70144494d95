"""`kitfs mount`: start a daemon serving a ModelKit as a lazy, read-only directory.

Run twice per mount: once as the command a user types, which checks its
arguments and starts `kitfs mount --foreground --ready-fd N` detached, and
once as that daemon. Both import this module to build the parser, so what
only the daemon needs (trio, pyfuse3, the engine) is imported in `_mount`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kitfs.commands.command import Command
from kitfs.commands.common import (
    absolute_path,
    add_network_options,
    add_signature_options,
    client_options,
    daemon_env,
    run_async,
    signature_flags,
)
from kitfs.errors import KitfsError, UsageError
from kitfs.signing.flags import MOUNT_FLAGS

TYPE_CHECKING = False  # typing's, without importing typing: command.py says why
if TYPE_CHECKING:
    from kitfs.engine.api import VerifyMode
    from kitfs.mounts import MountConfig, MountState, ReadyPipe
    from kitfs.signing.flags import SignatureFlags


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--verify", choices=("lazy", "strict"),
                   help="lazy (the default, unless a signature is required): serve bytes as "
                        "they arrive and verify each layer in the background (a mismatch "
                        "makes later reads fail); strict (the default when a signature is "
                        "required): serve only verified bytes (a layer without per-chunk "
                        "digests is read whole before its first byte is served)")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users read the mount (non-root needs user_allow_other "
                        "in /etc/fuse.conf)")
    p.add_argument("--metrics-addr", metavar="HOST:PORT",
                   help="serve Prometheus metrics of this mount at http://HOST:PORT/metrics "
                        "(registry requests and bytes, cache hits, read latency, errors, "
                        "prefetch, layer verification, health); off by default")
    p.add_argument("--foreground", action="store_true",
                   help="stay in the foreground and log to stderr; Ctrl-C unmounts")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    # `mount -f` through mount.fuse.kitfs: every check a mount makes, then no mount.
    p.add_argument("--check-only", action="store_true", help=argparse.SUPPRESS)
    add_signature_options(p, MOUNT_FLAGS, "signature required (cosign-compatible; the "
                          "node's /etc/kitfs/policy.yaml applies too)")
    add_network_options(p)


def _mount_config(args: argparse.Namespace) -> MountConfig:
    from kitfs.modelkit.filters import FilterSet
    from kitfs.mounts import MountConfig, absolute_mountpoint, default_cache_dir, log_path
    from kitfs.oci.reference import parse_reference
    from kitfs.units import parse_cache_size, parse_size

    parse_reference(args.reference)  # a bad reference fails here, before anything starts
    FilterSet.parse(args.filter)
    cache_size = parse_cache_size(args.cache_size)
    memory = parse_size(args.memory)
    if memory < 8 << 20:
        raise UsageError(f"--memory {args.memory}: at least 8M (a few chunks) is needed")
    if args.metrics_addr is not None:
        from kitfs.metrics import parse_addr

        parse_addr(args.metrics_addr)
    mountpoint = absolute_mountpoint(args.mountpoint)
    options = client_options(args)
    signature = signature_flags(args)
    required = _signature_required(args.reference, signature)  # even with --verify given
    verify: VerifyMode = args.verify or ("strict" if required else "lazy")
    return MountConfig(
        reference=args.reference, mountpoint=mountpoint,
        cache_dir=absolute_path(args.cache_dir) if args.cache_dir
        else default_cache_dir(),
        client=options, filters=tuple(args.filter), prefetch=args.prefetch,
        cache_size=cache_size, memory=memory, verify=verify, allow_other=args.allow_other,
        foreground=bool(args.foreground),
        request_timeout=options.read_timeout,
        log_file=log_path(mountpoint) if args.ready_fd is not None else None,
        metrics_addr=args.metrics_addr, signature=signature,
    )


def _signature_required(reference: str, signature: SignatureFlags) -> bool:
    """Whether what this mount serves may need a signature (enforcement.may_require).
    Reading the flags' files and the policies now fails a bad key, trusted root or policy,
    or a reference a policy rejects, before a daemon starts (`mount -f` included)."""
    from kitfs.signing.flags import POLICY_ENV, signatures_asked

    if os.environ.get(POLICY_ENV):  # the daemon runs in /: it gets the path made absolute
        os.environ[POLICY_ENV] = os.path.abspath(os.environ[POLICY_ENV])
    if not signatures_asked(signature, os.environ):
        return False

    from kitfs.enforcement import flags_requirement, load_policies, may_require
    from kitfs.oci.reference import parse_reference
    from kitfs.signing.policy import policy_name

    flags_requirement(signature, MOUNT_FLAGS)
    policies = load_policies(os.environ)
    ref = parse_reference(reference)
    for policy in policies:
        policy.requirement_for(policy_name(ref.registry, ref.repository))
    return may_require(signature, policies)


def _print_mounted(state: MountState) -> None:
    from kitfs.units import human_bytes

    print(f"mounted {state.reference} at {state.mountpoint}")
    print(f"  digest  {state.digest}")
    print(f"  files   {state.files} ({human_bytes(state.size)})")
    daemon = f"pid {state.pid}" + (f", log {state.log}" if state.log else "")
    print(f"  daemon  {daemon}")
    print(f"  cache   {state.cache_dir}")
    for line in state.signatures:
        print(f"  signed  {line}")
    if state.offline:
        print(f"  warning {state.offline}")
    sys.stdout.flush()


def _daemon_logging(verbose: int, *, to_file: bool) -> None:
    """A daemon's log is for after the fact: INFO and up (mounts, unmounts, failures).

    Its own log file gets timestamps and the pid; stderr (a terminal, or the
    journal under systemd, which stamps lines itself) does not.
    """
    level = logging.DEBUG if verbose >= 2 else logging.INFO
    stamp = "%(asctime)s kitfs[%(process)d] " if to_file else "kitfs: "
    logging.basicConfig(
        force=True, level=level, format=stamp + "%(levelname)s: %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpcore", "pyfuse3"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def run(args: argparse.Namespace) -> int:
    from kitfs.mounts import ReadyPipe

    # A daemon (--ready-fd) reports every failure, even a bad argument, on the pipe
    # too, so that `kitfs mount` relays it as its own one-line error.
    pipe = ReadyPipe(args.ready_fd)
    try:
        return _mount(args, pipe)
    except KitfsError as exc:
        pipe.failed(exc.exit_code, str(exc), type(exc).__name__)
        raise
    except BaseException as exc:
        pipe.failed(70, f"internal error: {type(exc).__name__}: {exc}")
        raise


def _mount(args: argparse.Namespace, pipe: ReadyPipe) -> int:
    from kitfs.mounts import check_mountpoint, daemon_argv, start_daemon

    config = _mount_config(args)
    check_mountpoint(config.mountpoint)
    if args.check_only:
        return 0
    if not (args.foreground or args.ready_fd is not None):
        state, earlier = start_daemon(
            daemon_argv(config, kitops_home=args.kitops_home, verbose=args.verbose),
            config.mountpoint, daemon_env(config.client))
        _print_mounted(state)
        if earlier is not None:
            print(f"  earlier log of the previous daemon here kept at {earlier}")
        return 0

    from kitfs.daemon import serve

    _daemon_logging(args.verbose, to_file=args.ready_fd is not None)

    def ready(state: MountState) -> None:
        if pipe.pending:
            pipe.ready()
        else:
            _print_mounted(state)

    run_async(lambda: serve(config, ready))
    pipe.failed(1, "the daemon stopped before the mount was ready")
    return 0


COMMAND = Command(
    name="mount",
    help="mount a ModelKit as a lazy, read-only directory",
    description="""\
Mount REF at MOUNTPOINT (an existing, empty directory) and return once the
files are there. Nothing is downloaded up front: file bytes are fetched when
read, plus what --prefetch predicts, into a chunk cache that every mount on
the machine shares, and checked against the ModelKit's digests. The daemon
runs in the background until `kitfs umount`; its log sits next to its state
(`kitfs status` shows where) and is kept after it exits only if something
went wrong. Readers get EIO, never a hang, when the registry stops
answering (--timeout). A ModelKit in kit's local storage (packed there, or
pulled from REF's registry with `kitfs pull`) is served from disk, as `kit
unpack` would find it. A Kitfile whose model.path names another ModelKit
mounts with that parent's model layers where `kit unpack` writes them, read
from the parent's own repository and verified like the rest; a missing
parent or a cycle fails the mount before anything is mounted.

With --signature-key (or --signature-identity and --signature-issuer), or a
node policy in /etc/kitfs/policy.yaml that asks for it, REF (and each parent)
is resolved to a digest once, that digest's cosign signatures are checked,
and only that digest is served: a ModelKit that fails is never mounted, and
the one-line error says why.

examples:
  kitfs mount registry.example.com/team/llama:v1 /mnt/llama
  kitfs mount localhost:5000/demo/llm:v1 /mnt/llm --filter model --prefetch none
  kitfs mount mymodel:v1 /mnt/m --cache-dir /nvme/kitfs --cache-size 200G --allow-other
  kitfs mount mymodel:v1 /mnt/m --metrics-addr 127.0.0.1:9100
  kitfs mount registry.example.com/team/llama:v1 /mnt/llama \
      --signature-key cosign.pub --trusted-root trusted_root.json
  kitfs umount /mnt/llama
""",
    add_arguments=add_arguments,
    run=run,
)
