"""`kitfs unpack`: write a ModelKit's files to a directory, as `kit unpack` does, only faster."""

from __future__ import annotations

import argparse

from kitfs.commands.command import Command
from kitfs.commands.common import (
    absolute_path,
    add_network_options,
    add_signature_options,
    client_options,
    run_async,
    signature_flags,
)
from kitfs.errors import UsageError
from kitfs.signing.flags import MOUNT_FLAGS, signatures_asked

#: kit's deprecated shorthand flags and the filter type each stands for (pkg/cmd/unpack/cmd.go).
SHORTHANDS = ("kitfile", "model", "datasets", "code", "docs", "prompts")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="REF")
    p.add_argument("-d", "--dir", default=".", metavar="DIR",
                   help="the directory to unpack into, created if missing (default: the "
                        "current directory)")
    p.add_argument("-f", "--filter", action="append", metavar="FILTER", default=[],
                   help="unpack only what matches: TYPES[:IDS], TYPES from kitfile, model, "
                        "datasets, code, docs, prompts, IDS names or paths as in the Kitfile "
                        "(repeatable: what any filter matches is unpacked)")
    for name in SHORTHANDS:
        p.add_argument(f"--{name}", action="store_true", dest=f"only_{name}",
                       help=f"unpack the {name} (kit's older flags: together they make one "
                            f"filter, e.g. --filter={name},...; ignored with --filter)")
    p.add_argument("-o", "--overwrite", action="store_true",
                   help="replace files that already exist (default: an existing file is an "
                        "error)")
    p.add_argument("-i", "--ignore-existing", action="store_true",
                   help="leave files that already exist as they are")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="the shared chunk cache, as for mount (default: $KITFS_CACHE_DIR, "
                        "else /var/cache/kitfs for root, else $XDG_CACHE_HOME/kitfs)")
    add_signature_options(p, MOUNT_FLAGS, "signature required (cosign-compatible; the "
                          "node's /etc/kitfs/policy.yaml applies too)")
    add_network_options(p)


def filter_texts(args: argparse.Namespace) -> list[str]:
    """kit's rule: --filter wins; else the shorthand flags make one filter of their types."""
    filters: list[str] = list(args.filter)
    if filters:
        return filters
    chosen = [name for name in SHORTHANDS if getattr(args, f"only_{name}")]
    return [",".join(chosen)] if chosen else []


def run(args: argparse.Namespace) -> int:
    import logging
    import os
    import sys

    import trio

    from kitfs.buffers import trim_memory, tune_malloc
    from kitfs.engine.session import open_kit
    from kitfs.modelkit.filters import FilterSet
    from kitfs.mounts import default_cache_dir
    from kitfs.oci.reference import parse_reference
    from kitfs.progress import Progress
    from kitfs.unpack import UnpackOptions, engine_config, unpack

    if not args.verbose:
        # What goes wrong reaches the user as the one line cli.main prints; the warnings
        # the read path logs on the way (a mount's log) would only repeat it (-v shows them).
        logging.getLogger("kitfs").setLevel(logging.CRITICAL)
    ref = parse_reference(args.reference)
    if ref.extra_tags:
        raise UsageError(f"{args.reference}: can not unpack multiple tags")
    filters = FilterSet.parse(filter_texts(args))
    options = client_options(args)
    cache = (absolute_path(args.cache_dir) if args.cache_dir
             else default_cache_dir())
    directory = absolute_path(args.dir)
    config = engine_config(options.read_timeout)
    unpacking = UnpackOptions(overwrite=args.overwrite, ignore_existing=args.ignore_existing)
    signature = signature_flags(args)
    # kitfs-init names the settings as its COSIGN_* variables (initcontainer.INIT_NAMES)
    gate = None
    if signatures_asked(signature, os.environ):
        from kitfs.enforcement import signature_gate

        gate = signature_gate(signature, getattr(args, "signature_names", MOUNT_FLAGS), options)
    progress = Progress("unpacking", 0)

    trim = tune_malloc()  # chunks pass through by the thousand: keep the heap flat

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            if trim is not None:
                nursery.start_soon(trim_memory, trim)
            # kit looks in its local storage first, then in the reference's registry.
            async with open_kit(ref, options, cache, filters=filters, config=config,
                                where="local-first", gate=gate) as kit:
                for line in gate.passed if gate is not None else ():
                    print(f"signature verified: {line}", file=sys.stderr)
                await unpack(kit, directory, unpacking, progress)
            nursery.cancel_scope.cancel()

    try:
        run_async(main)
    finally:
        progress.close()
    return 0


COMMAND = Command(
    name="unpack",
    help="write a ModelKit's files to a directory, as `kit unpack` does",
    description="""\
Write the files of REF (or those the filters select) into DIR, as `kit unpack`
does: the Kitfile, then every file of each layer where kit puts it, with the
modes of its tar headers. Without -o, a file that already exists is an error
(found before anything is downloaded); -i leaves existing files alone.

Bytes are fetched with parallel range requests through the shared chunk cache
that mounts use, checked against the ModelKit's digests, and written straight
into DIR: each file under a temporary name, renamed into place once complete
(and once its layer matched its digest, for layers without per-chunk digests).
An interrupted unpack leaves no half-written file; run it again (with -o or -i
for the files it finished) and it fetches only what is missing.

With --signature-key (or --signature-identity and --signature-issuer), or a
node policy in /etc/kitfs/policy.yaml that asks for it, REF is resolved to a
digest once, that digest's cosign signatures are checked, and only that
digest is unpacked; a ModelKit that fails is not unpacked at all.

examples:
  kitfs unpack registry.example.com/team/llm:v1 -d ./llm
  kitfs unpack registry.example.com/team/llm:v1 -d ./llm --filter model
  kitfs unpack registry.example.com/team/llm:v1 --filter=datasets:validation -o
  kitfs unpack registry.example.com/team/llm:v1 -d ./llm \
      --signature-key cosign.pub --insecure-ignore-tlog
""",
    add_arguments=add_arguments,
    run=run,
)
