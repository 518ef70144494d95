"""RegistryClient against a real CNCF Distribution registry on loopback."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from kitfs.errors import AuthError, IntegrityError, NotFoundError
from kitfs.oci import client as client_module
from kitfs.oci.client import OCI_INDEX, OCI_MANIFEST, ClientOptions, RegistryClient
from kitfs.oci.credentials import login, lookup_credential
from registry import RegistryServer

pytestmark = pytest.mark.registry


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_push_pull_roundtrip(
    registry: RegistryServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "MONOLITHIC_UPLOAD_LIMIT", 1 << 20)
    monkeypatch.setattr(client_module, "UPLOAD_CHUNK_SIZE", 1 << 20)
    data = os.urandom((5 << 20) + 7)
    path = tmp_path / "layer"
    path.write_bytes(data)
    config = b'{"manifestVersion":"1.0.0","package":{}}'
    layer = sha(data)
    async with RegistryClient(registry.host, ClientOptions(retry_budget=2)) as c:
        await c.ping()
        sent: list[int] = []
        assert await c.push_blob("kitfs/real", layer, len(data), str(path), progress=sent.append)
        assert sum(sent) == len(data)
        assert await c.push_blob_bytes("kitfs/real", sha(config), config)
        assert (
            await c.push_blob("kitfs/other", layer, len(data), str(path), mount_from="kitfs/real")
            is False
        )
        assert await c.head_blob("kitfs/other", layer) == len(data)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": "application/vnd.kitops.modelkit.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.kitops.modelkit.config.v1+json",
                    "digest": sha(config),
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.kitops.modelkit.model.v1.tar",
                        "digest": layer,
                        "size": len(data),
                    }
                ],
            }
        ).encode()
        digest, _ = await c.put_manifest("kitfs/real", "v1", manifest, OCI_MANIFEST)
        index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [{"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest)}],
            }
        ).encode()
        await c.put_manifest("kitfs/real", "multi", index, OCI_INDEX)
        assert await c.resolve_modelkit("kitfs/real", "multi") == (manifest, OCI_MANIFEST, digest)
        assert sorted(await c.list_tags("kitfs/real")) == ["multi", "v1"]
        assert await c.get_blob("kitfs/real", sha(config)) == config
        async with c.stream_blob("kitfs/real", layer) as chunks:
            assert b"".join([x async for x in chunks]) == data
        assert await c.read_range("kitfs/real", layer, 4 << 20, 1 << 20) == data[4 << 20 : 5 << 20]
        assert await c.referrers("kitfs/real", digest) == []
        with pytest.raises(NotFoundError):
            await c.get_manifest("kitfs/real", "missing")

        # A stream resumed after the bytes a caller has: checked against the whole digest.
        have = data[: 3 << 20]
        async with c.stream_blob("kitfs/real", layer, size=len(data),
                                 prefix=(len(have), hashlib.sha256(have))) as chunks:
            assert b"".join([x async for x in chunks]) == data[len(have):]
        wrong = hashlib.sha256(b"x" * len(have))
        with pytest.raises(IntegrityError, match="does not match its digest"):
            async with c.stream_blob("kitfs/real", layer, size=len(data),
                                     prefix=(len(have), wrong)) as chunks:
                async for _ in chunks:
                    pass

        # Deleting a manifest by digest takes its tags along.
        await c.put_manifest("kitfs/real", "doomed", manifest, OCI_MANIFEST)
        await c.delete_manifest("kitfs/real", digest)
        for tag in ("v1", "doomed"):
            with pytest.raises(NotFoundError):
                await c.get_manifest("kitfs/real", tag)


async def test_login_against_htpasswd_registry(
    auth_registry: RegistryServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    options = ClientOptions(kitops_home=str(tmp_path), retry_budget=1)
    assert auth_registry.username and auth_registry.password
    with pytest.raises(AuthError, match="wrong username or password"):
        await login(auth_registry.host, auth_registry.username, "nope", options)
    assert await lookup_credential(auth_registry.host, str(tmp_path)) is None
    await login(auth_registry.host, auth_registry.username, auth_registry.password, options)
    async with RegistryClient(auth_registry.host, options) as c:
        assert await c.push_blob_bytes("kitfs/auth", sha(b"x"), b"x")
        assert await c.get_blob("kitfs/auth", sha(b"x")) == b"x"
    async with RegistryClient(
        auth_registry.host, ClientOptions(kitops_home=str(tmp_path / "empty"), retry_budget=1)
    ) as c:
        with pytest.raises(AuthError, match="kit login"):
            await c.get_blob("kitfs/auth", sha(b"x"))
