"""Finding and attaching a digest's cosign signatures in a registry.

cosign keeps them in two places, and a verifier must look in both: the classic
`sha256-<hex>.sig` image (one layer per signature) and sigstore-bundle
referrers (OCI 1.1 referrers API, or the `sha256-<hex>` index tag where the
registry lacks it). Both may live in another repository ($COSIGN_REPOSITORY).
What the bytes mean is kitfs.signing's business; this module only moves them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager, nullcontext, suppress
from typing import Any

from kitfs.errors import NotFoundError, UsageError
from kitfs.modelkit.manifest import sha256_digest
from kitfs.oci.client import INDEX_MEDIA_TYPES, OCI_MANIFEST, RegistryClient
from kitfs.oci.digest import short
from kitfs.oci.reference import Reference, is_digest, parse_reference
from kitfs.signing.bundle import (
    BUNDLE_MEDIA_TYPE,
    BUNDLE_MEDIA_TYPE_PREFIX,
    EMPTY_CONFIG,
    bundle_referrer_manifest,
    is_bundle_referrer,
)
from kitfs.signing.classic import (
    ClassicSignature,
    SignedLayer,
    append_signature,
    signature_tag,
)
from kitfs.signing.keys import PublicKey
from kitfs.signing.trust import FoundSignatures

log = logging.getLogger(__name__)

COSIGN_REPOSITORY_ENV = "COSIGN_REPOSITORY"
#: cosign's limits (pkg/oci/remote/signatures.go maxLayers; payload size default).
MAX_SIGNATURE_LAYERS = 1000
MAX_REFERRERS = 1000
MAX_SIGNATURE_BLOB = 128 << 20


def signature_repository(ref: Reference, environ: Mapping[str, str]) -> tuple[str, str]:
    """(registry, repository) that holds `ref`'s signatures: its own, or $COSIGN_REPOSITORY."""
    override = environ.get(COSIGN_REPOSITORY_ENV, "").strip()
    if not override:
        return ref.registry, ref.repository
    target = parse_reference(override)
    if target.is_local or target.tag not in (None, "latest") or target.digest is not None:
        raise UsageError(f"${COSIGN_REPOSITORY_ENV} must be REGISTRY/REPOSITORY, "
                         f"not {override!r}")
    return target.registry, target.repository


def signature_client(
    client: RegistryClient, registry: str
) -> AbstractAsyncContextManager[RegistryClient]:
    """A client for the registry `signature_repository` named: `client` itself when it is
    the same registry, else a new one with the same options (closed on exit)."""
    if client.registry == registry:
        return nullcontext(client)
    return RegistryClient(registry, client.options)


async def fetch_signatures(client: RegistryClient, repo: str, digest: str) -> FoundSignatures:
    """The classic layers and sigstore bundles attached to `digest` in `repo`."""
    classic = await _classic_signatures(client, repo, digest)
    bundles = await _bundles(client, repo, digest)
    log.debug("%s: %d classic signature(s), %d bundle(s) in %s",
              short(digest), len(classic), len(bundles), repo)
    return FoundSignatures(tuple(classic), tuple(bundles))


async def _classic_signatures(
    client: RegistryClient, repo: str, digest: str
) -> list[ClassicSignature]:
    try:
        body, _, _ = await client.get_manifest(repo, signature_tag(digest))
    except NotFoundError:
        return []
    layers = _json(body).get("layers")
    if not isinstance(layers, list):
        return []
    found = []
    for layer in layers[:MAX_SIGNATURE_LAYERS]:
        if not isinstance(layer, dict) or not is_digest(str(layer.get("digest"))):
            continue
        size = layer.get("size")
        blob = await client.get_blob(repo, layer["digest"], MAX_SIGNATURE_BLOB,
                                     size=size if isinstance(size, int) else None)
        found.append(ClassicSignature.from_layer(layer, blob))
    return found


async def _bundles(client: RegistryClient, repo: str, digest: str) -> list[bytes]:
    found = []
    for descriptor in (await client.referrers(repo, digest))[:MAX_REFERRERS]:
        artifact_type = descriptor.get("artifactType")
        if artifact_type and not str(artifact_type).startswith(BUNDLE_MEDIA_TYPE_PREFIX):
            continue  # tables of contents, SBOMs, ...
        ref = descriptor.get("digest")
        if not isinstance(ref, str) or not is_digest(ref) or (
                descriptor.get("mediaType") in INDEX_MEDIA_TYPES):
            continue
        try:
            body, _, _ = await client.get_manifest(repo, ref)
        except NotFoundError:
            continue  # a stale fallback-index entry
        manifest = _json(body)
        if not is_bundle_referrer(manifest):
            continue
        layer = manifest["layers"][0]
        size = layer.get("size")
        try:
            found.append(await client.get_blob(repo, str(layer.get("digest")),
                                               MAX_SIGNATURE_BLOB,
                                               size=size if isinstance(size, int) else None))
        except NotFoundError:
            continue  # as cosign's GetBundles: an unreadable referrer is not a signature
    return found


def _json(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


async def push_classic(
    client: RegistryClient, repo: str, digest: str, new: SignedLayer, signer: PublicKey
) -> str | None:
    """Append `new` to `digest`'s `.sig` image in `repo` (made if absent), as `cosign sign`
    does; the tag it updated, or None when the same key's equal signature is already there."""
    tag = signature_tag(digest)
    existing_manifest: bytes | None = None
    existing_config: bytes | None = None
    with suppress(NotFoundError):
        existing_manifest, _, _ = await client.get_manifest(repo, tag, origin=True)
    if existing_manifest is not None:
        config = _json(existing_manifest).get("config")
        config_digest = config.get("digest") if isinstance(config, dict) else None
        if isinstance(config_digest, str):
            existing_config = await client.get_blob(repo, config_digest, MAX_SIGNATURE_BLOB)
    result = append_signature(new, signer, existing_manifest, existing_config)
    if result is None:
        return None
    manifest, config = result
    await client.push_blob_bytes(repo, new.descriptor["digest"], new.payload)
    await client.push_blob_bytes(repo, sha256_digest(config), config)
    media_type = str(_json(manifest).get("mediaType") or OCI_MANIFEST)
    await client.put_manifest(repo, tag, manifest, media_type)
    return tag


async def push_bundle(
    client: RegistryClient, repo: str, subject: Mapping[str, Any], bundle: bytes, created: str
) -> str:
    """Attach `bundle` to the manifest `subject` describes as a referrer; its digest."""
    await client.push_blob_bytes(repo, sha256_digest(EMPTY_CONFIG), EMPTY_CONFIG)
    await client.push_blob_bytes(repo, sha256_digest(bundle), bundle)
    referrer = bundle_referrer_manifest(bundle, subject, created)
    return await client.attach_referrer(repo, str(subject["digest"]), referrer,
                                        BUNDLE_MEDIA_TYPE)
