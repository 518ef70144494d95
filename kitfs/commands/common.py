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

__all__ = ["absolute_path", "add_network_options", "add_signature_options", "client_options",
           "daemon_env",
           "inspect_reference", "run_async", "shown_path", "signature_flags"]

TYPE_CHECKING = False  # typing's, without importing typing: command.py says why
if TYPE_CHECKING:
    from pathlib import Path
    from typing import TypeVar

    from kitfs.inspection import Inspection
    from kitfs.modelkit.filters import FilterSet
    from kitfs.modelkit.tree import Tree
    from kitfs.oci.options import ClientOptions
    from kitfs.oci.reference import Reference
    from kitfs.oci.source import Where
    from kitfs.signing.flags import FlagNames, SignatureFlags

    T = TypeVar("T")


def add_network_options(p: argparse.ArgumentParser, *, tls_client: bool = True) -> None:
    """kit's network flags, for every verb that may talk to a registry; without
    --cert/--key where `tls_client` is False (sign and verify: --key is cosign's key)."""
    g = p.add_argument_group("registry connection")
    g.add_argument("--plain-http", action="store_true",
                   help="talk HTTP, not HTTPS (automatic for loopback registries)")
    g.add_argument("--tls-verify", choices=("true", "false"), default="true",
                   help="verify the registry's TLS certificate (default: true)")
    g.add_argument("--ca-file", metavar="PEM", help="trust these CA certificates too")
    if tls_client:
        g.add_argument("--cert", metavar="PEM", help="client certificate for mutual TLS")
        g.add_argument("--key", metavar="PEM", help="private key for --cert")
    g.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="give up on a registry that stays silent this long (default: 30)")
    g.add_argument("--proxy", metavar="URL",
                   help="send every request through this proxy, loopback registries "
                        "included (as kit's --proxy: it overrides HTTP_PROXY, HTTPS_PROXY "
                        "and NO_PROXY); http://[USER:PASSWORD@]HOST:PORT or https://...; "
                        f"also ${PROXY_ENV}")
    g.add_argument("--hosts-dir", metavar="DIR",
                   help="containerd-style hosts directory: DIR/REGISTRY/hosts.toml names "
                        "mirrors to try first, and per-host TLS (default: $KITFS_HOSTS_DIR, "
                        "else /etc/kitfs/certs.d if it exists; /etc/containerd/certs.d works)")


def add_signature_options(p: argparse.ArgumentParser, names: FlagNames, title: str) -> None:
    """Who must have signed, spelled as `names` says: verify's flags are cosign's, mount's
    and unpack's are renamed where kit's --key already means the TLS client key. The
    parsed values land under the same names either way (signature_flags reads them)."""
    g = p.add_argument_group(title)
    g.add_argument(names.key, dest="signature_key", metavar="PUB",
                   help="a cosign public key file (PEM: ECDSA, RSA or Ed25519), e.g. cosign.pub")
    g.add_argument(names.identity, dest="signature_identity", metavar="ID",
                   help="keyless: the signer's identity (certificate SAN, exact match)")
    g.add_argument(names.issuer, dest="signature_issuer", metavar="ISSUER",
                   help="keyless: the OIDC issuer that vouched for the identity "
                        "(e.g. https://github.com/login/oauth)")
    g.add_argument(names.trusted_root, dest="trusted_root", metavar="FILE",
                   help="sigstore trusted_root.json: Fulcio CAs, Rekor and CT log keys "
                        "(needed for keyless, and to check a keyed signature's Rekor entry)")
    g.add_argument(names.ignore_tlog, dest="insecure_ignore_tlog", action="store_true",
                   help="accept keyed signatures without a transparency-log entry (as "
                        "cosign's flag; what `kitfs sign` makes)")


def absolute_path(text: str) -> Path:
    """A path given on the command line, absolute (daemons and servers run in /)."""
    import os
    from pathlib import Path

    return Path(os.path.abspath(os.path.expanduser(text)))


def signature_flags(args: argparse.Namespace) -> SignatureFlags:
    """The signature flags as given; files named are made absolute (a daemon runs in /)."""
    from kitfs.signing.flags import SignatureFlags

    def absolute(path: str | None) -> str | None:
        return str(absolute_path(path)) if path else None

    return SignatureFlags(
        key=absolute(getattr(args, "signature_key", None)),
        identity=getattr(args, "signature_identity", None) or None,
        issuer=getattr(args, "signature_issuer", None) or None,
        trusted_root=absolute(getattr(args, "trusted_root", None)),
        ignore_tlog=bool(getattr(args, "insecure_ignore_tlog", False)),
    )


PROXY_ENV = "KITFS_PROXY"
"""--proxy from the environment: how `kitfs mount` hands it to its daemon (a password in
it stays out of `ps`), and a way to set it where flags are hard to pass."""


def client_options(args: argparse.Namespace) -> ClientOptions:
    """kit's network flags as options; proxies as kit takes them: --proxy (or $KITFS_PROXY)
    for every request, else HTTP_PROXY / HTTPS_PROXY / NO_PROXY (oci/proxy.py)."""
    import os

    from kitfs.oci.hosts import hosts_root
    from kitfs.oci.options import ClientOptions
    from kitfs.oci.proxy import Proxies

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
        proxies=Proxies.from_environment(os.environ, *_explicit_proxy(args)),
        hosts_dir=hosts_root(getattr(args, "hosts_dir", None), dict(os.environ)),
    )


def daemon_env(options: ClientOptions) -> dict[str, str] | None:
    """A daemon's environment: this one (HTTP_PROXY, HTTPS_PROXY, NO_PROXY, ...), plus
    --proxy as $KITFS_PROXY, which the daemon reads as its --proxy. Not on its command
    line: a password in the proxy URL would show in `ps` for as long as the mount lives.
    None: no --proxy, so the daemon inherits this environment as it is."""
    import os

    explicit = options.proxies.explicit
    if explicit is None:
        return None
    return dict(os.environ, **{PROXY_ENV: explicit.url})


def _explicit_proxy(args: argparse.Namespace) -> tuple[str | None, str]:
    """--proxy, else $KITFS_PROXY, with the name an error about it should give."""
    import os

    flag = getattr(args, "proxy", None)
    if flag:
        return flag, "--proxy"
    return os.environ.get(PROXY_ENV) or None, PROXY_ENV


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
    parents: bool = True,
) -> tuple[Inspection, Tree | None]:
    """The one way a verb reads a ModelKit's manifest and Kitfile (and, given
    `tree_filters`, the files it holds), from kit's local storage or a registry as
    `where` says (oci/source.py: open_source), with the parent ModelKits its
    `model.path` names unless `parents` is False (kitfs/parents.py)."""
    from kitfs.inspection import build_file_tree
    from kitfs.parents import open_modelkit

    async with open_modelkit(ref, options, where=where, toc=toc or tree_filters is not None,
                             parents=parents) as (source, result):
        tree = None
        if tree_filters is not None:
            tree = await build_file_tree(source, result, tree_filters)
        return result, tree
