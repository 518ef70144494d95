"""`kitfs sign` and `kitfs verify` against the real registry (Distribution: no referrers
API, so bundles go through the `sha256-<hex>` index tag, as on many registries).

Keys are generated here (ECDSA P-256, Ed25519, RSA) and written as cosign.key files;
cosign's own keyless bundle (tests/data/cosign) is pushed with the manifest it signs.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from helpers import kitfs, layer_desc, ok, one_line_error, push_manifest, sha
from kitfs.modelkit import mediatypes as mt
from kitfs.oci.client import DOCKER_MANIFEST, OCI_INDEX, ClientOptions, RegistryClient
from kitfs.oci.signatures import push_bundle
from kitfs.signing.classic import signature_tag
from kitfs.signing.keys import PrivateKey, encrypt_private_key
from registry import RegistryServer

pytestmark = pytest.mark.registry

DATA = Path(__file__).parent / "data" / "cosign"
PASSWORD = "correct horse"
GITHUB = "https://github.com/login/oauth"


def keypair(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """A cosign.key (encrypted with PASSWORD) and its cosign.pub, of this key type."""
    private = {
        "ecdsa": lambda: ec.generate_private_key(ec.SECP256R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate,
        "rsa": lambda: rsa.generate_private_key(65537, 2048),
    }[kind]()
    key = PrivateKey(private, "cosign.key")
    folder = tmp_path / kind
    folder.mkdir(exist_ok=True)
    (folder / "cosign.key").write_bytes(encrypt_private_key(key, PASSWORD.encode()))
    (folder / "cosign.pub").write_bytes(key.public().pem())
    return folder / "cosign.key", folder / "cosign.pub"


async def image(registry: RegistryServer, repo: str, tag: str = "v1") -> str:
    """A small OCI image manifest (not a ModelKit: verify takes any manifest); its digest."""
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "nonce": secrets.token_hex(8)}).encode()
    layer = secrets.token_bytes(64)
    manifest = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                "config": layer_desc("application/vnd.oci.image.config.v1+json", config),
                "layers": [layer_desc("application/vnd.oci.image.layer.v1.tar", layer)]}
    return await push_manifest(registry.host, repo, manifest, [config, layer], tag)


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "COSIGN_PASSWORD": PASSWORD, **extra}


def sign(ref: str, key: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return kitfs("sign", "--key", str(key), *args, ref, env=env(**extra))


def verify(ref: str, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return kitfs("verify", *args, ref, env=env(**extra))


def keyed(ref: str, pub: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return verify(ref, "--key", str(pub), "--insecure-ignore-tlog", **extra)


async def get_manifest(registry: RegistryServer, repo: str, ref: str) -> dict[str, object]:
    async with RegistryClient(registry.host, ClientOptions()) as client:
        body, _, _ = await client.get_manifest(repo, ref)
    doc: dict[str, object] = json.loads(body)
    return doc


@pytest.mark.parametrize("fmt", ["new", "classic"])
@pytest.mark.parametrize("kind", ["ecdsa", "ed25519", "rsa"])
async def test_sign_then_verify(registry: RegistryServer, tmp_path: Path, kind: str,
                                fmt: str) -> None:
    repo = f"sig/{kind}-{fmt}"
    digest = await image(registry, repo)
    key, pub = keypair(tmp_path, kind)
    ref = f"{registry.host}/{repo}:v1"
    signed = ok(sign(ref, key, "--bundle-format", fmt))
    assert digest in signed
    line = ok(keyed(ref, pub)).strip()
    what = "bundle signature" if fmt == "new" else "classic signature"
    assert line.startswith(f"{digest}: {what}")
    assert "cosign.pub" in line and "[transparency log not checked]" in line
    # the scheme cosign verify --key checks: ECDSA SHA-256, pure Ed25519, RSA PKCS#1 v1.5
    assert line.endswith({"ecdsa": "(ECDSA P-256 SHA256)", "ed25519": "(Ed25519)",
                          "rsa": "(RSA PKCS#1 v1.5 SHA256)"}[kind]
                         + " [transparency log not checked]"), line
    # another key of the same type is refused
    (tmp_path / "other").mkdir()
    _, other = keypair(tmp_path / "other", kind)
    assert "does not verify with" in one_line_error(keyed(ref, other), 1)


async def test_classic_appends_and_skips_duplicates(registry: RegistryServer,
                                                    tmp_path: Path) -> None:
    repo = "sig/append"
    digest = await image(registry, repo)
    ref = f"{registry.host}/{repo}@{digest}"
    first, first_pub = keypair(tmp_path, "ecdsa")
    second, second_pub = keypair(tmp_path, "ed25519")
    ok(sign(ref, first, "--bundle-format", "classic"))
    assert "already signed" in ok(sign(ref, first, "--bundle-format", "classic"))
    ok(sign(ref, second, "--bundle-format", "classic"))
    sig = await get_manifest(registry, repo, signature_tag(digest))
    layers = sig["layers"]
    assert isinstance(layers, list) and len(layers) == 2
    # each key finds its own signature among the two layers
    assert "ECDSA" in ok(keyed(ref, first_pub))
    assert "Ed25519" in ok(keyed(ref, second_pub))
    # checking the log (offline, against a trusted root) finds no entry: kitfs logs nothing
    error = one_line_error(verify(ref, "--key", str(first_pub), "--trusted-root",
                                  str(DATA / "cosign-trusted_root_pgi.json")), 1)
    assert "no transparency-log entry" in error


async def test_no_signature_and_other_repository(registry: RegistryServer,
                                                 tmp_path: Path) -> None:
    repo = "sig/elsewhere"
    digest = await image(registry, repo)
    key, pub = keypair(tmp_path, "ecdsa")
    ref = f"{registry.host}/{repo}:v1"
    assert f"no signatures found for {digest}" in one_line_error(keyed(ref, pub), 1)
    # $COSIGN_REPOSITORY moves the signatures, for sign and verify alike
    store = f"{registry.host}/sig/store"
    ok(sign(ref, key, COSIGN_REPOSITORY=store))
    assert digest in ok(keyed(ref, pub, COSIGN_REPOSITORY=store))
    assert "no signatures found" in one_line_error(keyed(ref, pub), 1)


async def test_signature_for_another_digest(registry: RegistryServer, tmp_path: Path) -> None:
    """A signature copied onto another digest's tags names the digest it was made for."""
    repo = "sig/another"
    signed = await image(registry, repo, "signed")
    other = await image(registry, repo, "other")
    key, pub = keypair(tmp_path, "ecdsa")
    ok(sign(f"{registry.host}/{repo}:signed", key, "--bundle-format", "classic"))
    ok(sign(f"{registry.host}/{repo}:signed", key))
    async with RegistryClient(registry.host, ClientOptions()) as client:
        for tag in (signature_tag(signed), signed.replace(":", "-")):
            body, media_type, _ = await client.get_manifest(repo, tag)
            await client.put_manifest(repo, tag.replace(signed.split(":")[1],
                                                        other.split(":")[1]), body, media_type)
    error = one_line_error(keyed(f"{registry.host}/{repo}:other", pub), 1)
    assert f"digest mismatch: the signature is for {signed}, not {other}" in error \
        or f"digest mismatch: the bundle is for {signed}, not {other}" in error


async def test_tampered_bundle(registry: RegistryServer, tmp_path: Path) -> None:
    """The bundle's statement edited (another digest) and re-attached in its place."""
    repo = "sig/tampered"
    digest = await image(registry, repo)
    key, pub = keypair(tmp_path, "ecdsa")
    ref = f"{registry.host}/{repo}:v1"
    ok(sign(ref, key))
    async with RegistryClient(registry.host, ClientOptions()) as client:
        index_tag = digest.replace(":", "-")
        index, _, _ = await client.get_manifest(repo, index_tag)
        referrer_digest = json.loads(index)["manifests"][0]["digest"]
        referrer, _, _ = await client.get_manifest(repo, referrer_digest)
        layer = json.loads(referrer)["layers"][0]
        bundle = json.loads(await client.get_blob(repo, layer["digest"]))
        envelope = bundle["dsseEnvelope"]
        statement = json.loads(base64.b64decode(envelope["payload"]))
        statement["predicate"] = {"tampered": True}
        envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
        tampered = json.dumps(bundle).encode()
        await client.put_manifest(repo, index_tag, json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode(), OCI_INDEX)
        body, media_type, _ = await client.get_manifest(repo, digest)
        subject = {"mediaType": media_type, "size": len(body), "digest": digest}
        await push_bundle(client, repo, subject, tampered, "2026-01-01T00:00:00Z")
    error = one_line_error(keyed(ref, pub), 1)
    assert "tampered bundle" in error, error


async def test_tampered_classic_payload(registry: RegistryServer, tmp_path: Path) -> None:
    """The `.sig` layer swapped for an edited payload (with its own, valid blob digest)."""
    repo = "sig/tampered-classic"
    digest = await image(registry, repo)
    key, pub = keypair(tmp_path, "ecdsa")
    ref = f"{registry.host}/{repo}:v1"
    ok(sign(ref, key, "--bundle-format", "classic"))
    tag = signature_tag(digest)
    async with RegistryClient(registry.host, ClientOptions()) as client:
        body, media_type, _ = await client.get_manifest(repo, tag)
        sig = json.loads(body)
        layer = sig["layers"][0]
        payload = await client.get_blob(repo, layer["digest"])
        edited = payload.replace(b'"optional":null', b'"optional":{"approved":"yes"}')
        assert edited != payload
        await client.push_blob_bytes(repo, sha(edited), edited)
        layer.update(digest=sha(edited), size=len(edited))
        await client.put_manifest(repo, tag, json.dumps(sig).encode(), media_type)
    error = one_line_error(keyed(ref, pub), 1)
    assert "does not verify with ECDSA P-256 key cosign.pub" in error


async def test_retagged_after_signing(registry: RegistryServer, tmp_path: Path) -> None:
    """The tag is resolved once: after a retag, verify names (and refuses) the new digest."""
    repo = "sig/retag"
    first = await image(registry, repo)
    key, pub = keypair(tmp_path, "ecdsa")
    ref = f"{registry.host}/{repo}:v1"
    ok(sign(ref, key))
    assert ok(keyed(ref, pub)).startswith(first)
    second = await image(registry, repo)  # same tag, new manifest
    assert second != first
    assert f"no signatures found for {second}" in one_line_error(keyed(ref, pub), 1)
    assert ok(keyed(f"{registry.host}/{repo}@{first}", pub)).startswith(first)


async def push_cosign_vector(registry: RegistryServer, repo: str) -> tuple[str, str]:
    """go-containerregistry's empty image (a Docker schema 2 manifest) with cosign's own
    keyless bundle over it, attached as cosign's test attaches it: (reference, digest)."""
    config = (b'{"architecture":"","created":"0001-01-01T00:00:00Z","os":"",'
              b'"rootfs":{"type":"layers","diff_ids":null},"config":{}}')
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "size": len(config), "digest": sha(config)},
        "layers": []}, separators=(",", ":")).encode()
    digest = sha(manifest)
    assert digest.startswith("sha256:732112270d7e")
    async with RegistryClient(registry.host, ClientOptions()) as client:
        await client.push_blob_bytes(repo, sha(config), config)
        await client.put_manifest(repo, "empty", manifest, DOCKER_MANIFEST)
        subject = {"mediaType": DOCKER_MANIFEST, "size": len(manifest), "digest": digest}
        await push_bundle(client, repo, subject,
                          (DATA / "cosign-oci-attestation.sigstore.json").read_bytes(),
                          "2025-02-28T19:18:11Z")
    return f"{registry.host}/{repo}:empty", digest


async def test_cosigns_keyless_bundle(registry: RegistryServer) -> None:
    """cosign's own keyless bundle verifies offline."""
    ref, digest = await push_cosign_vector(registry, "sig/cosign-vector")
    root = str(DATA / "cosign-trusted_root_pgi.json")
    line = ok(verify(ref, "--certificate-identity", "cody@soyland.com",
                     "--certificate-oidc-issuer", GITHUB, "--trusted-root", root)).strip()
    assert line == (f"{digest}: bundle signature (https://cosign.sigstore.dev/attestation/v1) "
                    f"verified with certificate for cody@soyland.com (issuer {GITHUB}) "
                    f"(ECDSA P-256 SHA256)"), line
    error = one_line_error(verify(ref, "--certificate-identity", "mitr@redhat.com",
                                  "--certificate-oidc-issuer", GITHUB, "--trusted-root", root), 1)
    assert "mitr@redhat.com" in error
    # without the log's word on when it was signed, the short-lived certificate has expired
    error = one_line_error(verify(ref, "--certificate-identity", "cody@soyland.com",
                                  "--certificate-oidc-issuer", GITHUB, "--trusted-root", root,
                                  "--insecure-ignore-tlog"), 1)
    assert "expired" in error


async def test_flags_from_cosigns_variables(registry: RegistryServer, tmp_path: Path) -> None:
    """cosign reads every flag from COSIGN_<FLAG>; `kitfs sign` / `kitfs verify` do too, so a
    script that sets them for cosign works unchanged."""
    repo = "sig/env"
    digest = await image(registry, repo)
    key, pub = keypair(tmp_path, "ecdsa")
    ref = f"{registry.host}/{repo}:v1"
    assert digest in ok(kitfs("sign", ref, env=env(COSIGN_KEY=str(key))))
    line = ok(verify(ref, COSIGN_KEY=str(pub), COSIGN_INSECURE_IGNORE_TLOG="true"))
    assert line.startswith(f"{digest}: bundle signature")
    # a flag given wins over the variable
    (tmp_path / "other").mkdir()
    _, other = keypair(tmp_path / "other", "ed25519")
    assert "does not verify" in one_line_error(verify(
        ref, "--key", str(other), COSIGN_KEY=str(pub), COSIGN_INSECURE_IGNORE_TLOG="1"), 1)
    assert "is not a boolean" in one_line_error(verify(
        ref, COSIGN_KEY=str(pub), COSIGN_INSECURE_IGNORE_TLOG="maybe"), 2)
    assert "$COSIGN_KEY" in one_line_error(kitfs("sign", ref, env=env()), 2)


def test_bad_input_is_one_line(tmp_path: Path, registry: RegistryServer) -> None:
    ref = f"{registry.host}/sig/none:v1"
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("not a key\n")
    assert "garbage.pub" in one_line_error(verify(ref, "--key", str(garbage),
                                                  "--insecure-ignore-tlog"))
    assert "--insecure-ignore-tlog" in one_line_error(
        verify(ref, "--key", str(DATA / "cosign-test.pub")), 2)
    assert "--certificate-oidc-issuer" in one_line_error(verify(ref), 2)
    assert "--trusted-root" in one_line_error(verify(
        ref, "--certificate-identity", "a@b", "--certificate-oidc-issuer", GITHUB), 2)
    assert "registry" in one_line_error(verify("model:v1", "--key", str(garbage),
                                               "--insecure-ignore-tlog"), 2)
    # cosign's CI key: its password is a secret, so any password here is the wrong one
    error = one_line_error(sign(ref, DATA / "cosign-test.key"))
    assert "password" in error.lower(), error
    no_password = {k: v for k, v in env().items() if k != "COSIGN_PASSWORD"}
    proc = kitfs("sign", "--key", str(DATA / "cosign-test.key"), ref, env=no_password,
                 stdin="")
    assert "COSIGN_PASSWORD" in one_line_error(proc, 2)
    assert "cannot read --key" in one_line_error(sign(ref, tmp_path / "missing.key"), 2)
    for verb, teaches in (("verify", "--insecure-ignore-tlog"), ("sign", "COSIGN_PASSWORD")):
        assert teaches in ok(kitfs(verb, "--help"))


async def test_referrers_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a registry with the referrers API (the in-process fake: Distribution has none) the
    bundle is found through the API and no `sha256-<hex>` tag is written; a table of
    contents among the referrers is skipped."""
    from fakeregistry import REGISTRY, FakeRegistry

    from kitfs.oci.signatures import fetch_signatures
    from kitfs.signing.bundle import build_bundle
    from kitfs.signing.keys import generate_private_key
    from kitfs.signing.trust import Trust, check_signatures

    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    fake = FakeRegistry()
    fake.oci_subject = True  # the registry says it indexed the referrer's subject
    body = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                       "config": layer_desc(mt.OCI_EMPTY_JSON, b"{}"), "layers": []}).encode()
    digest = fake.add_manifest("org/img", body, mt.OCI_MANIFEST, "v1")
    toc = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                      "artifactType": "application/vnd.kitfs.toc", "layers": [],
                      "subject": {"digest": digest}}).encode()
    fake.add_manifest("org/img", toc, mt.OCI_MANIFEST, None)
    key = generate_private_key()
    subject = {"mediaType": mt.OCI_MANIFEST, "size": len(body), "digest": digest}
    options = ClientOptions(kitops_home=str(tmp_path))
    async with RegistryClient(REGISTRY, options, transport=fake.transport()) as client:
        await push_bundle(client, "org/img", subject, build_bundle(key, digest),
                          "2026-01-01T00:00:00Z")
        found = await fetch_signatures(client, "org/img", digest)
    assert fake.count("PUT", f"/manifests/{digest.replace(':', '-')}") == 0
    assert len(found.bundles) == 1 and not found.classic
    verdict = check_signatures(found, digest, Trust(key=key.public(), ignore_tlog=True))
    assert verdict.format == "bundle" and verdict.manifest_digest == digest


async def test_signatures_in_another_registry(registry: RegistryServer,
                                              auth_registry: RegistryServer,
                                              kitops_home: Path, tmp_path: Path) -> None:
    """$COSIGN_REPOSITORY on another registry (one that wants a login) holds the
    signatures of an image in the first: both formats go there and are read back."""
    repo = "sig/cross"
    digest = await image(registry, repo)
    key, pub = keypair(tmp_path, "ecdsa")
    ok(kitfs("login", auth_registry.host, "-u", str(auth_registry.username),
             "--password-stdin", stdin=f"{auth_registry.password}\n", env=env()))
    store = f"{auth_registry.host}/sig/store"
    ref = f"{registry.host}/{repo}:v1"
    ok(sign(ref, key, "--bundle-format", "classic", COSIGN_REPOSITORY=store))
    assert f"pushed {store}@sha256:" in ok(sign(ref, key, COSIGN_REPOSITORY=store))
    assert ok(keyed(ref, pub, COSIGN_REPOSITORY=store)).startswith(f"{digest}: bundle")
    assert "no signatures found" in one_line_error(keyed(ref, pub), 1)


def test_trust_takes_one_way() -> None:
    from kitfs.signing.keyless import Identity
    from kitfs.signing.keys import generate_private_key
    from kitfs.signing.trust import Trust

    key = generate_private_key().public()
    for bad in ({}, {"key": key}, {"identity": Identity("a@b", GITHUB), "ignore_tlog": True},
                {"key": key, "identity": Identity("a@b", GITHUB), "ignore_tlog": True}):
        with pytest.raises(ValueError):
            Trust(**bad)  # type: ignore[arg-type]


async def test_classic_appends_to_a_sig_image_cosign_made(registry: RegistryServer,
                                                          tmp_path: Path) -> None:
    """A `.sig` image holding a real cosign layer (containers/image's fixture, made by
    cosign for another image): kitfs keeps it verbatim and appends its own after it."""
    repo = "sig/foreign"
    digest = await image(registry, repo)
    data = (DATA / "ci-valid.signature-1").read_bytes()
    magic = b"\x00sigstore-json\n"
    doc = json.loads(data[len(magic):])
    payload = base64.b64decode(doc["payload"])
    foreign = layer_desc(doc["mimeType"], payload, doc["annotations"])
    config = json.dumps({"architecture": "", "created": "0001-01-01T00:00:00Z",
                         "history": [{"created": "0001-01-01T00:00:00Z"}], "os": "",
                         "rootfs": {"type": "layers", "diff_ids": [sha(payload)]},
                         "config": {}}).encode()
    await push_manifest(registry.host, repo, {
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "config": layer_desc("application/vnd.oci.image.config.v1+json", config),
        "layers": [foreign]}, [config, payload], signature_tag(digest))
    key, pub = keypair(tmp_path, "ecdsa")
    ref = f"{registry.host}/{repo}:v1"
    # cosign's key verifies its layer, which is for another digest
    error = one_line_error(keyed(ref, DATA / "ci-cosign.pub"), 1)
    assert "digest mismatch: the signature is for sha256:634a8f35" in error
    ok(sign(ref, key, "--bundle-format", "classic"))
    sig = await get_manifest(registry, repo, signature_tag(digest))
    layers = sig["layers"]
    assert isinstance(layers, list) and len(layers) == 2 and layers[0] == foreign
    async with RegistryClient(registry.host, ClientOptions()) as client:
        config_blob = await client.get_blob(repo, sig["config"]["digest"])  # type: ignore[index]
    assert json.loads(config_blob)["rootfs"]["diff_ids"] == [sha(payload), layers[1]["digest"]]
    assert ok(keyed(ref, pub)).startswith(f"{digest}: classic signature")
