"""`kitfs init`: the Kitfile `kit init` writes (pkg/lib/kitfile/generate), and that it packs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import kitfs
from kitfs.commands.init import list_directory
from kitfs.modelkit.generate import DirectoryListing, FileListing, generate_kitfile, go_ext
from kitfs.modelkit.kitfile import Code, Dataset, Docs, Kitfile, Package, kitfile_to_yaml
from kitfs.modelkit.licenses import detect_license
from registry import RegistryServer

MIT = """MIT License

Copyright (c) 2024 Ada

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
"""

APACHE = """
                                 Apache License
                           Version 2.0, January 2004
                        http://www.apache.org/licenses/
"""


def sample_project(root: Path) -> Path:
    """Weights with their configs, a dataset directory, code, docs, a notebook directory
    holding a stray weights file, a README, an MIT LICENSE and a top-level metadata file."""
    (root / "model").mkdir(parents=True)
    (root / "model" / "model.safetensors").write_bytes(os.urandom(300_000))
    (root / "model" / "config.json").write_text('{"hidden_size": 64}\n')
    (root / "model" / "tokenizer.json").write_text("{}\n")
    (root / "data").mkdir()
    (root / "data" / "train.csv").write_text("a,b\n1,2\n")
    (root / "data" / "test.parquet").write_bytes(b"PAR1")
    (root / "src").mkdir()
    (root / "src" / "train.py").write_text("print('train')\n")
    (root / "docs").mkdir()
    (root / "docs" / "guide.md").write_text("# guide\n")
    (root / "notebooks").mkdir()
    (root / "notebooks" / "explore.ipynb").write_text("{}\n")
    (root / "notebooks" / "probe.bin").write_bytes(b"x" * 10)
    (root / "README.md").write_text("# demo\n")
    (root / "LICENSE").write_text(MIT)
    (root / "params.yaml").write_text("lr: 0.1\n")
    return root


#: Worked out by hand from kit's rules: weights from model/ (largest > 1.5x the average is
#: the model, named after its path), metadata beside them and at the top level as parts,
#: the mixed notebooks/ a code entry whose weights still join the model (after src/, which
#: kit adds while walking), the MIT license on the model, docs in listing order.
SAMPLE_KITFILE = """\
manifestVersion: 1.0.0
package:
  name: demo
  description: a demo model
  authors: [Ada Lovelace]
model:
  name: model/model
  path: model/model.safetensors
  license: MIT
  parts:
    - path: model/config.json
    - path: model/tokenizer.json
    - path: notebooks/probe.bin
    - path: params.yaml
code:
  - path: src
  - path: notebooks
datasets:
  - path: data
docs:
  - path: LICENSE
    description: License file
  - path: README.md
    description: Readme file
  - path: docs
"""


def test_init_writes_kits_kitfile_which_packs_and_lists(
    registry: RegistryServer, tmp_path: Path
) -> None:
    project = sample_project(tmp_path / "demo")
    home = tmp_path / "home"
    proc = kitfs("init", str(project), "--name", "demo", "--desc", "a demo model",
                 "--author", "Ada Lovelace", home=home)
    assert proc.returncode == 0, proc.stderr
    assert (project / "Kitfile").read_text() == SAMPLE_KITFILE
    assert proc.stdout == (f"Generated Kitfile:\n\n{SAMPLE_KITFILE}\n"
                           f"Saved to path '{project / 'Kitfile'}'\n")
    assert (project / "Kitfile").stat().st_mode & 0o777 == 0o644

    ref = f"{registry.host}/init/demo:v1"
    packed = kitfs("pack", str(project), "-t", ref, home=home)
    assert packed.returncode == 0, packed.stderr
    assert "packed 11 layers" in packed.stdout
    listing = kitfs("ls", ref, home=home)
    assert listing.returncode == 0, listing.stderr
    files = {line.split()[-1] for line in listing.stdout.splitlines()[:-1]}
    expected = {p.relative_to(project).as_posix() for p in project.rglob("*") if p.is_file()}
    assert files - {d + "/" for d in ("data", "docs", "model", "notebooks", "src")} == expected
    assert listing.stdout.splitlines()[-1].startswith(f"{len(expected)} files")

    local = kitfs("pack", str(project), "-t", "init/demo:v1", home=home)
    assert local.returncode == 0, local.stderr
    assert "model/model.safetensors" in kitfs("ls", "init/demo:v1", home=home).stdout


def test_existing_kitfile_is_kept_unless_forced(tmp_path: Path) -> None:
    project = sample_project(tmp_path / "p")
    (project / "Kitfile").write_text("manifestVersion: 1.0.0\n")
    proc = kitfs("init", str(project), home=tmp_path / "h")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"kitfs: error: Kitfile already exists at {project / 'Kitfile'}. "
        "Use '--force' to overwrite"]
    assert (project / "Kitfile").read_text() == "manifestVersion: 1.0.0\n"

    forced = kitfs("init", str(project), "--force", home=tmp_path / "h")
    assert forced.returncode == 0, forced.stderr
    written = (project / "Kitfile").read_text()
    assert written.startswith("manifestVersion: 1.0.0\nmodel:\n  name: model/model\n")
    assert "package" not in written  # no name, description or author given, no terminal


@pytest.mark.parametrize("what", ["missing", "file"])
def test_a_directory_that_is_not_there_is_one_line(tmp_path: Path, what: str) -> None:
    target = tmp_path / "target"
    if what == "file":
        target.write_text("not a directory\n")
    proc = kitfs("init", str(target), home=tmp_path / "h")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr
    assert str(target) in lines[0]
    assert ("does not exist" if what == "missing" else "is not a directory") in lines[0]


def test_unreadable_subdirectory_is_one_line(tmp_path: Path) -> None:
    """A directory init cannot read is one line. Root reads every directory, so as root
    kitfs runs as nobody (setpriv) on a project in a world-traversable place."""
    as_nobody: list[str] = []
    base = tmp_path
    if os.geteuid() == 0:
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        base = Path(tempfile.mkdtemp(prefix="kitfs-init-", dir="/var/tmp"))
        base.chmod(0o755)
    try:
        project = sample_project(base / "p")
        for path in [project, *project.rglob("*")]:
            path.chmod(0o777 if path.is_dir() else 0o666)
        (project / "src").chmod(0)
        cmd = [*as_nobody, sys.executable, "-m", "kitfs.cli", "init", str(project),
               "--config", str(base / "h")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        (project / "src").chmod(0o755)
        wrote = (project / "Kitfile").exists()
    finally:
        if base is not tmp_path:
            shutil.rmtree(base, ignore_errors=True)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "cannot read directory" in lines[0] and "Traceback" not in proc.stderr
    assert not wrote  # nothing half-done left behind


def test_help_teaches_with_examples() -> None:
    for verb in ("init", "info", "diff"):
        proc = kitfs(verb, "--help")
        assert proc.returncode == 0
        assert "examples:\n  kitfs " + verb in proc.stdout


# -- kit's rules, one at a time (pure: modelkit/generate.py) ------------------------------------


def listing(*files: tuple[str, int], dirs: tuple[DirectoryListing, ...] = ()) -> DirectoryListing:
    return DirectoryListing(".", ".", tuple(FileListing(n, n, s) for n, s in files), dirs)


def subdir(name: str, *files: tuple[str, int], dirs: tuple[str, ...] = ()) -> DirectoryListing:
    return DirectoryListing(
        name, name, tuple(FileListing(n, f"{name}/{n}", s) for n, s in files),
        tuple(DirectoryListing(d, f"{name}/{d}") for d in dirs))


def generate(root: DirectoryListing, license_text: str = "") -> Kitfile:
    return generate_kitfile(root, Package(), lambda _path: detect_license(license_text))


def test_one_weights_file_is_the_model_named_after_its_path() -> None:
    kf = generate(listing(("llama.gguf", 100), ("config.json", 5), ("Kitfile", 9)))
    assert kf.model is not None
    assert (kf.model.name, kf.model.path) == ("llama", "llama.gguf")
    assert [p.path for p in kf.model.parts] == ["config.json"]
    assert kf.code == () and kf.datasets == ()  # the Kitfile itself is not classified


def test_shards_of_equal_size_are_a_model_and_its_parts_in_order() -> None:
    kf = generate(listing(dirs=(subdir("w", ("a.safetensors", 100), ("b.safetensors", 100),
                                       ("c.safetensors", 90)),)))
    assert kf.model is not None
    assert (kf.model.name, kf.model.path) == ("", "w/a.safetensors")
    assert [p.path for p in kf.model.parts] == ["w/b.safetensors", "w/c.safetensors"]
    # one clearly largest file (more than 1.5x the average) is the model, wherever it is
    kf = generate(listing(dirs=(subdir("w", ("adapter.bin", 10), ("base.bin", 100)),)))
    assert kf.model is not None and kf.model.path == "w/base.bin"
    assert [p.path for p in kf.model.parts] == ["w/adapter.bin"]


def test_without_weights_metadata_files_are_datasets() -> None:
    kf = generate(listing(("labels.json", 5), ("notes.txt", 5), ("rows.csv", 5)))
    assert kf.model is None
    assert [d.path for d in kf.datasets] == ["rows.csv", "labels.json", "notes.txt"]


def test_an_unknown_top_level_file_makes_one_code_layer_for_everything() -> None:
    kf = generate(listing(("train.py", 5), dirs=(subdir("src", ("a.py", 1)),)))
    assert kf.code == (Code(path="."),)  # src/ is dropped: `.` holds it


def test_more_than_five_code_directories_become_one_layer() -> None:
    dirs = tuple(subdir(f"d{i}", ("x.py", 1)) for i in range(6))
    assert generate(listing(dirs=dirs)).code == (Code(path="."),)
    assert [c.path for c in generate(listing(dirs=dirs[:5])).code] == [
        f"d{i}" for i in range(5)]


def test_subdirectories_are_judged_by_their_files() -> None:
    kf = generate(listing(dirs=(
        subdir("build", ("w.bin", 1)),  # named for code whatever it holds
        subdir("docs", ("a.csv", 1)),  # named for docs
        subdir("empty"),
        subdir("eval", ("a.csv", 1), ("b.zip", 1), ("meta.json", 1)),  # data (+ metadata)
        subdir("manual", ("a.md", 1), ("b.pdf", 1)),
        subdir("meta", ("a.json", 1)),  # only metadata: code
        subdir("nested", ("a.csv", 1), dirs=("deeper",)),  # a subdirectory is unknown: mixed
    )))
    assert kf.model is None
    assert [c.path for c in kf.code] == ["build", "empty", "meta", "nested"]
    assert kf.datasets == (Dataset(path="eval"),)
    assert kf.docs == (Docs(path="docs"), Docs(path="manual"))


def test_readme_and_license_files_and_where_the_license_goes() -> None:
    root = listing(("LICENSE.txt", 5), ("readme.rst", 5), ("data.csv", 5))
    kf = generate(root, MIT)
    assert kf.docs == (Docs(path="LICENSE.txt", description="License file"),
                       Docs(path="readme.rst", description="Readme file"))
    assert kf.datasets == (Dataset(path="data.csv", license="MIT"),)  # the only dataset
    kf = generate(listing(("LICENSE", 5), ("a.csv", 1), ("b.csv", 1)), APACHE)
    assert kf.package.license == "Apache-2.0" and all(not d.license for d in kf.datasets)
    kf = generate(listing(("LICENSE", 5), ("m.onnx", 1)), "something else entirely")
    assert kf.model is not None and kf.model.license == ""


def test_the_yaml_is_what_kit_writes_for_a_bare_kitfile() -> None:
    kf = generate_kitfile(listing(("m.pt", 1)), Package(name="nm", authors=("A",)),
                          lambda _p: "")
    assert kitfile_to_yaml(kf) == (
        "manifestVersion: 1.0.0\npackage:\n  name: nm\n  authors: [A]\n"
        "model:\n  name: m\n  path: m.pt\n")


def test_go_ext_and_license_detection() -> None:
    assert go_ext(".bin") == ".bin" and go_ext("a.tar.gz") == ".gz" and go_ext("x") == ""
    assert detect_license(MIT) == "MIT" and detect_license(APACHE) == "Apache-2.0"
    bsd3 = ("Redistribution and use in source and binary forms, with or without\n"
            "modification, are permitted ... Neither the name of the copyright holder")
    assert detect_license(bsd3) == "BSD-3-Clause"
    assert detect_license("GNU LESSER GENERAL PUBLIC LICENSE\nVersion 3, 29 June 2007\n"
                          "... the GNU General Public License ...") == "LGPL-3.0"
    assert detect_license("GNU GENERAL PUBLIC LICENSE\n Version 3, 29 June 2007") == "GPL-3.0"
    assert detect_license(MIT + APACHE) == ""  # two licenses: kit names none


def test_listing_skips_symlinks_and_sorts_by_name(tmp_path: Path) -> None:
    (tmp_path / "b.bin").write_bytes(b"12")
    (tmp_path / "a.csv").write_text("x")
    (tmp_path / "link.bin").symlink_to(tmp_path / "b.bin")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "z.md").write_text("z")
    (tmp_path / "sublink").symlink_to(tmp_path / "sub")
    got = list_directory(tmp_path)
    assert [(f.name, f.path, f.size) for f in got.files] == [("a.csv", "a.csv", 1),
                                                              ("b.bin", "b.bin", 2)]
    assert [(d.name, d.path) for d in got.subdirs] == [("sub", "sub")]
    assert got.subdirs[0].files == (FileListing("z.md", "sub/z.md", 1),)
