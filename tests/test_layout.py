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


def _manifest(config: str, *layers: str, toc: str | None = None) -> bytes:
    doc: dict[str, object] = {
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.kitops.modelkit.config.v1+json",
                   "digest": config, "size": 1},
        "layers": [{"mediaType": "application/vnd.kitops.modelkit.model.v1.tar",
                    "digest": d, "size": 1} for d in layers],
    }
    if toc is not None:
        doc["annotations"] = {"dev.kitfs.toc.digest": toc}
    return json.dumps(doc).encode()


def test_files_as_kit_writes_them(tmp_path: Path) -> None:
    """Tags sorted (Go marshals a map sorted), a new layout index as oras writes it, and a
    repository's files deleted once empty (kit's localIndex.save)."""
    store = LocalStorage(tmp_path / "storage")
    config = store.put_blob_bytes(b"c")
    digest = store.add_manifest("localhost/m", _manifest(config), ("zeta", "alpha", "mid"))
    root = tmp_path / "storage"
    key = base64.urlsafe_b64encode(b"localhost/m").decode()
    assert list(json.loads((root / f"{key}-tags.json").read_bytes())) == ["alpha", "mid", "zeta"]
    layout = json.loads((root / "index.json").read_bytes())
    assert list(layout) == ["schemaVersion", "mediaType", "manifests"]
    assert layout["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert store.repositories() == ["localhost/m"]

    repo = store.repo("localhost/m")
    assert repo.tags_of(digest) == ["alpha", "mid", "zeta"]
    repo.untag("mid")
    repo.save()
    assert store.list_tags("localhost/m") == ["alpha", "zeta"]
    with pytest.raises(NotFoundError, match="m:mid is not in kit's local storage"):
        repo.untag("mid")
    store.delete_manifest("localhost/m", digest)
    assert not (root / f"{key}-tags.json").exists()
    assert not (root / f"{key}-index.json").exists()
    assert store.repositories() == []
    assert json.loads((root / "index.json").read_bytes())["manifests"] == []


def test_delete_keeps_what_others_need(tmp_path: Path) -> None:
    """A manifest another repository lists stays; blobs another manifest needs stay; the
    rest goes, a table of contents pinned by annotation included."""
    store = LocalStorage(tmp_path / "storage")
    config, shared, own, toc = (store.put_blob_bytes(x) for x in (b"c", b"s", b"o", b"t"))
    first = store.add_manifest("localhost/a", _manifest(config, shared, own, toc=toc), ("v1",))
    second = store.add_manifest("localhost/b", _manifest(config, shared), ("v1",))
    store.add_manifest("localhost/c", _manifest(config, shared, own, toc=toc), ("v1",))

    # localhost/c lists the first manifest too: only a's index changes.
    assert store.delete_manifest("localhost/a", first, ("dev.kitfs.toc.digest",)) == []
    assert store.repositories() == ["localhost/b", "localhost/c"]
    assert all(store.has_blob(d) for d in (first, config, shared, own, toc))

    deleted = store.delete_manifest("localhost/c", first, ("dev.kitfs.toc.digest",))
    assert set(deleted) == {first, own, toc}
    assert all(store.has_blob(d) for d in (second, config, shared))
    layout = json.loads((tmp_path / "storage" / "index.json").read_bytes())
    assert [m["digest"] for m in layout["manifests"]] == [second]
    with pytest.raises(NotFoundError):
        store.delete_manifest("localhost/c", first)


def test_repositories_read_kits_file_names(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    root.mkdir()
    for name in ("localhost/x", "registry.example.com:5000/team/model"):
        key = base64.urlsafe_b64encode(name.encode()).decode()
        (root / f"{key}-index.json").write_text('{"schemaVersion":2,"manifests":[]}')
    (root / "index.json").write_text("{}")
    (root / "not-base64!-index.json").write_text("{}")
    (root / "ingest").mkdir()
    assert LocalStorage(root).repositories() == ["localhost/x",
                                                 "registry.example.com:5000/team/model"]
