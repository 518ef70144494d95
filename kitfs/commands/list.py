"""`kitfs list`: the ModelKits in kit's local storage, or a registry repository's, as
`kit list` prints them.

kit (pkg/cmd/list): one row per tag (`<none>` for an untagged manifest), in
columns REPOSITORY TAG MAINTAINER NAME SIZE DIGEST aligned by Go's tabwriter
(padding 3); MAINTAINER is the Kitfile's first author, NAME its package name,
SIZE the sum of the layers' sizes (FormatBytes). Local repositories are listed
in the order of their `registry/repo` names, manifests within one by digest;
the local registry and default repository are left out of names.
`--format json` prints kit's modelInfo records (repo, digest, tags, modelName,
size, author) as Go's MarshalIndent does; any other --format is a template
executed per ModelKit, of which kitfs knows `{{ .Field }}` placeholders only.

With a REPOSITORY that names a registry, that repository's tags are listed
(manifests that are not ModelKits, such as referrer indexes, skipped), or
only the tag or digest given. kit itself lists only `latest` then, because its
reference parser fills in a tag that was not given; kitfs lists every tag, as
kit's own listing code means to. A REPOSITORY without a registry lists that
local repository.
"""

from __future__ import annotations

import argparse
import re
import sys

from kitfs.commands.command import Command
from kitfs.commands.common import add_network_options, client_options, run_async
from kitfs.errors import KitfsError, UsageError

TYPE_CHECKING = False  # typing's, without importing typing: command.py says why
if TYPE_CHECKING:
    from kitfs.oci.client import RegistryClient
    from kitfs.oci.layout import LocalStorage
    from kitfs.oci.options import ClientOptions
    from kitfs.oci.reference import Reference

HEADER = ("REPOSITORY", "TAG", "MAINTAINER", "NAME", "SIZE", "DIGEST")
#: Go's tabwriter.NewWriter(w, 0, 2, 3, ' ', 0), as kit prints its table.
PADDING = 3
FIELDS = ("Repo", "Tags", "Digest", "ModelName", "Size", "Author")
_PLACEHOLDER = re.compile(r"\{\{-?\s*\.(\w+)\s*-?\}\}")
#: Tags whose manifests are fetched at once when listing a registry repository.
REMOTE_JOBS = 8

# One listed ModelKit: kit's modelInfo, with its JSON field names.
Info = dict[str, object]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("repository", metavar="REPOSITORY", nargs="?",
                   help="a registry repository (REGISTRY/REPO[:TAG|@DIGEST]) to list instead "
                        "of local storage, or a local repository to list alone")
    p.add_argument("--format", default="table", metavar="FORMAT",
                   help="table (default), json, or a template such as '{{ .Repo }} {{ .Tags }}' "
                        "(fields: " + ", ".join(FIELDS) + ")")
    add_network_options(p)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kitfs.oci.credentials import kitops_home
    from kitfs.oci.layout import LocalStorage
    from kitfs.oci.reference import parse_reference

    template = None if args.format in ("table", "json", "") else args.format
    if template is not None:
        _check_template(template)
    options = client_options(args)
    ref = parse_reference(args.repository) if args.repository else None
    if ref is not None and ref.extra_tags:
        raise UsageError("repository cannot reference multiple tags")
    version = _explicit_version(args.repository) if ref is not None else False
    if ref is not None and not ref.is_local:
        infos = run_async(lambda: _remote(ref, options, version))
    else:
        storage = LocalStorage.for_home(Path(kitops_home(options.kitops_home)))
        infos = _local(storage, ref, version)
    if args.format == "json":
        from kitfs.oci.layout import go_json

        sys.stdout.write(go_json(infos, indent=2).decode() + "\n")
    elif template is not None:
        for info in infos:
            line = _render(template, info)
            sys.stdout.write(line if line.endswith("\n") else line + "\n")
    else:
        sys.stdout.write(table(infos))
    return 0


def table(infos: list[Info]) -> str:
    """kit's table: a row per tag, aligned as Go's tabwriter aligns it."""
    rows = [list(HEADER)]
    for info in infos:
        tags = info["tags"] or ["<none>"]
        assert isinstance(tags, list)
        for tag in tags:
            rows.append([str(info["repo"]), str(tag), str(info["author"]),
                         str(info["modelName"]), str(info["size"]), str(info["digest"])])
    widths = [max(len(row[i]) for row in rows) + PADDING for i in range(len(HEADER) - 1)]
    return "".join(
        "".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + row[-1]
        + "\n"
        for row in rows
    )


def _explicit_version(text: str) -> bool:
    """Whether a reference names a tag or digest (kit's parser fills in `latest`)."""
    return "@" in text or ":" in text.rsplit("/", 1)[-1]


def _info(repo: str, digest: str, tags: list[str] | None, manifest: bytes,
          config: bytes | None) -> Info:
    """kit's modelInfo.fill: the Kitfile's name and first author, the layers' total size."""
    import json

    from kitfs.modelkit.manifest import parse_modelkit
    from kitfs.units import kit_bytes

    name = author = "<none>"
    size = 0
    try:
        layers = json.loads(manifest).get("layers") or []
        size = sum(d["size"] for d in layers if isinstance(d.get("size"), int))
        kitfile = parse_modelkit(manifest, config).kitfile
        name = kitfile.package.name or "<none>"
        author = kitfile.package.authors[0] if kitfile.package.authors else "<none>"
    except (KitfsError, ValueError, AttributeError, TypeError):
        pass
    return {"repo": repo or "<none>", "digest": digest, "tags": tags, "modelName": name,
            "size": kit_bytes(size), "author": author}


def _local(storage: LocalStorage, ref: Reference | None, version: bool) -> list[Info]:
    from kitfs.modelkit.manifest import manifest_blobs
    from kitfs.oci.layout import display_name

    infos: list[Info] = []
    for name in storage.repositories():
        if ref is not None and name != ref.name:
            continue
        repo = storage.repo(name)
        found = []
        for desc in repo.manifests:
            digest = desc["digest"]
            tags = repo.tags_of(digest) or None
            if version and ref is not None and (
                    digest != ref.digest if ref.digest else ref.target not in (tags or ())):
                continue
            try:
                manifest = storage.read_blob(digest)
            except KitfsError as exc:
                print(f"kitfs: warning: {display_name(name)}@{digest}: {exc}", file=sys.stderr)
                manifest = b""
            config = None
            try:
                config_desc = manifest_blobs(manifest)[0][0]
                config = storage.read_blob(config_desc.digest)
            except KitfsError:
                pass
            found.append(_info(display_name(name), digest, tags, manifest, config))
        found.sort(key=lambda i: (str(i["repo"]), str(i["digest"])))
        infos += found
    return infos


async def _remote(ref: Reference, options: ClientOptions, version: bool) -> list[Info]:
    import trio

    from kitfs.oci.client import RegistryClient

    async with RegistryClient(ref.registry, options) as client:
        if version:
            info = await _remote_info(client, ref, ref.target)
            return [info] if info is not None else []
        tags = await client.list_tags(ref.repository)
        found: list[Info | None] = [None] * len(tags)
        limiter = trio.CapacityLimiter(REMOTE_JOBS)

        async def one(i: int) -> None:
            async with limiter:
                found[i] = await _remote_info(client, ref, tags[i])

        async with trio.open_nursery() as nursery:
            for i in range(len(tags)):
                nursery.start_soon(one, i)
    return [info for info in found if info is not None]


async def _remote_info(client: RegistryClient, ref: Reference, target: str) -> Info | None:
    """kit's listImageTag: None for a manifest that is not a ModelKit."""
    from kitfs.errors import FormatError
    from kitfs.modelkit.manifest import manifest_blobs, parse_modelkit
    from kitfs.oci.client import MODELKIT_CONFIG_TYPES

    manifest, _, digest = await client.get_manifest(ref.repository, target)
    try:
        config_desc = manifest_blobs(manifest)[0][0]
        if config_desc.media_type not in MODELKIT_CONFIG_TYPES:
            parse_modelkit(manifest, None)  # a ModelPack without a config of its own
    except FormatError:
        return None
    config = await client.get_blob(ref.repository, config_desc.digest, 16 << 20,
                                   size=config_desc.size)
    return _info(ref.repository, digest, [target], manifest, config)


def _check_template(template: str) -> None:
    for match in _PLACEHOLDER.finditer(template):
        if match.group(1) not in FIELDS:
            raise UsageError(f"--format: unknown field .{match.group(1)} (known: "
                             + ", ".join(FIELDS) + ")")
    if "{{" in _PLACEHOLDER.sub("", template):
        raise UsageError("--format: kitfs templates take only {{ .Field }} placeholders")


def _render(template: str, info: Info) -> str:
    return _PLACEHOLDER.sub(lambda m: _go_value(info[_json_key(m.group(1))]), template)


def _json_key(field: str) -> str:
    return {"Repo": "repo", "Tags": "tags", "Digest": "digest", "ModelName": "modelName",
            "Size": "size", "Author": "author"}[field]


def _go_value(value: object) -> str:
    """A value as Go's template prints it: a slice as [a b], nil as []."""
    if isinstance(value, list):
        return "[" + " ".join(str(v) for v in value) + "]"
    return "[]" if value is None else str(value)


COMMAND = Command(
    name="list",
    help="list ModelKits in kit's local storage or a registry repository (as `kit list`)",
    description="""\
List the ModelKits in kit's local storage (what `kit list` shows: packed or
pulled by either tool), one row per tag, with the Kitfile's first author and
package name, the total size of the layers and the manifest digest. With
REPOSITORY naming a registry, list that repository's tags instead (each with
its digest and size), or only the tag or digest given; a REPOSITORY without a
registry lists that local repository.

examples:
  kitfs list
  kitfs list --format json
  kitfs list registry.example.com/team/llama
  kitfs list registry.example.com/team/llama:v1
  kitfs list --format '{{ .Repo }}:{{ .Tags }} {{ .Digest }}'
""",
    add_arguments=add_arguments,
    run=run,
)
