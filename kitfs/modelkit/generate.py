"""`kit init`'s Kitfile for a directory: which files are weights, data, docs or code.

A port of kitops pkg/lib/kitfile/generate (generate.go, filesystem.go), kept
to its rules so that `kitfs init` writes the Kitfile `kit init` writes:

- Only the top level and its immediate subdirectories are looked at; the
  listing holds regular files and directories (symlinks are skipped), each
  level sorted by name; paths are relative, without `./`.
- Top-level files: a Kitfile name is skipped; a name starting with `readme`
  or `license` (any case) is a docs entry ("Readme file", "License file"; a
  license file's text also names the license, see below); otherwise the
  suffix decides (case-sensitive): model weights, metadata (.json .yaml
  .xml .txt), docs (.md .adoc .html .pdf), datasets (.tar .zip .parquet
  .csv). Any other top-level file means one catch-all code layer `.`.
- A subdirectory named `docs` is a docs entry; `src`, `pkg`, `lib` or
  `build` a code entry. Any other is judged by its own files (a directory
  below it counts as unknown): all weights (plus metadata) -> its files join
  the model; all datasets -> a dataset entry; all docs -> a docs entry;
  anything else (unknown, only metadata, empty, or mixed) -> a code entry
  for the directory, and the weights of a mixed directory still join the
  model. More than five such code directories become the one layer `.`.
- The model: one weights file is `model.path` (named after the path without
  its extension); several: the largest is the model if it is more than 1.5x
  the average size (integer arithmetic), the rest parts; else the first is
  the model (unnamed) and the rest parts, in listing order. Top-level
  metadata files become model parts when there is a model, else datasets.
- A detected license goes to the model, else the only dataset, else the only
  code entry, else the package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import IntEnum

from kitfs.modelkit.kitfile import (
    KITFILE_NAMES,
    MANIFEST_VERSION,
    Code,
    Dataset,
    Docs,
    Kitfile,
    Model,
    ModelPart,
    Package,
)


class FileType(IntEnum):
    """kit's fileType, in its order (a directory's verdict walks them in this order)."""

    MODEL = 0
    DATASET = 1
    CODE = 2
    DOCS = 3
    METADATA = 4
    UNKNOWN = 5


MODEL_SUFFIXES = (
    ".safetensors", ".pkl", ".joblib",
    ".bin", ".pth", ".pt", ".mar", ".pt2", ".ptl",  # PyTorch
    ".pb", ".ckpt", ".tflite", ".tfrecords",  # TensorFlow
    ".npy", ".npz",  # NumPy
    ".keras", ".h5", ".caffemodel", ".pmml", ".coreml",  # Keras and others
    ".gguf", ".ggml", ".ggmf", ".llamafile", ".onnx",
)
DOCS_SUFFIXES = (".md", ".adoc", ".html", ".pdf")
METADATA_SUFFIXES = (".json", ".yaml", ".xml", ".txt")
DATASET_SUFFIXES = (".tar", ".zip", ".parquet", ".csv")
CODE_DIRECTORIES = ("src", "pkg", "lib", "build")
#: More code directories than this become one catch-all layer `.`.
MAX_CODE_DIRECTORIES = 5


@dataclass(frozen=True)
class FileListing:
    name: str
    #: Relative to the directory being initialised, `/`-separated, no `./`.
    path: str
    size: int


@dataclass(frozen=True)
class DirectoryListing:
    name: str
    path: str
    files: tuple[FileListing, ...] = ()
    subdirs: tuple[DirectoryListing, ...] = ()


def file_type(name: str) -> FileType:
    if name.endswith(MODEL_SUFFIXES):
        return FileType.MODEL
    if name.endswith(METADATA_SUFFIXES):
        return FileType.METADATA
    if name.endswith(DOCS_SUFFIXES):
        return FileType.DOCS
    if name.endswith(DATASET_SUFFIXES):
        return FileType.DATASET
    return FileType.UNKNOWN


def go_ext(name: str) -> str:
    """Go's filepath.Ext: from the last dot of the last element (`.bin` -> `.bin`)."""
    base = name.rpartition("/")[2]
    dot = base.rfind(".")
    return base[dot:] if dot >= 0 else ""


@dataclass
class _Draft:
    """The Kitfile while it is being put together (kit fills its struct in place)."""

    package: Package
    model: Model | None = None
    parts: list[ModelPart] = field(default_factory=list)
    code: list[Code] = field(default_factory=list)
    datasets: list[Dataset] = field(default_factory=list)
    docs: list[Docs] = field(default_factory=list)


def generate_kitfile(
    listing: DirectoryListing, package: Package, license_of: Callable[[str], str]
) -> Kitfile:
    """The Kitfile `kit init` writes for `listing`.

    `license_of(path)` names the license (an SPDX id, "" if unknown) of a
    top-level file whose name starts with `license` (licenses.py); it is the
    only way file contents matter, and the caller does the reading.
    """
    draft = _Draft(package)
    catch_all = False
    unprocessed: list[str] = []
    model_files: list[FileListing] = []
    metadata_files: list[FileListing] = []
    detected = ""
    for f in listing.files:
        if f.name in KITFILE_NAMES:
            continue
        lower = f.name.lower()
        if lower.startswith("readme"):
            draft.docs.append(Docs(path=f.name, description="Readme file"))
            continue
        if lower.startswith("license"):
            draft.docs.append(Docs(path=f.name, description="License file"))
            detected = license_of(f.path)
            continue
        kind = file_type(f.path)
        if kind is FileType.MODEL:
            model_files.append(f)
        elif kind is FileType.METADATA:
            metadata_files.append(f)
        elif kind is FileType.DOCS:
            draft.docs.append(Docs(path=f.path))
        elif kind is FileType.DATASET:
            draft.datasets.append(Dataset(path=f.path))
        else:
            catch_all = True

    for sub in listing.subdirs:
        weights, handled = _add_directory(draft, sub)
        if not handled:
            unprocessed.append(sub.path)
        model_files.extend(weights)

    if model_files:
        _add_model(draft, model_files)
        draft.parts.extend(ModelPart(path=f.path) for f in metadata_files)
    else:
        draft.datasets.extend(Dataset(path=f.path) for f in metadata_files)

    if catch_all or len(unprocessed) > MAX_CODE_DIRECTORIES:
        # kit replaces every code entry: one layer `.` holds whatever the others do not.
        draft.code[:] = [Code(path=".")]
    else:
        draft.code.extend(Code(path=p) for p in unprocessed)

    if detected:
        if draft.model is not None:
            draft.model = replace(draft.model, license=detected)
        elif len(draft.datasets) == 1:
            draft.datasets[0] = replace(draft.datasets[0], license=detected)
        elif len(draft.code) == 1:
            draft.code[0] = replace(draft.code[0], license=detected)
        else:
            draft.package = replace(draft.package, license=detected)

    model = draft.model
    if model is not None:
        model = replace(model, parts=tuple(draft.parts))
    return Kitfile(manifest_version=MANIFEST_VERSION, package=draft.package, model=model,
                   code=tuple(draft.code), datasets=tuple(draft.datasets),
                   docs=tuple(draft.docs))


def _add_directory(draft: _Draft, d: DirectoryListing) -> tuple[list[FileListing], bool]:
    """(weights found in `d`, whether `d` got its own entry); kit's addDirToKitfile."""
    if d.name == "docs":
        draft.docs.append(Docs(path=d.path))
        return [], True
    if d.name in CODE_DIRECTORIES:
        draft.code.append(Code(path=d.path))
        return [], True
    contents: dict[FileType, int] = {t: 0 for t in FileType}
    contents[FileType.UNKNOWN] += len(d.subdirs)
    weights: list[FileListing] = []
    metadata: list[FileListing] = []
    for f in d.files:
        kind = file_type(f.name)
        if kind is FileType.MODEL:
            weights.append(f)
        elif kind is FileType.METADATA:
            metadata.append(f)
        contents[kind] += 1
    overall = FileType.UNKNOWN
    mixed = False
    for kind in FileType:
        if contents[kind] and kind is not FileType.METADATA:
            if overall is not FileType.UNKNOWN:
                mixed = True
            overall = kind
    if mixed:
        return weights, False
    if overall is FileType.MODEL:
        return weights + metadata, True
    if overall is FileType.DATASET:
        draft.datasets.append(Dataset(path=d.path))
        return weights, True
    if overall is FileType.DOCS:
        draft.docs.append(Docs(path=d.path))
        return weights, True
    return weights, False


def _add_model(draft: _Draft, files: list[FileListing]) -> None:
    if len(files) == 1:
        only = files[0]
        draft.model = Model(path=only.path, name=_strip_ext(only))
        return
    largest: FileListing | None = None
    largest_size = 0
    total = 0
    for f in files:
        if f.size > largest_size:
            largest_size, largest = f.size, f
        total += f.size
    average = total // len(files)
    if largest is not None and largest_size > average + average // 2:
        draft.model = Model(path=largest.path, name=_strip_ext(largest))
        draft.parts.extend(ModelPart(path=f.path) for f in files if f != largest)
    else:
        draft.model = Model(path=files[0].path)
        draft.parts.extend(ModelPart(path=f.path) for f in files[1:])


def _strip_ext(f: FileListing) -> str:
    """kit names the model `strings.TrimSuffix(path, filepath.Ext(name))`."""
    ext = go_ext(f.name)
    return f.path[: -len(ext)] if ext and f.path.endswith(ext) else f.path
