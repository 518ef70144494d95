"""kit's local storage: one OCI image layout with per-repository indexes.

`kit` keeps every local ModelKit in `$KITOPS_HOME/storage/` (see
pkg/lib/repo/local/): blobs under `blobs/sha256/`, the layout's own
`index.json` (maintained by oras' OCI store), and per repository a
`<base64url(registry/repo)>-index.json` (an OCI index listing its manifests)
plus `<same>-tags.json` (`{"tag": descriptor}`). Writing the same files makes
what `kitfs pack` stores visible to `kit list`, and lets kitfs read what `kit
pack` stored.

Every file is replaced atomically (temporary file, fsync, rename), so a crash
never leaves a half-written index that `kit` would refuse to parse.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from kitfs.errors import IntegrityError, LocalStorageError, NotFoundError
from kitfs.oci.reference import is_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_LAYOUT_VERSION = b'{"imageLayoutVersion":"1.0.0"}'


def _go_json(obj: Any) -> bytes:
    """JSON the way Go's encoding/json writes these small documents (compact, HTML-escaped)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    for char, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, esc)
    return text.encode()


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


def descriptor(media_type: str, digest: str, size: int) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size}


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

    def adopt_blob(self, path: Path, digest: str) -> None:
        """Move a file whose digest the caller computed into the store."""
        target = self.blob_path(digest)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                path.unlink()
            else:
                os.chmod(path, 0o644)
                os.replace(path, target)
        except OSError as exc:
            raise LocalStorageError(f"cannot store blob {digest}: {exc}") from None

    def put_blob_bytes(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        target = self.blob_path(digest)
        if not target.exists():
            try:
                atomic_write(target, data)
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

    # -- indexes -----------------------------------------------------------

    def _load_json(self, path: Path, default: Any) -> Any:
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

    def _index_path(self, name: str) -> Path:
        return self.root / f"{repo_key(name)}-index.json"

    def _tags_path(self, name: str) -> Path:
        return self.root / f"{repo_key(name)}-tags.json"

    def add_manifest(self, name: str, manifest: bytes, tags: tuple[str, ...]) -> str:
        """Store a manifest for repository `name` (`registry/repo`) and point `tags` at it."""
        self.ensure_layout()
        digest = self.put_blob_bytes(manifest)
        desc = descriptor(OCI_MANIFEST, digest, len(manifest))
        try:
            layout_index = self._load_json(self.root / "index.json", None) or {
                "schemaVersion": 2,
                "manifests": [],
            }
            if not any(m.get("digest") == digest for m in layout_index.get("manifests") or []):
                layout_index["manifests"] = [*(layout_index.get("manifests") or []), desc]
                atomic_write(self.root / "index.json", _go_json(layout_index))

            repo_index = self._load_json(self._index_path(name), None) or {
                "schemaVersion": 2,
                "manifests": [],
            }
            if not any(m.get("digest") == digest for m in repo_index.get("manifests") or []):
                repo_index["manifests"] = [*(repo_index.get("manifests") or []), desc]
                atomic_write(self._index_path(name), _go_json(repo_index))

            if tags:
                tag_map = self._load_json(self._tags_path(name), {})
                for tag in tags:
                    tag_map[tag] = desc
                atomic_write(self._tags_path(name), _go_json(tag_map))
        except OSError as exc:
            raise LocalStorageError(f"cannot update kit storage at {self.root}: {exc}") from None
        return digest

    def resolve(self, name: str, ref: str) -> tuple[bytes, str, str]:
        """(manifest bytes, media type, digest) for a tag or digest of repository `name`."""
        if is_digest(ref):
            index = self._load_json(self._index_path(name), {})
            known = any(m.get("digest") == ref for m in index.get("manifests") or [])
            if not known:
                raise NotFoundError(f"{name}@{ref} is not in kit's local storage")
            digest = ref
        else:
            tag_map = self._load_json(self._tags_path(name), {})
            desc = tag_map.get(ref)
            if not isinstance(desc, dict) or not isinstance(desc.get("digest"), str):
                raise NotFoundError(f"{name}:{ref} is not in kit's local storage ({self.root})")
            digest = desc["digest"]
        return self.read_blob(digest), OCI_MANIFEST, digest

    def list_tags(self, name: str) -> list[str]:
        return sorted(self._load_json(self._tags_path(name), {}))
