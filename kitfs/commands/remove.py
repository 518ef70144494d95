"""`kitfs remove`: ModelKits out of kit's local storage (or a registry), as `kit remove` does.

kit's semantics (pkg/cmd/remove/remove.go, pkg/lib/repo/local/registry.go):
- by digest, or with `-f`: the manifest goes with every tag naming it;
- by tag: only the tag goes while other tags name the same manifest; the
  last tag takes the manifest with it;
- extra tags (`repo:t1,t2`) are removed the same way, one after another;
- `-a`: every untagged manifest of every repository; `-a -f`: everything;
- a manifest leaves the shared store (its blob, its entry in `index.json`)
  only when no other repository lists it, and then takes along every blob
  no remaining manifest needs (oras' AutoGC), a kitfs table of contents
  included;
- `-r`: the manifest the reference resolves to is deleted from its registry
  by digest (every tag naming it goes too); `-a` and `-f` do not apply.

kit reports a failure to remove an extra tag and still exits 0; kitfs exits 1.
"""

from __future__ import annotations

import argparse
import sys

from kitfs.commands.command import Command
from kitfs.commands.common import add_network_options, client_options, run_async
from kitfs.errors import KitfsError, UsageError

TYPE_CHECKING = False  # typing's, without importing typing: command.py says why
if TYPE_CHECKING:
    from kitfs.oci.layout import LocalStorage
    from kitfs.oci.options import ClientOptions
    from kitfs.oci.reference import Reference


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="REF", nargs="?",
                   help="[REGISTRY/]REPO[:TAG[,TAG2...]|@DIGEST]")
    p.add_argument("-f", "--force", action="store_true",
                   help="remove the ModelKit and every other tag that names it")
    p.add_argument("-a", "--all", action="store_true",
                   help="remove every untagged ModelKit (with --force: every ModelKit)")
    p.add_argument("-r", "--remote", action="store_true",
                   help="delete the ModelKit from its registry instead")
    add_network_options(p)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kitfs.oci.credentials import kitops_home
    from kitfs.oci.layout import LocalStorage
    from kitfs.oci.reference import parse_reference

    if args.all and args.reference is not None:
        raise UsageError("modelkit should not be specified when --all flag is used")
    if not args.all and args.reference is None:
        raise UsageError("modelkit is required for remove unless --all is specified")
    if args.remote and (args.force or args.all):
        raise UsageError("cannot use --all or --force with --remote")
    options = client_options(args)
    if args.remote:
        ref = parse_reference(args.reference)
        run_async(lambda: _remove_remote(ref, options))
        return 0
    storage = LocalStorage.for_home(Path(kitops_home(options.kitops_home)))
    if args.all:
        return _remove_all(storage, force=args.force)
    ref = parse_reference(args.reference)
    failed = 0
    for i, tag in enumerate((None, *ref.extra_tags)):
        try:
            _remove_one(storage, ref, tag, force=args.force)
        except KitfsError:
            if i == 0:
                raise  # the reference itself: one line, as every error
            failed += 1
            print(f"kitfs: error: failed to remove tag {tag}: {sys.exc_info()[1]}",
                  file=sys.stderr)
    return 1 if failed else 0


def _remove_one(storage: LocalStorage, ref: Reference, tag: str | None, *, force: bool) -> None:
    """Remove `ref` (or its extra tag `tag`) as kit's removeModelRef does."""
    from kitfs.modelkit.toc import TOC_ANNOTATION
    from kitfs.oci.layout import display_name

    target = ref.target if tag is None else tag
    shown = display_name(f"{ref.name}{'@' if ref.digest and tag is None else ':'}{target}")
    repo = storage.repo(ref.name)
    digest = repo.resolve(target)["digest"]
    if (ref.digest is not None and tag is None) or force or len(repo.tags_of(digest)) <= 1:
        storage.delete_manifest(ref.name, digest, (TOC_ANNOTATION,))
    else:
        repo.untag(target)
        repo.save()
    print(f"Removed {shown} (digest {digest})")


def _remove_all(storage: LocalStorage, *, force: bool) -> int:
    """kit's removeAllModels (`-a -f`) and removeUntaggedModels (`-a`): failures are
    reported one line each and the rest still removed."""
    from kitfs.modelkit.toc import TOC_ANNOTATION
    from kitfs.oci.layout import display_name

    failed = 0
    for name in storage.repositories():
        shown = display_name(name)
        for desc in list(storage.repo(name).manifests):
            digest = desc["digest"]
            try:
                tags = storage.repo(name).tags_of(digest)
                if tags and not force:
                    continue
                storage.delete_manifest(name, digest, (TOC_ANNOTATION,))
            except KitfsError as exc:
                failed += 1
                print(f"kitfs: error: failed to remove {shown}@{digest}: {exc}", file=sys.stderr)
                continue
            for tag in tags:
                print(f"Untagged {shown}:{tag}")
            print(f"Removed {shown}@{digest}")
    return 1 if failed else 0


async def _remove_remote(ref: Reference, options: ClientOptions) -> None:
    """kit's removeRemoteModel: resolve, then delete the manifest by digest. kitfs also
    drops the referrers tag (`sha256-<hex>`) that only described the deleted manifest."""
    from kitfs.errors import NotFoundError
    from kitfs.oci.client import INDEX_MEDIA_TYPES, RegistryClient
    from kitfs.oci.layout import display_name

    if ref.is_local:
        raise UsageError(f"--remote needs a reference with a registry, not "
                         f"{display_name(str(ref))}")
    async with RegistryClient(ref.registry, options) as client:
        _, _, digest = await client.get_manifest(ref.repository, ref.target, origin=True)
        await client.delete_manifest(ref.repository, digest)
        print(f"Removed {ref} (digest {digest})")
        try:
            _, media_type, referrers = await client.get_manifest(
                ref.repository, digest.replace(":", "-"), origin=True)
            if media_type in INDEX_MEDIA_TYPES:
                await client.delete_manifest(ref.repository, referrers)
        except NotFoundError:
            pass


COMMAND = Command(
    name="remove",
    help="remove ModelKits from kit's local storage, or from a registry (as `kit remove`)",
    description="""\
Remove a ModelKit from kit's local storage. By tag (and without --force), only
that tag goes while other tags still name the ModelKit; the last tag takes
the ModelKit with it. By digest, or with --force, the ModelKit goes with
every tag naming it. Blobs go once no ModelKit left in local storage needs
them. --all removes every untagged ModelKit; --all --force removes every
ModelKit. With --remote, the ModelKit REF resolves to is deleted from its
registry (by digest: every tag naming it goes too; the registry must allow
deleting).

examples:
  kitfs remove mymodel:v1
  kitfs remove registry.example.com/team/llama@sha256:0f3a...
  kitfs remove mymodel:v1,v2,v3
  kitfs remove --all
  kitfs remove --all --force
  kitfs remove --remote registry.example.com/team/llama:v1
""",
    add_arguments=add_arguments,
    run=run,
)
