"""kit's local storage: one OCI image layout with per-repository indexes.

`kit` keeps every local ModelKit in `$KITOPS_HOME/storage/` (see
pkg/lib/repo/local/): blobs under `blobs/sha256/`, the layout's own
`index.json` (maintained by oras' OCI store, every manifest listed by digest),
and per repository a `<base64url(registry/repo)>-index.json` (an OCI index
listing its manifests) plus `<same>-tags.json` (`{"tag": descriptor}`); both
are deleted once empty. `kit pull` downloads into `ingest/<hex>` and renames
a blob into place only once its digest checked (pkg/lib/repo/local/pull.go).
Writing the same files makes what kitfs stores visible to `kit list`, and
lets kitfs read what `kit` stored.

Every file is replaced atomically (temporary file, fsync, rename), so a crash
never leaves a half-written index that `kit` would refuse to parse, nor a blob
under its digest that does not match it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from kitfs.errors import IntegrityError, KitfsError, LocalStorageError, NotFoundError
from kitfs.oci.reference import is_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_LAYOUT_VERSION = b'{"imageLayoutVersion":"1.0.0"}'


#: The fields of an OCI descriptor in the order Go's ocispec.Descriptor marshals them.
_DESCRIPTOR_FIELDS = ("mediaType", "artifactType", "digest", "size", "urls", "annotations",
                      "data", "platform")
#: kit's name for a repository's index file (constants.localIndexNameRegexp).
_REPO_INDEX_RE = re.compile(r"^([-A-Za-z0-9_-]*={0,3})-index\.json$")


def go_json(obj: Any, indent: int | None = None) -> bytes:
    """JSON the way Go's encoding/json writes these small documents: compact (or as
    MarshalIndent with `indent` spaces), HTML-escaped, UTF-8."""
    if indent is None:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    else:
        text = json.dumps(obj, indent=indent, ensure_ascii=False)
    for char, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                      ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, esc)
    return text.encode()


def _go_descriptor(desc: dict[str, Any]) -> dict[str, Any]:
    """A descriptor as Go re-marshals it: known fields in struct order, maps sorted."""
    out: dict[str, Any] = {}
    for key in _DESCRIPTOR_FIELDS:
        value = desc.get(key)
        if value in (None, "", [], {}) and key != "size":
            continue
        out[key] = dict(sorted(value.items())) if isinstance(value, dict) else value
    return out


def _load_json(path: Path, default: Any) -> Any:
    """The JSON object in `path` (every file kit keeps here holds one), or `default`."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as exc:
        raise LocalStorageError(f"cannot read {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise LocalStorageError(f"cannot read {path}: not a JSON object")
    return doc


def _descriptors(doc: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    manifests = doc.get("manifests") or []
    if not isinstance(manifests, list) or not all(
        isinstance(m, dict) and isinstance(m.get("digest"), str) for m in manifests
    ):
        raise LocalStorageError(f"cannot read {path}: malformed manifests list")
    return manifests


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so readers see the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def repo_key(name: str) -> str:
    """The file-name prefix `kit` uses for a repository (`registry/repo`)."""
    return base64.urlsafe_b64encode(name.encode()).decode()


def repo_name(file_name: str) -> str | None:
    """The repository (`registry/repo`) whose index file this is, None for any other file."""
    match = _REPO_INDEX_RE.match(file_name)
    if match is None:
        return None
    try:
        return base64.urlsafe_b64decode(match.group(1)).decode()
    except (ValueError, UnicodeDecodeError):
        return None


def descriptor(media_type: str, digest: str, size: int) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size}


class RepoIndex:
    """One repository's manifests and tags, kept as kit keeps them (its localIndex and
    tagsIndex, pkg/lib/repo/local/repository.go).

    `manifests` lists descriptors in the order they were added (a digest at most
    once); `tags` maps each tag to a descriptor of one of them. `save()` writes
    both files as Go marshals them (tags sorted, as Go sorts map keys) and
    deletes each once empty, as kit does. Nothing is written before `save()`.
    """

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.index_path = root / f"{repo_key(name)}-index.json"
        self.tags_path = root / f"{repo_key(name)}-tags.json"
        self._doc: dict[str, Any] = _load_json(self.index_path, None) or {"schemaVersion": 2}
        self.manifests = _descriptors(self._doc, self.index_path)
        tags = _load_json(self.tags_path, {})
        if not all(isinstance(d, dict) and isinstance(d.get("digest"), str)
                   for d in tags.values()):
            raise LocalStorageError(f"cannot read {self.tags_path}: malformed tag descriptors")
        self.tags: dict[str, dict[str, Any]] = tags

    def has(self, digest: str) -> bool:
        return any(m["digest"] == digest for m in self.manifests)

    def resolve(self, ref: str) -> dict[str, Any]:
        """The descriptor a tag or digest names here; NotFoundError if none."""
        if is_digest(ref):
            for desc in self.manifests:
                if desc["digest"] == ref:
                    return desc
        elif ref in self.tags:
            return self.tags[ref]
        sep = "@" if is_digest(ref) else ":"
        raise NotFoundError(f"{display_name(self.name + sep + ref)} is not in kit's local storage")

    def tags_of(self, digest: str) -> list[str]:
        return sorted(tag for tag, desc in self.tags.items() if desc["digest"] == digest)

    def add(self, desc: dict[str, Any]) -> None:
        if not self.has(desc["digest"]):
            self.manifests.append(desc)

    def tag(self, desc: dict[str, Any], tag: str) -> None:
        if not self.has(desc["digest"]):
            raise NotFoundError(f"{desc['digest']} is not in {display_name(self.name)}")
        self.tags[tag] = desc

    def untag(self, tag: str) -> None:
        if self.tags.pop(tag, None) is None:
            raise NotFoundError(f"{display_name(f'{self.name}:{tag}')} is not in kit's local "
                                "storage")

    def drop(self, digest: str) -> None:
        """Forget a manifest and every tag pointing at it (kit's localIndex.delete)."""
        for tag in self.tags_of(digest):
            del self.tags[tag]
        self.manifests = [m for m in self.manifests if m["digest"] != digest]

    def save(self) -> None:
        try:
            if self.tags:
                doc = {tag: _go_descriptor(d) for tag, d in sorted(self.tags.items())}
                atomic_write(self.tags_path, go_json(doc))
            else:
                self.tags_path.unlink(missing_ok=True)
            if self.manifests:
                self._doc["manifests"] = [_go_descriptor(m) for m in self.manifests]
                atomic_write(self.index_path, go_json(self._doc))
            else:
                self.index_path.unlink(missing_ok=True)
        except OSError as exc:
            raise LocalStorageError(f"cannot update kit storage at {self.index_path.parent}: "
                                    f"{exc.strerror or exc}") from None


def display_name(name: str) -> str:
    """A repository (or `repository:tag`, `repository@digest`) as kit shows it: its own
    local registry and default repository left out (util.FormatRepositoryForDisplay)."""
    return name.removeprefix("localhost/").removeprefix("_").removeprefix("@")


class LocalStorage:
    """Read and write ModelKits in `kit`'s local storage directory."""

    def __init__(self, storage_dir: Path) -> None:
        self.root = storage_dir

    @classmethod
    def for_home(cls, kitops_home: Path) -> LocalStorage:
        return cls(kitops_home / "storage")

    # -- blobs -------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        if not is_digest(digest):
            raise LocalStorageError(f"invalid digest {digest!r}")
        algorithm, hexpart = digest.split(":", 1)
        return self.root / "blobs" / algorithm / hexpart

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def ensure_layout(self) -> None:
        try:
            (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            layout = self.root / "oci-layout"
            if not layout.exists():
                atomic_write(layout, OCI_LAYOUT_VERSION)
        except OSError as exc:
            raise LocalStorageError(f"cannot create kit storage at {self.root}: {exc}") from None

    def staging_file(self) -> tuple[BinaryIO, Path]:
        """A temporary file inside the store, so adopting it is a rename, not a copy."""
        self.ensure_layout()
        try:
            fd, name = tempfile.mkstemp(prefix=".ingest-", dir=self.root / "blobs" / "sha256")
        except OSError as exc:
            raise LocalStorageError(f"cannot write to kit storage at {self.root}: {exc}") from None
        return os.fdopen(fd, "w+b"), Path(name)

    def adopt_blob(self, path: Path, digest: str, mode: int = 0o644) -> None:
        """Move a file whose digest the caller computed into the store (`kit pull` leaves
        the blobs it downloads 0600, `kit pack` 0644)."""
        target = self.blob_path(digest)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                path.unlink()
            else:
                os.chmod(path, mode)
                os.replace(path, target)
        except OSError as exc:
            raise LocalStorageError(f"cannot store blob {digest}: {exc}") from None

    def put_blob_bytes(self, data: bytes, mode: int = 0o644) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        target = self.blob_path(digest)
        if not target.exists():
            try:
                atomic_write(target, data, mode)
            except OSError as exc:
                raise LocalStorageError(f"cannot store blob {digest}: {exc}") from None
        return digest

    def read_blob(self, digest: str, *, verify: bool = True) -> bytes:
        try:
            data = self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise self._missing(digest) from None
        except OSError as exc:
            raise LocalStorageError(f"cannot read blob {digest}: {exc}") from None
        if verify and "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(f"blob {digest} in {self.root} does not match its digest")
        return data

    @contextlib.contextmanager
    def open_blob(self, digest: str) -> Iterator[BinaryIO]:
        try:
            f = self.blob_path(digest).open("rb")
        except FileNotFoundError:
            raise self._missing(digest) from None
        with f:
            yield f

    def _missing(self, digest: str) -> NotFoundError:
        return NotFoundError(f"blob {digest} is not in kit's local storage {self.root}")


    def ingest_path(self, digest: str) -> Path:
        """Where `kit pull` (and `kitfs pull`) download a blob before it is checked:
        `ingest/<hex>`, kept across interruptions so that a pull resumes."""
        return self.root / "ingest" / self.blob_path(digest).name

    # -- indexes -----------------------------------------------------------

    def repo(self, name: str) -> RepoIndex:
        """Repository `name`'s index and tags, as they are now (`save()` writes changes)."""
        return RepoIndex(self.root, name)

    def repositories(self) -> list[str]:
        """Every repository with an index file, sorted (kit's GetAllLocalRepos)."""
        try:
            names = [repo_name(entry.name) for entry in os.scandir(self.root)
                     if not entry.is_dir()]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise LocalStorageError(f"cannot read kit storage at {self.root}: {exc}") from None
        return sorted(n for n in names if n is not None)

    def add_manifest(self, name: str, manifest: bytes, tags: tuple[str, ...]) -> str:
        """Store a manifest for repository `name` (`registry/repo`) and point `tags` at it."""
        self.ensure_layout()
        digest = self.put_blob_bytes(manifest)
        desc = descriptor(OCI_MANIFEST, digest, len(manifest))
        repo = self.repo(name)
        repo.add(desc)
        for tag in tags:
            repo.tag(desc, tag)
        repo.save()
        self._update_layout_index(add=desc)
        return digest

    def resolve(self, name: str, ref: str) -> tuple[bytes, str, str]:
        """(manifest bytes, media type, digest) for a tag or digest of repository `name`."""
        desc = self.repo(name).resolve(ref)
        return self.read_blob(desc["digest"]), OCI_MANIFEST, desc["digest"]

    def list_tags(self, name: str) -> list[str]:
        return sorted(self.repo(name).tags)

    def delete_manifest(
        self, name: str, digest: str, blob_annotations: tuple[str, ...] = ()
    ) -> list[str]:
        """Remove a manifest from repository `name` as `kit remove` does (localRepo.Delete):
        its tags and index entry go; unless another repository lists it, so does the
        manifest blob with its entry in `index.json`, and (oras' AutoGC) every blob it
        referenced that no remaining manifest references. Manifest annotations named in
        `blob_annotations` pin blobs too (a kitfs table of contents). Returns the blobs
        deleted."""
        repo = self.repo(name)
        if not repo.has(digest):
            raise NotFoundError(f"{display_name(f'{name}@{digest}')} is not in kit's local storage")
        referenced = self._references(digest, blob_annotations)
        repo.drop(digest)
        repo.save()
        if any(self.repo(other).has(digest) for other in self.repositories()):
            return []
        self._update_layout_index(remove=digest)
        in_use: set[str] = set()
        for other in self._manifests_in_use():
            in_use |= self._references(other, blob_annotations)
        deleted = []
        for blob in [digest, *sorted(referenced - in_use - {digest})]:
            try:
                self.blob_path(blob).unlink()
                deleted.append(blob)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise LocalStorageError(f"cannot delete blob {blob}: {exc.strerror}") from None
        return deleted

    def _references(self, manifest_digest: str, blob_annotations: tuple[str, ...]) -> set[str]:
        """The blobs a stored manifest needs: config, layers and those its annotations in
        `blob_annotations` name. Empty for a missing or unreadable manifest."""
        try:
            doc = json.loads(self.read_blob(manifest_digest, verify=False))
        except (KitfsError, ValueError):
            return set()
        if not isinstance(doc, dict):
            return set()
        descs = [doc.get("config"), *(doc.get("layers") or [])]
        found = {d["digest"] for d in descs if isinstance(d, dict) and isinstance(
            d.get("digest"), str) and is_digest(d["digest"])}
        annotations = doc.get("annotations")
        if isinstance(annotations, dict):
            for key in blob_annotations:
                value = annotations.get(key)
                if isinstance(value, str) and is_digest(value):
                    found.add(value)
        return found

    def _manifests_in_use(self) -> set[str]:
        """Every manifest the layout's index or a repository lists."""
        layout = _load_json(self.root / "index.json", {})
        found = {m["digest"] for m in _descriptors(layout, self.root / "index.json")}
        for name in self.repositories():
            found |= {m["digest"] for m in self.repo(name).manifests}
        return found

    def _update_layout_index(
        self, *, add: dict[str, Any] | None = None, remove: str | None = None
    ) -> None:
        """List a manifest in the layout's `index.json` (as oras' store does, by digest) or
        take it out; a new file starts as oras writes one."""
        path = self.root / "index.json"
        try:
            doc = _load_json(path, None) or {"schemaVersion": 2, "mediaType": OCI_INDEX,
                                              "manifests": []}
            manifests = _descriptors(doc, path)
            if add is not None:
                if any(m["digest"] == add["digest"] for m in manifests):
                    return
                manifests = [*manifests, _go_descriptor(add)]
            if remove is not None:
                kept = [m for m in manifests if m["digest"] != remove]
                if len(kept) == len(manifests):
                    return
                manifests = kept
            doc["manifests"] = manifests
            atomic_write(path, go_json(doc))
        except OSError as exc:
            raise LocalStorageError(f"cannot update kit storage at {self.root}: {exc}") from None
