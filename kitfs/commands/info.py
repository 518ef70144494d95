"""`kitfs info`: a ModelKit's Kitfile, printed as `kit info` prints it.

kit (pkg/cmd/info) reads the config from local storage, or from the registry
with `-r/--remote`, and prints it with yaml.v3 (`MarshalToYAML`: no digests),
or only the field `--filter` names (modelkit/infofilter.py). One difference:
without `--remote` kit fails when local storage lacks the ModelKit; kitfs then
asks the reference's registry, as `kit diff` does.
"""

from __future__ import annotations

import argparse
import sys

from kitfs.commands.command import Command
from kitfs.commands.common import (
    add_network_options,
    client_options,
    inspect_reference,
    run_async,
)
from kitfs.errors import BadReferenceError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="REF")
    p.add_argument("-r", "--remote", action="store_true",
                   help="ask the registry, not kit's local storage")
    p.add_argument("-f", "--filter", metavar="FIELDS",
                   help="print only this field, named as kit names it: dot-separated Go "
                        "field names, case-insensitive in their first letter (package.name, "
                        ".model.parts, manifestVersion, dataSets, model.digest)")
    add_network_options(p)


def run(args: argparse.Namespace) -> int:
    from kitfs.modelkit.infofilter import parse_filter, select_field
    from kitfs.modelkit.kitfile import kitfile_to_yaml, value_to_yaml
    from kitfs.oci.reference import parse_reference

    ref = parse_reference(args.reference)
    if ref.extra_tags:
        raise BadReferenceError(f"invalid reference format: extra tags are not supported: "
                                f"{', '.join(ref.extra_tags)}")
    fields = parse_filter(args.filter) if args.filter is not None else None
    options = client_options(args)
    ins, _ = run_async(lambda: inspect_reference(
        ref, options, where="remote" if args.remote else "local-first", toc=False,
        parents=False))  # kit info shows the ModelKit's own Kitfile
    kitfile = ins.view.kitfile
    if fields is None:
        sys.stdout.write(kitfile_to_yaml(kitfile))
    else:
        sys.stdout.write(value_to_yaml(select_field(kitfile, fields)))
    return 0


COMMAND = Command(
    name="info",
    help="print a ModelKit's Kitfile (as `kit info`)",
    description="""\
Print the Kitfile of REF as `kit info` does: the YAML `kit` writes, without
layer digests. kitfs looks in kit's local storage first (where `kit pull` and
`kit pack` put ModelKits, including those named by a registry) and then in the
reference's registry; --remote asks the registry only. Only the manifest and
the config are read.

--filter prints one field, chosen the way kit chooses it: dot-separated names
of the Kitfile's Go fields, the first letter of each taken as upper case, no
array indexes. So `package.name`, `.model.path`, `model.parts`,
`manifestVersion`, `dataSets` (not `datasets`) and `model.digest` (the model
layer's digest, which the YAML leaves out).

examples:
  kitfs info mymodel:v1
  kitfs info -r registry.example.com/team/llama:v1
  kitfs info localhost:5000/demo/llm:v1 --filter package.name
  kitfs info localhost:5000/demo/llm:v1 -f .model.parts
""",
    add_arguments=add_arguments,
    run=run,
)
