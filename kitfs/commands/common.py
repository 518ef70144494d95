"""What the verbs share: kit's network flags, opening a reference, running trio, showing names.

Imported by every verb module when the parser is built, so it imports at
top level nothing heavier than the error types; trio, the registry client
and the inspection code come in when a verb runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable

from kitfs.errors import UsageError, user_error
from kitfs.units import shown_path

__all__ = ["add_network_options", "client_options", "inspect_reference", "run_async",
           "shown_path"]

TYPE_CHECKING = False  # typing's, without importing typing: command.py says why
if TYPE_CHECKING:
    from typing import TypeVar

    from kitfs.inspection import Inspection
    from kitfs.modelkit.filters import FilterSet
    from kitfs.modelkit.tree import Tree
    from kitfs.oci.options import ClientOptions
    from kitfs.oci.reference import Reference
    from kitfs.oci.source import Where

    T = TypeVar("T")


def add_network_options(p: argparse.ArgumentParser) -> None:
    """kit's network flags, for every verb that may talk to a registry."""
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


def client_options(args: argparse.Namespace) -> ClientOptions:
    from kitfs.oci.options import ClientOptions

    timeout = float(getattr(args, "timeout", 30.0))
    if timeout <= 0:
        raise UsageError("--timeout must be positive")
    return ClientOptions(
        plain_http=bool(getattr(args, "plain_http", False)),
        tls_verify=getattr(args, "tls_verify", "true") == "true",
        ca_file=getattr(args, "ca_file", None),
        cert_file=getattr(args, "cert", None),
        key_file=getattr(args, "key", None),
        read_timeout=timeout,
        retry_budget=timeout,
        kitops_home=getattr(args, "kitops_home", None),
    )


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    """Run `fn` under trio, raising what failed as itself, not inside an exception group.

    A nursery anywhere below (layers inspected in parallel, pack's workers)
    wraps what fails in it in an ExceptionGroup; cli.main reports a KitfsError
    as one line but a group as an internal error, so a bad tar entry found
    while listing came out as exit 70 and "ExceptionGroup". The user's error
    is taken out of the group here, once for every command.
    """
    import trio

    try:
        return trio.run(fn)
    except BaseExceptionGroup as group:
        cause = user_error(group)
        if cause is group:
            raise
        raise cause from group


async def inspect_reference(
    ref: Reference,
    options: ClientOptions,
    *,
    where: Where = "reference",
    toc: bool = True,
    tree_filters: FilterSet | None = None,
) -> tuple[Inspection, Tree | None]:
    """The one way a verb reads a ModelKit's manifest and Kitfile (and, given
    `tree_filters`, the files it holds), from kit's local storage or a registry as
    `where` says (oci/source.py: open_source)."""
    from kitfs.inspection import build_file_tree, inspect
    from kitfs.oci.source import open_source

    source = open_source(ref, options, where=where)
    try:
        result = await inspect(source, toc=toc or tree_filters is not None)
        tree = None
        if tree_filters is not None:
            tree = await build_file_tree(source, result, tree_filters)
        return result, tree
    finally:
        await source.aclose()
