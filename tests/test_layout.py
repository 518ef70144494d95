"""kit's local storage: the files `kit list` reads, written the way kit writes them."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from kitfs.errors import IntegrityError, NotFoundError
from kitfs.oci.layout import LocalStorage


def test_add_manifest_writes_kit_files(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "storage")
    manifest = b'{"schemaVersion":2}'
    digest = store.add_manifest("localhost/org/model", manifest, ("v1", "latest"))
    assert digest == "sha256:" + hashlib.sha256(manifest).hexdigest()

    key = base64.urlsafe_b64encode(b"localhost/org/model").decode()
    root = tmp_path / "storage"
    assert (root / "oci-layout").read_bytes() == b'{"imageLayoutVersion":"1.0.0"}'
    desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest,
            "size": len(manifest)}
    assert json.loads((root / f"{key}-index.json").read_bytes()) == {
        "schemaVersion": 2, "manifests": [desc]}
    assert json.loads((root / f"{key}-tags.json").read_bytes()) == {"v1": desc, "latest": desc}
    assert desc in json.loads((root / "index.json").read_bytes())["manifests"]
    assert (root / "blobs" / "sha256" / digest.split(":")[1]).read_bytes() == manifest

    # adding again is idempotent and keeps one entry
    store.add_manifest("localhost/org/model", manifest, ("v2",))
    assert len(json.loads((root / f"{key}-index.json").read_bytes())["manifests"]) == 1
    assert store.list_tags("localhost/org/model") == ["latest", "v1", "v2"]
    assert store.resolve("localhost/org/model", "v2") == (manifest, desc["mediaType"], digest)
    assert store.resolve("localhost/org/model", digest)[2] == digest


def test_missing_and_corrupt(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "storage")
    with pytest.raises(NotFoundError, match="not in kit's local storage"):
        store.resolve("localhost/x", "v1")
    digest = store.put_blob_bytes(b"hello")
    store.blob_path(digest).write_bytes(b"hellO")
    with pytest.raises(IntegrityError):
        store.read_blob(digest)
