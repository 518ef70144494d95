"""Signature requirements enforced at mount and unpack, from flags and the node policy file,
against the real registry and real FUSE mounts.

A ModelKit is published with crafted.publish_kit and signed with `kitfs sign` (keys
as test_signatures_registry makes them). Every refusal must leave nothing behind:
no mount, no file unpacked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest
import trio
from crafted import CraftLayer, build_tar, craft_layer, publish_kit
from opening import LAZY
from opening import read_file as read_kit_file
from test_signatures_registry import DATA, GITHUB, PASSWORD, keypair, push_cosign_vector

from helpers import kitfs, ok, one_line_error
from kitfs.enforcement import SignatureGate, flags_requirement, load_policies, read_file
from kitfs.engine.session import open_kit
from kitfs.errors import SignatureError
from kitfs.oci.client import ClientOptions, RegistryClient
from kitfs.oci.reference import Reference, parse_reference
from kitfs.signing.classic import signature_tag
from kitfs.signing.flags import MOUNT_FLAGS, SignatureFlags
from kitfs.signing.policy import parse_policy
from mounting import mounted
from registry import RegistryServer

pytestmark = pytest.mark.registry

OPTIONS = ClientOptions(read_timeout=5, retry_budget=3)


def weights_layer(data: bytes) -> CraftLayer:
    return craft_layer(build_tar([("weights.bin", data)]), kind="model", path="./model")


def kitfile(name: str) -> dict[str, object]:
    return {"manifestVersion": "1.0.0", "package": {"name": name},
            "model": {"name": name, "path": "./model"}}


async def publish(host: str, repo: str, data: bytes, tag: str = "v1") -> str:
    return await publish_kit(host, repo, tag, [weights_layer(data)], kitfile(repo))


async def digest_of(host: str, repo: str, tag: str) -> str:
    async with RegistryClient(host, ClientOptions()) as client:
        _, _, digest = await client.get_manifest(repo, tag)
    return digest


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "COSIGN_PASSWORD": PASSWORD, **extra}


def sign(ref: str, key: Path, fmt: str = "new") -> None:
    ok(kitfs("sign", "--key", str(key), "--bundle-format", fmt, ref, env=env()))


def keyed(pub: Path) -> tuple[str, ...]:
    return ("--signature-key", str(pub), "--insecure-ignore-tlog")


def unpack(ref: str, target: Path, *args: str,
           environ: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return kitfs("unpack", ref, "-d", str(target), "--cache-dir", str(target.parent / "cache"),
                 *args, env=dict(environ or env()))


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    return {kind: keypair(tmp_path, kind) for kind in ("ecdsa", "ed25519")}


# -- flags ------------------------------------------------------------------------------


async def test_unpack_signed_and_refusals(registry: RegistryServer, tmp_path: Path,
                                          keys: dict[str, tuple[Path, Path]]) -> None:
    host = registry.host
    data = os.urandom(20000)
    ref = await publish(host, "enf/unpack", data)
    key, pub = keys["ed25519"]
    _, other_pub = keys["ecdsa"]
    sign(ref, key)  # a sigstore bundle

    good = unpack(ref, tmp_path / "good", *keyed(pub))
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "good" / "weights.bin").read_bytes() == data
    digest = await digest_of(host, "enf/unpack", "v1")
    assert f"signature verified: {digest}: bundle signature" in good.stderr

    wrong = tmp_path / "wrong"
    line = one_line_error(unpack(ref, wrong, *keyed(other_pub)), 1)
    assert "refused, signature required by --signature-key" in line
    assert "does not verify with" in line
    assert not wrong.exists() or not any(wrong.rglob("*"))

    unsigned = await publish(host, "enf/unsigned", os.urandom(1000))
    line = one_line_error(unpack(unsigned, tmp_path / "unsigned", *keyed(pub)), 1)
    assert "no signatures found" in line, line
    assert not (tmp_path / "unsigned" / "weights.bin").exists()

    # Flags that cannot make a check are usage errors, before anything is fetched.
    assert "--insecure-ignore-tlog" in one_line_error(
        unpack(ref, tmp_path / "x", "--signature-key", str(pub)), 2)
    assert "cannot read --signature-key" in one_line_error(
        unpack(ref, tmp_path / "x", *keyed(tmp_path / "missing.pub")), 2)
    assert "needs both --signature-identity and --signature-issuer" in one_line_error(
        unpack(ref, tmp_path / "x", "--signature-identity", "me@example.com"), 2)


async def test_signature_for_another_digest_is_refused(
        registry: RegistryServer, tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    """A valid signature of one ModelKit copied onto another's `.sig` tag."""
    host = registry.host
    signed = await publish(host, "enf/copied", os.urandom(3000), "signed")
    other = await publish(host, "enf/copied", os.urandom(3000), "other")
    key, pub = keys["ecdsa"]
    sign(signed, key, "classic")
    signed_digest = await digest_of(host, "enf/copied", "signed")
    other_digest = await digest_of(host, "enf/copied", "other")
    async with RegistryClient(host, ClientOptions()) as client:
        body, media_type, _ = await client.get_manifest("enf/copied", signature_tag(signed_digest))
        await client.put_manifest("enf/copied", signature_tag(other_digest), body, media_type)
    line = one_line_error(unpack(other, tmp_path / "out", *keyed(pub)), 1)
    assert f"digest mismatch: the signature is for {signed_digest}, not {other_digest}" in line


async def test_mount_enforces_the_key(registry: RegistryServer, tmp_path: Path,
                                      keys: dict[str, tuple[Path, Path]]) -> None:
    host = registry.host
    data = os.urandom(50000)
    ref = await publish(host, "enf/mount", data)
    key, pub = keys["ecdsa"]
    _, other_pub = keys["ed25519"]
    sign(ref, key, "classic")
    digest = await digest_of(host, "enf/mount", "v1")

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    refused = kitfs("mount", ref, str(mnt), "--cache-dir", str(tmp_path / "cache"),
                    *keyed(other_pub))
    line = one_line_error(refused, 1)
    assert "refused, signature required by --signature-key" in line and "does not verify" in line
    assert not os.path.ismount(mnt)

    with mounted(ref, mnt, tmp_path / "cache", *keyed(pub)) as where:
        assert (where / "weights.bin").read_bytes() == data
        status = json.loads(ok(kitfs("status", "--json")))
        mine = [m for m in status if m.get("mountpoint") == str(where)]
        assert mine and mine[0]["digest"] == digest
        assert any(line.startswith(f"{digest}: classic signature") for line in
                   mine[0]["signatures"]), mine
        # a signature asked for, no --verify given: only verified bytes are served
        argv = Path(f"/proc/{mine[0]['pid']}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--verify") + 1] == b"strict"


async def test_retag_between_check_and_use(registry: RegistryServer, tmp_path: Path,
                                           keys: dict[str, tuple[Path, Path]]) -> None:
    """The tag moves to an unsigned ModelKit right after the check passed: what is served is
    still the digest that was checked, never the new one."""
    host = registry.host
    signed_data, swapped_data = os.urandom(40000), os.urandom(40000)
    ref = await publish(host, "enf/race", signed_data)
    key, pub = keys["ecdsa"]
    sign(ref, key)
    signed_digest = await digest_of(host, "enf/race", "v1")
    requirement = flags_requirement(SignatureFlags(key=str(pub), ignore_tlog=True), MOUNT_FLAGS)

    class RetagAfterCheck(SignatureGate):
        async def check(self, ref: Reference, digest: str) -> None:
            await super().check(ref, digest)
            await publish(host, "enf/race", swapped_data)  # v1 now names an unsigned kit

    gate = RetagAfterCheck(OPTIONS, requirement, (), env())
    async with open_kit(parse_reference(ref), OPTIONS, tmp_path / "cache", config=LAZY,
                        gate=gate) as kit, trio.open_nursery() as nursery:
        await kit.engine.start(nursery)
        assert kit.inspection.digest == signed_digest
        assert await read_kit_file(kit, "weights.bin") == signed_data
        nursery.cancel_scope.cancel()
    assert await digest_of(host, "enf/race", "v1") != signed_digest
    # and the tag as it is now is refused: it is not signed
    line = one_line_error(unpack(ref, tmp_path / "now", *keyed(pub)), 1)
    assert "no signatures found" in line


async def test_keyless_requirement(registry: RegistryServer, tmp_path: Path) -> None:
    """cosign's own keyless bundle (tests/data/cosign): the identity it names passes the
    check (the unpack then stops because that manifest is an empty container image, not a
    ModelKit), another identity is refused for that reason."""
    ref, _ = await push_cosign_vector(registry, "enf/keyless")
    root = str(DATA / "cosign-trusted_root_pgi.json")
    passed = unpack(ref, tmp_path / "a", "--signature-identity", "cody@soyland.com",
                    "--signature-issuer", GITHUB, "--trusted-root", root)
    line = one_line_error(passed, 1)
    assert "refused" not in line and "signature" not in line, line
    assert "ModelKit" in line or "Kitfile" in line, line
    refused = unpack(ref, tmp_path / "b", "--signature-identity", "mitr@redhat.com",
                     "--signature-issuer", GITHUB, "--trusted-root", root)
    line = one_line_error(refused, 1)
    assert "refused, signature required by --signature-identity mitr@redhat.com" in line
    assert "mitr@redhat.com" in line.split("refused", 1)[1]
    policy = write_policy(tmp_path, f"""\
version: 1
trustedRoot: {root}
rules:
  - match: {registry.host}/enf/*
    require:
      - identity: someone@example.com
        issuer: {GITHUB}
      - identity: cody@soyland.com
        issuer: {GITHUB}
""")
    line = one_line_error(unpack(ref, tmp_path / "c", environ=env(KITFS_POLICY=str(policy))), 1)
    assert "refused" not in line and "signature" not in line, line


async def test_a_signed_index_vouches_for_the_modelkit_it_lists(
        registry: RegistryServer, tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    """`kitfs sign REF` (like cosign) signs what the tag names; when that is an image index,
    the ModelKit kitfs serves from it passes through the index's signature."""
    from kitfs.oci.client import OCI_INDEX

    host = registry.host
    data = os.urandom(6000)
    await publish(host, "enf/indexed", data, "kit")
    async with RegistryClient(host, ClientOptions()) as client:
        body, media_type, digest = await client.get_manifest("enf/indexed", "kit")
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": media_type, "digest": digest, "size": len(body),
             "artifactType": json.loads(body).get("artifactType")}]}).encode()
        await client.put_manifest("enf/indexed", "v1", index, OCI_INDEX)
    ref = f"{host}/enf/indexed:v1"
    key, pub = keys["ecdsa"]
    sign(ref, key)
    done = unpack(ref, tmp_path / "out", *keyed(pub))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "weights.bin").read_bytes() == data
    # by digest there is no tag to find the index by: the ModelKit itself is not signed
    line = one_line_error(unpack(f"{host}/enf/indexed@{digest}", tmp_path / "d", *keyed(pub)), 1)
    assert "no signatures found" in line


# -- the node policy ----------------------------------------------------------------------


def write_policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


async def test_policy_at_mount_and_unpack(registry: RegistryServer, tmp_path: Path,
                                          keys: dict[str, tuple[Path, Path]]) -> None:
    host = registry.host
    key, pub = keys["ed25519"]
    signed = await publish(host, "prod/signed", os.urandom(4000))
    sign(signed, key)
    unsigned = await publish(host, "prod/unsigned", os.urandom(4000))
    scratch = await publish(host, "dev/scratch", os.urandom(4000))
    banned = await publish(host, "banned/model", os.urandom(4000))
    elsewhere = await publish(host, "other/model", os.urandom(4000))
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "prod.pub").write_bytes(pub.read_bytes())
    policy = write_policy(tmp_path, f"""\
version: 1
rules:
  - match: {host}/prod/**
    require:
      - key: keys/prod.pub
    ignoreTlog: true
  - match: [{host}/dev/*]
    allow: unsigned
  - match: {host}/banned/**
    reject: not on this node
""")
    policy_env = env(KITFS_POLICY=str(policy))
    good = unpack(signed, tmp_path / "a", environ=policy_env)
    assert good.returncode == 0, good.stderr
    assert "signature verified" in good.stderr
    assert ok(unpack(scratch, tmp_path / "b", environ=policy_env)) is not None
    line = one_line_error(unpack(unsigned, tmp_path / "c", environ=policy_env), 1)
    assert f"signature required by {policy} rule 1: no signatures found" in line, line
    line = one_line_error(unpack(banned, tmp_path / "d", environ=policy_env), 1)
    assert line.endswith(f"{host}/banned/model is rejected by {policy} rule 3: not on this node")
    line = one_line_error(unpack(elsewhere, tmp_path / "e", environ=policy_env), 1)
    assert f"{host}/other/model matches no rule of {policy}, whose default is reject" in line
    # Flags add to the policy, never lift it.
    line = one_line_error(unpack(banned, tmp_path / "f", *keyed(pub), environ=policy_env), 1)
    assert "rejected by" in line

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    refused = kitfs("mount", unsigned, str(mnt), "--cache-dir", str(tmp_path / "cache"),
                    env=policy_env)
    assert "no signatures found" in one_line_error(refused, 1)
    assert not os.path.ismount(mnt)
    with mounted(signed, mnt, tmp_path / "cache", env=policy_env) as where:
        assert (where / "weights.bin").stat().st_size == 4000


async def test_policy_covers_parents(registry: RegistryServer, tmp_path: Path,
                                     keys: dict[str, tuple[Path, Path]]) -> None:
    """A signed child whose model.path names an unsigned parent serves the parent's
    weights: the parent must pass too."""
    host = registry.host
    key, pub = keys["ecdsa"]
    parent = await publish(host, "chain/parent", os.urandom(5000))
    docs = craft_layer(build_tar([("README.md", b"child\n")]), kind="docs", path="./README.md")
    child = await publish_kit(host, "chain/child", "v1", [docs], {
        "manifestVersion": "1.0.0", "package": {"name": "child"},
        "model": {"path": parent}, "docs": [{"path": "./README.md"}]})
    sign(child, key)
    line = one_line_error(unpack(child, tmp_path / "out", *keyed(pub)), 1)
    assert f"parent ModelKit {parent} (the model.path of {child}): refused" in line
    assert "no signatures found" in line, line
    sign(parent, key)
    done = unpack(child, tmp_path / "out2", *keyed(pub))
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("signature verified") == 2


def test_local_storage_without_a_registry(tmp_path: Path,
                                          keys: dict[str, tuple[Path, Path]]) -> None:
    """A gate asked about kit's local storage, which keeps no signatures, says so."""
    _, pub = keys["ecdsa"]
    requirement = flags_requirement(SignatureFlags(key=str(pub), ignore_tlog=True), MOUNT_FLAGS)
    gate = SignatureGate(OPTIONS, requirement, (), {})

    async def check() -> None:
        await gate.check(parse_reference("mymodel:v1"), "sha256:" + "0" * 64)

    with pytest.raises(SignatureError, match="only in kit's local storage"):
        trio.run(check)


@pytest.mark.parametrize(("text", "message"), [
    ("version: 1\nrules: [", "not valid YAML"),
    ("rules: []\n", "version must be 1"),
    ("version: 1\ndefault: maybe\n", "default must be reject or allow"),
    ("version: 1\nrule: []\n", "unknown field 'rule'"),
    ("version: 1\nrules:\n  - match: a/**\n", "needs exactly one of require, allow, reject"),
    ("version: 1\nrules:\n  - match: a/**\n    allow: yes\n", "allow takes the value unsigned"),
    ("version: 1\nrules:\n  - match: a/**\n    require: [{key: k.pub}]\n",
     "cannot read policy"),
    ("version: 1\nrules:\n  - match: a/**\n    require: [{identity: me}]\n",
     "keyless needs both identity and issuer"),
    ("version: 1\nrules:\n  - match: a/**\n    require: [{identity: me, issuer: x}]\n",
     "keyless needs a trustedRoot"),
    ("version: 1\nrules:\n  - require: []\n", "match must be a pattern"),
    ("version: 1\nrules: []\nrules: [{match: a/**, allow: unsigned}]\n",
     "'rules' given twice"),
    ("version: true\n", "version must be 1"),
    ("version: 1\nrules:\n  - match: a/b:v1\n    allow: unsigned\n", "names a tag or digest"),
    ("version: 1\nrules:\n  - match: a/b@sha256:00\n    allow: unsigned\n",
     "names a tag or digest"),
    ("version: 1\nrules:\n  - match: ' a/**'\n    allow: unsigned\n", "blanks around it"),
    ("version: 1\nrules:\n  - match: a/prod**\n    allow: unsigned\n",
     "must be a whole path segment"),
    ("version: 1\nrules:\n  - match: a/**\n    reject: false\n", "reject takes a reason"),
    ("version: 1\nrules:\n  - match: a/**\n    allow: unsigned\n    ignoreTlog: true\n",
     "belong to require rules"),
    ("version: 1\nrules:\n  - match: a/**\n    require: [{key: '-----BEGIN PUBLIC KEY-----'}]"
     "\n    ignoreTlog: true\n", "not a PEM public key"),
    ("[" * 5000, "not valid YAML"),
    ("version: 1\nrules:\n  - match: docker.io\n    reject: true\n", "needs REGISTRY/REPOSITORY"),
    ("version: 1\nrules:\n  - match: docker.io/\n    reject: true\n",
     "needs REGISTRY/REPOSITORY"),
    ("version: 1\nrules:\n  - match: reg.io/Prod/**\n    reject: true\n", "lower case"),
    ("version: 1\n? [a, b]\n: x\n", "a key that is a list or mapping"),
])
def test_policy_file_errors(tmp_path: Path, text: str, message: str) -> None:
    from kitfs.errors import PolicyError

    path = write_policy(tmp_path, text)
    with pytest.raises(PolicyError, match=re.escape(message)):
        parse_policy(path.read_bytes(), str(path), read_file)


def test_policy_key_needs_a_log_decision(tmp_path: Path,
                                         keys: dict[str, tuple[Path, Path]]) -> None:
    from kitfs.errors import UsageError

    _, pub = keys["ecdsa"]
    path = write_policy(tmp_path, f"version: 1\nrules:\n  - match: '**'\n"
                                  f"    require: [{{key: {pub}}}]\n")
    with pytest.raises(UsageError, match="or ignoreTlog: true on its rule"):
        parse_policy(path.read_bytes(), str(path), read_file)


def test_policy_matching(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    _, pub = keys["ecdsa"]
    inline = pub.read_text().strip().replace("\n", "\n          ")
    path = write_policy(tmp_path, f"""\
version: 1
default: allow
rules:
  - match: [reg.example.com/team/*]
    require:
      - key: |
          {inline}
    ignoreTlog: true
  - match: reg.example.com/**/secret
    reject: true
""")
    policy = parse_policy(path.read_bytes(), str(path), read_file)
    assert policy.requirement_for("reg.example.com/team/llm") is not None
    assert policy.requirement_for("reg.example.com/team/sub/llm") is None  # `*`: one segment
    assert policy.requirement_for("reg.example.com/teams/llm") is None
    with pytest.raises(SignatureError, match=r"rule 2$"):
        policy.requirement_for("reg.example.com/a/b/secret")
    assert policy.requirement_for("other.example.com/x") is None  # default: allow
    with pytest.raises(SignatureError):  # `/**/` spans no segment too
        policy.requirement_for("reg.example.com/secret")


def test_policy_names_compare_as_hosts_do(tmp_path: Path) -> None:
    """A host's case, the :443 port and Docker Hub's aliases do not get round a rule."""
    from kitfs.oci.reference import parse_reference
    from kitfs.signing.policy import policy_name

    for patterns in (["Registry.Example.com/prod/**", "docker.io/**"],
                     ["registry.example.com:443/prod/**", "index.docker.io/**"],
                     ["registry.example.com:0443/prod/**", "registry-1.docker.io/**"]):
        path = write_policy(tmp_path, "version: 1\ndefault: allow\nrules:\n" + "".join(
            f"  - match: {p}\n    reject: true\n" for p in patterns))
        policy = parse_policy(path.read_bytes(), str(path), read_file)
        for text in ("REGISTRY.EXAMPLE.COM/prod/llm:v1", "registry.example.com:443/prod/llm:v1",
                     "registry.example.com:0443/prod/llm:v1", "index.docker.io/library/x:v1",
                     "registry-1.docker.io/org/x:v1", "docker.io/org/x:v1"):
            ref = parse_reference(text)
            with pytest.raises(SignatureError, match="rejected"):
                policy.requirement_for(policy_name(ref.registry, ref.repository))
        ref = parse_reference("registry.example.com:5000/prod/llm:v1")  # another port
        assert policy.requirement_for(policy_name(ref.registry, ref.repository)) is None


def test_a_policy_file_adds_to_the_nodes(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """$KITFS_POLICY cannot replace /etc/kitfs/policy.yaml: both apply."""
    import kitfs.enforcement

    node = write_policy(tmp_path, "version: 1\ndefault: reject\n")
    monkeypatch.setattr(kitfs.enforcement, "NODE_POLICY", node)
    mine = tmp_path / "mine.yaml"
    mine.write_text("version: 1\ndefault: allow\n")
    policies = load_policies({"KITFS_POLICY": str(mine)})
    assert [p.source for p in policies] == [str(node), str(mine)]
    gate = SignatureGate(OPTIONS, None, policies, {})
    with pytest.raises(SignatureError, match="whose default is reject"):
        gate.requirements(parse_reference("reg.example.com/a/b:v1"))
    monkeypatch.setattr(kitfs.enforcement, "NODE_POLICY", tmp_path / "none" / "policy.yaml")
    assert load_policies({}) == ()
    # a link to a policy not there yet (a ConfigMap still mounting) is not "no policy"
    dangling = tmp_path / "link.yaml"
    dangling.symlink_to(tmp_path / "not-yet" / "policy.yaml")
    monkeypatch.setattr(kitfs.enforcement, "NODE_POLICY", dangling)
    from kitfs.errors import PolicyError

    with pytest.raises(PolicyError, match="cannot read the node policy"):
        load_policies({})


def test_a_broken_policy_refuses_every_mount(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "version: 2\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = kitfs("mount", "127.0.0.1:1/x/y:v1", str(mnt), "--cache-dir", str(tmp_path / "c"),
                 env=env(KITFS_POLICY=str(path)))
    assert "version must be 1" in one_line_error(proc, 2)
    assert not os.path.ismount(mnt)
    missing = kitfs("unpack", "127.0.0.1:1/x/y:v1", "-d", str(tmp_path / "o"),
                    env=env(KITFS_POLICY=str(tmp_path / "nope.yaml")))
    assert "cannot read $KITFS_POLICY" in one_line_error(missing, 2)
