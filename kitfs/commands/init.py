"""`kitfs init`: write the Kitfile `kit init` would write for a directory.

kit (pkg/cmd/kitinit/cmd.go) refuses to replace DIR/Kitfile without
`--force`, asks for a name, description and author on a terminal when the
flags do not give them, lists the directory (two levels, files with their
sizes), classifies it (modelkit/generate.py), writes the Kitfile as its YAML
encoder does (0644) and prints it. The walk and the reading of a license
file are here; the rules are pure and live with the Kitfile code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from kitfs.commands.command import Command
from kitfs.errors import KitfsError

TYPE_CHECKING = False  # typing's, without importing typing: command.py says why
if TYPE_CHECKING:
    from kitfs.modelkit.generate import DirectoryListing

log = logging.getLogger(__name__)

#: Enough of a license file to tell which license it is (licensecheck reads the whole file;
#: license texts are tens of kilobytes).
LICENSE_READ_LIMIT = 1 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, metavar="DIR", help="the directory to describe")
    p.add_argument("--name", default="", help="the ModelKit's name (package.name)")
    p.add_argument("--desc", default="", help="its description (package.description)")
    p.add_argument("--author", default="", help="its author (package.authors)")
    p.add_argument("-f", "--force", action="store_true",
                   help="replace an existing DIR/Kitfile")


class InitError(KitfsError):
    """The directory cannot be described, or its Kitfile cannot be written."""


def list_directory(root: Path) -> DirectoryListing:
    """kit's DirectoryListingFromFS: regular files and directories, by name, no symlinks."""
    from kitfs.modelkit.generate import DirectoryListing, FileListing

    def walk(rel: str) -> DirectoryListing:
        full = root / rel
        try:
            with os.scandir(full) as it:
                entries = sorted(it, key=lambda e: os.fsencode(e.name))
        except OSError as exc:
            raise InitError(f"cannot read directory {full}: {exc.strerror or exc}") from None
        files: list[FileListing] = []
        subdirs: list[DirectoryListing] = []
        for entry in entries:
            path = entry.name if rel == "." else f"{rel}/{entry.name}"
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(walk(path))
                elif entry.is_file(follow_symlinks=False):
                    files.append(FileListing(entry.name, path,
                                             entry.stat(follow_symlinks=False).st_size))
            except OSError as exc:
                raise InitError(f"cannot stat {full / entry.name}: "
                                f"{exc.strerror or exc}") from None
        return DirectoryListing(os.path.basename(rel), rel, tuple(files), tuple(subdirs))

    return walk(".")


def _license_of(root: Path) -> Callable[[str], str]:
    from kitfs.modelkit.licenses import detect_license

    def license_of(path: str) -> str:
        try:
            with open(root / path, "rb") as f:
                text = f.read(LICENSE_READ_LIMIT).decode("utf-8", "replace")
        except OSError as exc:
            log.warning("cannot read %s to tell its license: %s", root / path, exc)
            return ""
        found = detect_license(text)
        if not found:
            log.warning("unable to determine the license in %s", root / path)
        return found

    return license_of


def _ask(prompt: str) -> str:
    """One answer from the terminal, as kit's PromptForInput (trimmed; EOF is no answer)."""
    try:
        return input(prompt).strip()
    except EOFError:
        print()
        return ""


def run(args: argparse.Namespace) -> int:
    from kitfs.modelkit.generate import generate_kitfile
    from kitfs.modelkit.kitfile import Package, kitfile_to_yaml
    from kitfs.oci.layout import atomic_write

    root: Path = args.directory
    kitfile_path = root / "Kitfile"
    if os.path.lexists(kitfile_path) and not args.force:
        raise InitError(f"Kitfile already exists at {kitfile_path}. Use '--force' to overwrite")
    if not root.is_dir():
        what = "does not exist" if not os.path.lexists(root) else "is not a directory"
        raise InitError(f"cannot initialise {root}: it {what}")
    name, desc, author = args.name, args.desc, args.author
    if sys.stdin.isatty():  # kit asks for what the flags left out, on a terminal only
        name = name or _ask("Enter a name for the ModelKit: ")
        desc = desc or _ask("Enter a short description for the ModelKit: ")
        author = author or _ask("Enter an author for the ModelKit: ")
    package = Package(name=name, description=desc, authors=(author,) if author else ())
    kitfile = generate_kitfile(list_directory(root), package, _license_of(root))
    text = kitfile_to_yaml(kitfile)
    try:
        atomic_write(kitfile_path, text.encode(), 0o644)
    except OSError as exc:
        raise InitError(f"cannot write {kitfile_path}: {exc.strerror or exc}") from None
    print(f"Generated Kitfile:\n\n{text}")
    print(f"Saved to path '{kitfile_path}'")
    return 0


COMMAND = Command(
    name="init",
    help="write a Kitfile for a directory of weights, data, code and docs (as `kit init`)",
    description="""\
Look at DIR and write DIR/Kitfile as `kit init` does, so that `kitfs pack`
(or `kit pack`) can pack it. Files are classified by their names: model weights
(.safetensors .gguf .bin .pt .onnx .h5 .npz ...) become the model, the
largest as `model.path` when it stands out, the others as parts; .json,
.yaml, .xml and .txt files beside them become model parts (datasets when
there are no weights); .csv .parquet .tar .zip are datasets; .md .adoc
.html .pdf, README* and LICENSE* are docs; `docs/` is docs, `src/ pkg/
lib/ build/` are code. A subdirectory is one entry when its files are all
of one kind, else a code entry; any other top-level file, or more than five
such directories, makes the whole directory one code layer `.`. The license
a LICENSE file holds (Apache-2.0, MIT, BSD, GPL, ...) is recorded.

An existing Kitfile is kept unless --force. On a terminal, kitfs asks for a
name, description and author that the flags do not give. Edit the result
as you like: `kitfs pack` checks it as strictly as `kit pack`.

examples:
  kitfs init .
  kitfs init ./my-model --name mymodel --desc "This is my model's description"
  kitfs init ./my-model --author "Ada Lovelace" --force
  kitfs init ./my-model && kitfs pack ./my-model -t localhost:5000/demo/my-model:v1
""",
    add_arguments=add_arguments,
    run=run,
)
