"""Parent ModelKits: a Kitfile whose `model.path` names another ModelKit, followed as kit does.

What kit does (kitops-ml/kitops; paths in that repository):

- `model.path` names a ModelKit when it holds `:` or `@` and parses as a
  reference (pkg/lib/repo/util/kitfile.go IsModelKitReference;
  modelkit/kitfile.py is_modelkit_reference). Such a ModelKit has no model
  layer; its config keeps `model.path` as written.
- `kit pack` (pkg/cmd/pack/pack.go, pkg/lib/kitfile/resolve.go ResolveKitfile)
  reads the Kitfiles of the whole chain (kit's local storage first, then the
  registry), refuses a cycle or a chain past 10 parents ("Failed to resolve
  referenced modelkit ..."), and leaves every path the chain's Kitfiles name
  (model, parts, code, datasets, docs) out of the new ModelKit's layers. It
  copies no layer of a parent: the reference stays a reference.
- `kit unpack` (pkg/cmd/unpack/unpack.go runUnpackRecursive, unpackParent;
  util.go getStoreForRef: local storage first, then the registry) unpacks the
  parent first, farthest ancestor first, with the filter `model` (model and
  model parts; never the parent's Kitfile, code, datasets or docs), or with
  only the `model` filters of the user's (ids included; none left: nothing
  from the parent). Its layers land where they would if the parent were
  unpacked alone: at their tar names, i.e. under the parent's `model.path`.
  Then the ModelKit's own Kitfile (`model.path` still the reference) and
  layers. A reference seen twice is a cycle ("found cycle in modelkit
  references: [a=>b=>a]"); more than 10 parents is "reached maximum number
  of model references".
- `kit pull` (pkg/cmd/pull/pull.go) pulls the chain into local storage; it
  counts the ModelKit itself in its 10, so it stops one parent earlier.
- `kit inspect` and `kit info` show the ModelKit alone.

kitfs follows the chain the same way for `mount`, `ls`, `inspect` and
`pack` (and `pull`, with kit pull's count). `inspect` also shows the
parents (kit's does not). The parents' model layers are read from the
parents' own repositories (oci/source.py RoutedSource), each checked
against its digest exactly as the ModelKit's own layers are. A cycle, a
missing parent, a parent that is not a ModelKit and a chain too long are
each one line, before anything is mounted.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING

from kitfs.errors import FormatError, KitfsError, SignatureError
from kitfs.inspection import Inspection, Parent, inspect
from kitfs.modelkit.kitfile import Kitfile
from kitfs.oci.layout import display_name
from kitfs.oci.options import ClientOptions
from kitfs.oci.reference import Reference, parse_reference
from kitfs.oci.source import BlobSource, RoutedSource, Where
from kitfs.offline import open_source  # falls back on the cache where options say (offline.py)

if TYPE_CHECKING:
    from kitfs.enforcement import SignatureGate

log = logging.getLogger(__name__)

#: kit's constants.MaxModelRefChain: unpack and pack follow at most this many parents.
MAX_PARENTS = 10


class Chain:
    """The references met following `model.path` from one ModelKit: kit's cycle and length rules.

    `limit` counts the first ModelKit too: MAX_PARENTS + 1 as kit unpack and
    pack count, MAX_PARENTS as kit pull does.
    """

    def __init__(self, limit: int = MAX_PARENTS + 1) -> None:
        self.limit = limit
        self.names: list[str] = []

    def enter(self, ref: Reference) -> None:
        shown = display_name(str(ref))
        if shown in self.names:
            cycle = "=>".join([*self.names[self.names.index(shown):], shown])
            raise FormatError(f"found cycle in modelkit references: [{cycle}]")
        self.names.append(shown)
        if len(self.names) > self.limit:
            raise FormatError(
                f"reached maximum number of model references: [{'=>'.join(self.names)}]")


async def follow(
    child: Reference,
    named: str | None,
    options: ClientOptions,
    stack: contextlib.AsyncExitStack,
    *,
    toc: bool = True,
    gate: SignatureGate | None = None,
) -> tuple[tuple[Parent, ...], dict[str, BlobSource]]:
    """The parents of `child`, whose Kitfile's `model.path` is `named`, nearest first; and
    the source of each of their model layers, by digest (open until `stack` closes).

    Each parent is looked for in kit's local storage first, then in its registry,
    as kit finds it, and must pass `gate` as the ModelKit itself did. Whatever fails is
    one line naming the parent and who named it.
    """
    chain = Chain()
    chain.enter(child)
    parents: list[Parent] = []
    routes: dict[str, BlobSource] = {}
    while named is not None:
        ref = parse_reference(named)  # it parsed, or model_reference would be None
        chain.enter(ref)
        source = open_source(ref, options, where="local-first")
        stack.push_async_callback(source.aclose)
        try:
            found = await _checked_inspect(source, toc, gate)
        except KitfsError as exc:
            raise _about(exc, ref, child) from None
        log.info("parent ModelKit %s (model.path of %s): %s", ref, child, found.digest)
        parent = Parent(ref, found)
        parents.append(parent)
        for layer in parent.model_layers:
            routes.setdefault(layer.digest, source)
        child, named = ref, found.view.model_reference
    return tuple(parents), routes


async def _checked_inspect(
    source: BlobSource, toc: bool, gate: SignatureGate | None
) -> Inspection:
    """Resolve once, let `gate` judge that digest, then read what that manifest names."""
    resolved = await source.resolve()
    if gate is not None:
        await gate.check(source.reference, resolved[2])
    return await inspect(source, toc=toc, resolved=resolved)


def _about(exc: KitfsError, parent: Reference, child: Reference) -> KitfsError:
    """`exc`, of the same kind (so the exit status stays), saying which parent it concerns."""
    what = (f"parent ModelKit {display_name(str(parent))} (the model.path of "
            f"{display_name(str(child))})")
    if isinstance(exc, SignatureError):  # SignatureRefused takes a reason too
        return SignatureError(f"{what}: {str(exc).removeprefix(f'{parent}: ')}")
    try:
        return type(exc)(f"{what}: {exc}")
    except TypeError:  # pragma: no cover - every KitfsError takes one message
        return KitfsError(f"{what}: {exc}")


@contextlib.asynccontextmanager
async def open_modelkit(
    reference: Reference,
    options: ClientOptions,
    *,
    where: Where = "reference",
    toc: bool = True,
    parents: bool = True,
    gate: SignatureGate | None = None,
) -> AsyncIterator[tuple[BlobSource, Inspection]]:
    """The ModelKit `reference` names (looked for as `where` says) with its parents
    (unless `parents` is False: info and diff show a ModelKit alone, as kit's do): one
    source serving every blob of the chain, and the inspection, its `parents` filled.
    With a `gate`, each ModelKit of the chain is resolved once and its signatures checked
    on that digest before anything else of it is read (kitfs/enforcement.py)."""
    async with contextlib.AsyncExitStack() as stack:
        source = open_source(reference, options, where=where)
        stack.push_async_callback(source.aclose)
        ins = await _checked_inspect(source, toc, gate)
        if parents and ins.view.model_reference is not None:
            found, routes = await follow(reference, ins.view.model_reference, options, stack,
                                         toc=toc, gate=gate)
            ins = replace(ins, parents=found)
            source = RoutedSource(source, routes)  # its sources close with the stack
        yield source, ins


async def inherited_paths(reference: Reference, kitfile: Kitfile, options: ClientOptions
                          ) -> list[str]:
    """What `kit pack` leaves out of a ModelKit built on a parent: every path the chain's
    Kitfiles name (util.LayerPathsFromKitfile of the merged chain), so that no file is
    packed again that the parent already provides. Raises as kit does when a parent
    cannot be read, or the chain has a cycle or is too long."""
    async with contextlib.AsyncExitStack() as stack:
        found, _ = await follow(reference, kitfile.model_reference, options, stack, toc=False)
    paths: list[str] = []
    for parent in found:
        paths += parent.inspection.view.kitfile.layer_paths()
    return paths
