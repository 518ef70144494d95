"""kitfs-init and kitfs-kserve run as Kubernetes and KServe run kit's images.

Each check starts the installed entry function in a fresh interpreter with
the environment (and, for KServe, the [storage-uri, dest-path] arguments) the
platform gives the container, against the real registry: the files land
where `kitfs unpack` puts them, with the same bytes; the variables kit's
images read are honoured; a signature check that cannot be made, a bad
variable or URI, a wrong password and a corrupted blob each fail with one
line and a non-zero status, with no unchecked byte under a final name, no
password in the output and nothing left in TMPDIR.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import tomllib
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import pytest
import trio
from faultproxy import FaultProxy, Slow

from helpers import kit_tar, kitfs, layer_desc, make_project, ok, one_line_error, push_manifest, sha
from kitfs.modelkit import mediatypes as mt
from kitfs.modelkit.kitfile import config_json, load_kitfile
from kitfs.unpack import TEMP_PREFIX
from registry import RegistryServer, free_port

INIT = "from kitfs.initcontainer import main; main()"
KSERVE = "from kitfs.kserve import main; main()"
PASSWORD = "s3cret-pw"  # the auth_registry fixture's
CONTRACT_VARIABLES = ("MODELKIT_REF", "UNPACK_PATH", "UNPACK_FILTER", "EXTRA_FLAGS",
                      "COSIGN_KEY", "COSIGN_CERT_IDENTITY", "COSIGN_CERT_OIDC_ISSUER",
                      "KIT_UNPACK_FLAGS", "KIT_USER", "KIT_PASSWORD", "AWS_ROLE_ARN", "GCP_WIF")


@pytest.fixture(scope="module")
def kit_ref(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    """One ModelKit (model, dataset, docs), packed by kitfs into the anonymous registry."""
    tmp = tmp_path_factory.mktemp("entry-kit")
    ref = f"{registry.host}/entry/tiny:v1"
    ok(kitfs("pack", str(make_project(tmp / "proj", weight_bytes=256 << 10)), "-t", ref,
             home=tmp / "home"))
    return ref


def environment(tmp: Path, **variables: str) -> dict[str, str]:
    """This environment (PYTHONPATH included) less any contract variable and kitfs setting,
    with a kitops home, Docker config and TMPDIR of the test's own, plus `variables`."""
    env = {k: v for k, v in os.environ.items()
           if k not in CONTRACT_VARIABLES
           and k not in ("KITFS_CACHE_DIR", "XDG_CACHE_HOME", "KITFS_PROGRESS_LINES")}
    for name in ("home", "docker", "tmp"):
        (tmp / name).mkdir(exist_ok=True)
    env.update(KITOPS_HOME=str(tmp / "home"), DOCKER_CONFIG=str(tmp / "docker"),
               TMPDIR=str(tmp / "tmp"))
    env.update(variables)
    return env


def entry(code: str, env: Mapping[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    """Run an entrypoint as the container runtime does; whatever happened, it leaves nothing
    in TMPDIR (its credentials home and chunk cache were its own, for this run)."""
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          env=env, timeout=120)
    assert not list(Path(env["TMPDIR"]).iterdir()), proc.stderr
    return proc


def tree(root: Path) -> dict[str, str]:
    """Every file below `root` (relative path -> sha256)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


def unpacked(ref: str, tmp: Path, *flags: str) -> dict[str, str]:
    """What `kitfs unpack REF FLAGS` writes."""
    out = tmp / ("want" + "".join(flags).replace("/", "_"))
    ok(kitfs("unpack", ref, "-d", str(out), *flags, "--cache-dir", str(tmp / "cache"),
             home=tmp / "home"))
    return tree(out)


def test_the_console_scripts_name_these_entry_functions() -> None:
    """The image's entrypoints are the console scripts pyproject.toml declares."""
    with open(Path(__file__).parent.parent / "pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["kitfs-init"] == "kitfs.initcontainer:main"
    assert scripts["kitfs-kserve"] == "kitfs.kserve:main"
    assert INIT == "from kitfs.initcontainer import main; main()"
    assert KSERVE == "from kitfs.kserve import main; main()"


# -- kitfs-init -------------------------------------------------------------------------


def test_init_unpacks_the_model_to_unpack_path_as_kitfs_unpack_does(
        kit_ref: str, tmp_path: Path) -> None:
    dest = tmp_path / "modelkit"
    env = environment(tmp_path, MODELKIT_REF=kit_ref, UNPACK_PATH=str(dest))
    proc = entry(INIT, env)
    assert ok(proc).splitlines()[0] == "Signature verification is disabled"
    assert f"Unpacking modelkit {kit_ref} to {dest} with filter 'model'. Additional flags: " \
           "--ignore-existing" in proc.stdout
    want = unpacked(kit_ref, tmp_path, "--filter", "model")
    assert tree(dest) == want and "model/model.safetensors" in want and "Kitfile" not in want
    # kit's default EXTRA_FLAGS (--ignore-existing): a restarted init container succeeds.
    ok(entry(INIT, env))
    assert tree(dest) == want


def test_init_uses_kitfs_cache_dir_when_given(kit_ref: str, tmp_path: Path) -> None:
    """A cache the operator chose (a node's hostPath shared by its pods) keeps the chunks."""
    cache = tmp_path / "node-cache"
    env = environment(tmp_path, MODELKIT_REF=kit_ref, UNPACK_PATH=str(tmp_path / "m"),
                      KITFS_CACHE_DIR=str(cache))
    ok(entry(INIT, env))
    assert any(p.is_file() for p in (cache / "chunks").rglob("*"))
    env = environment(tmp_path, MODELKIT_REF=kit_ref, UNPACK_PATH=str(tmp_path / "m2"),
                      EXTRA_FLAGS=f"--cache-dir {tmp_path / 'flag-cache'}")
    ok(entry(INIT, env))
    assert any(p.is_file() for p in (tmp_path / "flag-cache" / "chunks").rglob("*"))


def test_init_honours_unpack_filter_and_extra_flags(kit_ref: str, tmp_path: Path) -> None:
    dest = tmp_path / "modelkit"
    env = environment(tmp_path, MODELKIT_REF=kit_ref, UNPACK_PATH=str(dest),
                      UNPACK_FILTER="datasets", EXTRA_FLAGS="--filter 'docs' -o")
    ok(entry(INIT, env))
    assert tree(dest) == unpacked(kit_ref, tmp_path, "--filter", "datasets", "--filter", "docs")
    assert set(tree(dest)) == {"data/train.csv", "README.md"}
    # As in kit's script, a --dir in EXTRA_FLAGS wins over UNPACK_PATH.
    other = tmp_path / "other"
    env["EXTRA_FLAGS"] = f"--dir={other}"
    proc = entry(INIT, env)
    assert f"with flags '--filter=datasets --dir={other}'" in ok(proc)
    assert set(tree(other)) == {"data/train.csv"}


def test_progress_goes_to_the_log_as_plain_lines(kit_ref: str, tmp_path: Path) -> None:
    """Not a terminal: no bar (no carriage return), but a line per interval (every 10 s by
    default; here as often as updates come)."""
    env = environment(tmp_path, MODELKIT_REF=kit_ref, UNPACK_PATH=str(tmp_path / "m"),
                      KITFS_PROGRESS_LINES="0.000001")
    proc = entry(INIT, env)
    ok(proc)
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith("unpacking: ") and "%" in line for line in lines)
    assert "\r" not in proc.stdout + proc.stderr
    env["KITFS_PROGRESS_LINES"] = "often"
    assert "$KITFS_PROGRESS_LINES must be a number" in one_line_error(entry(INIT, env))


@pytest.mark.parametrize(("variables", "needle"), [
    ({"COSIGN_KEY": "/keys/cosign.pub"},
     "COSIGN_KEY without COSIGN_TRUSTED_ROOT cannot check a transparency-log entry"),
    ({"COSIGN_KEY": "/keys/cosign.pub", "COSIGN_INSECURE_IGNORE_TLOG": "true"},
     "cannot read COSIGN_KEY /keys/cosign.pub"),
    ({"COSIGN_KEY": "k8s://ns/secret", "COSIGN_INSECURE_IGNORE_TLOG": "1"},
     "a public key file only"),
    ({"COSIGN_KEY": "/k.pub", "COSIGN_INSECURE_IGNORE_TLOG": "yes"},
     "COSIGN_INSECURE_IGNORE_TLOG='yes' is not a boolean"),
    ({"COSIGN_CERT_IDENTITY": "kitops@jozu.com",
      "COSIGN_CERT_OIDC_ISSUER": "https://github.com/login/oauth"},
     "keyless verification needs COSIGN_TRUSTED_ROOT"),
    # kit skips this one silently; kitfs refuses it
    ({"COSIGN_CERT_IDENTITY": "kitops@jozu.com"},
     "needs both COSIGN_CERT_IDENTITY and COSIGN_CERT_OIDC_ISSUER"),
], ids=["key-no-log-choice", "missing-key", "kms", "bad-bool", "keyless-no-root",
        "identity-only"])
def test_init_refuses_a_signature_check_it_cannot_make(
        kit_ref: str, tmp_path: Path, variables: dict[str, str], needle: str) -> None:
    dest = tmp_path / "modelkit"
    env = environment(tmp_path, MODELKIT_REF=kit_ref, UNPACK_PATH=str(dest), **variables)
    assert needle in one_line_error(entry(INIT, env))
    assert not dest.exists()


def test_init_verifies_the_signature_first(kit_ref: str, tmp_path: Path) -> None:
    """kit's COSIGN_KEY contract: a ModelKit signed with the key unpacks, one signed with
    another key does not (nothing is written); COSIGN_* as cosign reads them."""
    from test_signatures_registry import PASSWORD, keypair

    host = kit_ref.split("/")[0]
    signed_ref = f"{host}/entry/signed:v1"
    ok(kitfs("pack", str(make_project(tmp_path / "proj", weight_bytes=64 << 10)), "-t",
             signed_ref, home=tmp_path / "packer"))
    key, pub = keypair(tmp_path, "ecdsa")
    ok(kitfs("sign", "--key", str(key), signed_ref,
             env={**os.environ, "COSIGN_PASSWORD": PASSWORD}))
    _, other = keypair(tmp_path / "proj", "ed25519")
    dest = tmp_path / "modelkit"
    env = environment(tmp_path, MODELKIT_REF=signed_ref, UNPACK_PATH=str(dest),
                      COSIGN_KEY=str(other), COSIGN_INSECURE_IGNORE_TLOG="true")
    refused = entry(INIT, env)
    assert "refused, signature required by" in one_line_error(refused)
    assert "does not verify with" in refused.stderr
    assert not dest.exists() or not any(dest.rglob("*"))
    env["COSIGN_KEY"] = str(pub)
    proc = entry(INIT, env)
    ok(proc)
    assert f"Verifying signature for modelkit {signed_ref} via key" in proc.stdout
    assert "signature verified: sha256:" in proc.stderr
    assert (dest / "model").exists()


@pytest.mark.parametrize(("variables", "needle"), [
    ({}, "$MODELKIT_REF is required"),
    ({"MODELKIT_REF": "  "}, "$MODELKIT_REF is required"),
    ({"MODELKIT_REF": "Reg.io/UPPER:v1"}, "Reg.io"),
    ({"EXTRA_FLAGS": "--help"}, "EXTRA_FLAGS: --help"),
    ({"EXTRA_FLAGS": "--overwrit"}, "EXTRA_FLAGS: unrecognized arguments: --overwrit"),
    ({"EXTRA_FLAGS": "--filter 'model"}, "EXTRA_FLAGS: cannot split"),
    ({"EXTRA_FLAGS": "another/ref:v1"}, "EXTRA_FLAGS: unexpected argument 'another/ref:v1'"),
    ({"EXTRA_FLAGS": "--filter bogus"}, "bogus"),
], ids=["missing", "blank", "bad-ref", "help", "unknown-flag", "quote", "second-ref",
        "bad-filter"])
def test_init_bad_settings_are_one_line(kit_ref: str, tmp_path: Path,
                                        variables: dict[str, str], needle: str) -> None:
    env = environment(tmp_path, UNPACK_PATH=str(tmp_path / "modelkit"))
    env.update({"MODELKIT_REF": kit_ref, **variables} if variables else {})
    assert needle in one_line_error(entry(INIT, env))
    assert not (tmp_path / "modelkit" / "model").exists()


def test_init_unreachable_registry_is_one_line(tmp_path: Path) -> None:
    ref = f"127.0.0.1:{free_port()}/nobody/home:v1"
    env = environment(tmp_path, MODELKIT_REF=ref, UNPACK_PATH=str(tmp_path / "m"),
                      EXTRA_FLAGS="--timeout 1")
    assert "127.0.0.1" in one_line_error(entry(INIT, env))


@pytest.mark.parametrize("flags", [
    "--proxy http://me:pr0xy-pw@127.0.0.1:PORT --timeout 1",
    "--timeout 1 --prox=http://me:pr0xy-pw@127.0.0.1:PORT",
    "http://me:pr0xy-pw@127.0.0.1:PORT",
], ids=["unreachable-proxy", "bad-flag", "stray-word"])
def test_a_password_in_the_flags_is_never_printed(kit_ref: str, tmp_path: Path,
                                                  flags: str) -> None:
    flags = flags.replace("PORT", str(free_port()))
    env = environment(tmp_path, MODELKIT_REF=kit_ref, UNPACK_PATH=str(tmp_path / "m"),
                      EXTRA_FLAGS=flags)
    proc = entry(INIT, env)
    one_line_error(proc)
    assert "pr0xy-pw" not in proc.stdout + proc.stderr and "me:***@" in proc.stdout + proc.stderr
    env = environment(tmp_path, KIT_UNPACK_FLAGS=flags)
    proc = entry(KSERVE, env, f"kit://{kit_ref}", str(tmp_path / "models"))
    one_line_error(proc)
    assert "pr0xy-pw" not in proc.stdout + proc.stderr and "me:***@" in proc.stdout + proc.stderr


# -- kitfs-kserve -----------------------------------------------------------------------


def test_kserve_unpacks_everything_to_dest_and_logs_the_kitfile(
        kit_ref: str, tmp_path: Path) -> None:
    dest = tmp_path / "mnt" / "models"
    proc = entry(KSERVE, environment(tmp_path), f"kit://{kit_ref}", str(dest))
    out = ok(proc)
    assert f"Unpacking {kit_ref} to {dest}" in out and "Unpacked modelkit:" in out
    assert "name: tiny-llm" in out  # the Kitfile, as kit's entrypoint cats it
    assert tree(dest) == unpacked(kit_ref, tmp_path)
    assert {"Kitfile", "model/model.safetensors", "data/train.csv"} <= set(tree(dest))


def test_kserve_honours_kit_unpack_flags(kit_ref: str, tmp_path: Path) -> None:
    dest = tmp_path / "models"
    env = environment(tmp_path, KIT_UNPACK_FLAGS="--filter=model -v")
    ok(entry(KSERVE, env, f"kit://{kit_ref}", str(dest)))
    assert tree(dest) == unpacked(kit_ref, tmp_path, "--filter", "model")
    assert "data/train.csv" not in tree(dest)


@pytest.fixture(scope="module")
def secure_ref(auth_registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A ModelKit in the registry that wants a password."""
    tmp = tmp_path_factory.mktemp("entry-secure")
    ref = f"{auth_registry.host}/entry/secure:v1"
    ok(kitfs("login", auth_registry.host, "-u", "kitfs", "--password-stdin", home=tmp / "home",
             stdin=PASSWORD + "\n"))
    ok(kitfs("pack", str(make_project(tmp / "proj", weight_bytes=4096)), "-t", ref,
             home=tmp / "home"))
    return ref


def test_init_reads_a_docker_config_secret(auth_registry: RegistryServer, secure_ref: str,
                                           tmp_path: Path) -> None:
    """The README's way to a private registry: a dockerconfigjson secret as $DOCKER_CONFIG."""
    dest = tmp_path / "models"
    env = environment(tmp_path, MODELKIT_REF=secure_ref, UNPACK_PATH=str(dest))
    assert auth_registry.host in one_line_error(entry(INIT, env))
    secret = tmp_path / "secret"
    secret.mkdir()
    auth = base64.b64encode(f"kitfs:{PASSWORD}".encode()).decode()
    (secret / "config.json").write_text(json.dumps({"auths": {auth_registry.host:
                                                               {"auth": auth}}}))
    env["DOCKER_CONFIG"] = str(secret)
    ok(entry(INIT, env))
    assert "model/model.safetensors" in tree(dest)


def test_kserve_logs_in_with_kit_user_for_this_run_only(
        auth_registry: RegistryServer, secure_ref: str, tmp_path: Path) -> None:
    ref = secure_ref
    dest = tmp_path / "models"
    anonymous = environment(tmp_path)
    assert auth_registry.host in one_line_error(entry(KSERVE, anonymous, f"kit://{ref}",
                                                      str(dest)))
    # As a secret made with --from-file=KIT_PASSWORD=token.txt gives it: a newline at the end.
    env = environment(tmp_path, KIT_USER="kitfs", KIT_PASSWORD=PASSWORD + "\n")
    proc = entry(KSERVE, env, f"kit://{ref}", str(dest))
    assert f"Logging in using repo url: {auth_registry.host}" in ok(proc)
    assert PASSWORD not in proc.stdout + proc.stderr
    assert "model/model.safetensors" in tree(dest)
    # Nothing of the login is left for a later pod: no home written (nor a temporary one
    # kept: entry() checks TMPDIR).
    assert not list((tmp_path / "home").iterdir())

    env["KIT_PASSWORD"] = "wrong-" + PASSWORD
    proc = entry(KSERVE, env, f"kit://{ref}", str(tmp_path / "again"))
    line = one_line_error(proc)
    assert "wrong username or password" in line and auth_registry.host in line
    assert PASSWORD not in proc.stdout + proc.stderr
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize(("argv", "flags", "needle"), [
    (["s3://bucket/model", "/mnt/models"], "", "accepts only kit://"),
    (["hf://org/model", "/mnt/models"], "", "accepts only kit://"),
    (["REF", "/mnt/models"], "", "accepts only kit://"),
    (["kit://", "/mnt/models"], "", "accepts only kit://"),
    (["kit://REF"], "", "usage: kitfs-kserve kit://REF DEST-PATH"),
    (["kit://REF", "DEST", "--extra"], "", "usage: kitfs-kserve"),
    (["kit://REF", "DEST"], "-d /elsewhere", "-d/--dir makes no sense here"),
    (["kit://REF", "DEST"], "--no-such-flag", "KIT_UNPACK_FLAGS: unrecognized arguments"),
    (["kit://REF", "DEST"], "-h", "KIT_UNPACK_FLAGS: -h"),
    (["kit://Reg.io/UPPER:v1", "DEST"], "", "Reg.io"),
], ids=["s3", "hf", "no-scheme", "empty", "one-arg", "three-args", "dir-flag", "unknown-flag",
        "help", "bad-ref"])
def test_kserve_bad_arguments_are_one_line(kit_ref: str, tmp_path: Path, argv: list[str],
                                           flags: str, needle: str) -> None:
    argv = [a.replace("REF", kit_ref).replace("DEST", str(tmp_path / "models")) for a in argv]
    env = environment(tmp_path, KIT_UNPACK_FLAGS=flags)
    assert needle in one_line_error(entry(KSERVE, env, *argv))
    assert not (tmp_path / "models").exists()


def test_kserve_unreachable_registry_is_one_line(tmp_path: Path) -> None:
    ref = f"127.0.0.1:{free_port()}/nobody/home:v1"
    # The login meets it first (and takes --timeout from the flags, as the unpack does).
    env = environment(tmp_path, KIT_USER="u", KIT_PASSWORD="p", KIT_UNPACK_FLAGS="--timeout 1")
    assert "127.0.0.1" in one_line_error(entry(KSERVE, env, f"kit://{ref}", str(tmp_path / "m")))
    env = environment(tmp_path, KIT_UNPACK_FLAGS="--timeout 1")
    assert "127.0.0.1" in one_line_error(entry(KSERVE, env, f"kit://{ref}", str(tmp_path / "m")))


async def kit_written(registry: RegistryServer, project: Path, repo: str) -> tuple[str, str]:
    """`project` pushed as kit writes ModelKits (uncompressed tar layers, no table of
    contents: a layer is checked only whole); its reference and its model layer's digest."""
    paths = ["./model", "./data/train.csv", "./README.md"]
    tars = [kit_tar(project, p, paths) for p in paths]
    kitfile = load_kitfile((project / "Kitfile").read_bytes())
    config = config_json(kitfile.with_layer_digests([(sha(t), sha(t)) for t in tars]))
    kinds = ["model", "dataset", "docs"]
    manifest = {"schemaVersion": 2, "config": layer_desc(mt.KITOPS_CONFIG, config),
                "layers": [layer_desc(mt.layer_media_type(k), t) for k, t in zip(kinds, tars,
                                                                                 strict=True)]}
    await push_manifest(registry.host, repo, manifest, [config, *tars])
    return f"{registry.host}/{repo}:v1", sha(tars[0])


async def kitfs_written(registry: RegistryServer, project: Path, repo: str) -> tuple[str, str]:
    """`project` packed by kitfs (each chunk of a layer has its own digest)."""
    ref = f"{registry.host}/{repo}:v1"
    ok(kitfs("pack", str(project), "-t", ref, home=project.parent / "pack-home"))
    manifest = json.loads(ok(kitfs("inspect", ref, "--json", "--remote",
                                   home=project.parent / "pack-home")))["manifest"]
    digest: str = max(manifest["layers"], key=lambda layer: layer["size"])["digest"]
    return ref, digest


@pytest.mark.parametrize("writer", [kit_written, kitfs_written], ids=["kit", "kitfs"])
async def test_kserve_corrupted_blob_fails_and_leaves_no_file_under_its_name(
        registry: RegistryServer, tmp_path: Path,
        writer: Callable[[RegistryServer, Path, str], Awaitable[tuple[str, str]]]) -> None:
    """The registry serves a model layer one flipped byte away from its digest (its storage
    rotted): exit non-zero, and no file with a byte nobody checked under its final name."""
    project = make_project(tmp_path / "proj", weight_bytes=1 << 20)
    ref, digest = await writer(registry, project, f"entry/rotten-{writer.__name__}")
    algorithm, hexdigest = digest.split(":")
    blob = (registry.root / "data" / "docker" / "registry" / "v2" / "blobs" / algorithm
            / hexdigest[:2] / hexdigest / "data")
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))

    dest = tmp_path / "models"
    proc = await trio.to_thread.run_sync(
        lambda: entry(KSERVE, environment(tmp_path), f"kit://{ref}", str(dest)))
    line = one_line_error(proc)
    assert "match" in line or "digest" in line, line
    assert "Unpacked" not in proc.stdout
    assert not (dest / "model" / "model.safetensors").exists()
    # What is left under a final name was checked: the files of other layers, or (kitfs
    # layers, whose chunks have digests of their own) a file whose every chunk matched.
    left = {rel: digest for rel, digest in tree(dest).items() if rel != "Kitfile"}
    assert left.items() <= tree(project).items(), "a file with unchecked bytes was left"
    assert not [p for p in dest.rglob(TEMP_PREFIX + "*")]


async def test_kserve_sigterm_removes_its_temporary_files_and_home(
        registry: RegistryServer, tmp_path: Path) -> None:
    """A pod deleted mid-unpack: SIGTERM ends the run as Ctrl-C would, with no temporary
    file in the destination and no private home or cache left behind."""
    project = make_project(tmp_path / "proj", weight_bytes=20 << 20)  # > unpack's WRITE_BATCH
    ref, digest = await kitfs_written(registry, project, "entry/sigterm")
    dest = tmp_path / "models"
    with FaultProxy(registry.host) as proxy:
        proxy.add(Slow(4 << 20), path=digest)
        cmd = [sys.executable, "-c", KSERVE, f"kit://{ref.replace(registry.host, proxy.host)}",
               str(dest)]
        child = subprocess.Popen(cmd, env=environment(tmp_path), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
        try:
            deadline = trio.current_time() + 60
            while not list(dest.rglob(TEMP_PREFIX + "*")):
                assert child.poll() is None and trio.current_time() < deadline
                await trio.sleep(0.05)
            child.send_signal(signal.SIGTERM)
            _, err = await trio.to_thread.run_sync(lambda: child.communicate(timeout=60))
        finally:
            if child.poll() is None:
                child.kill()
    assert child.returncode == 130 and err.strip() == "kitfs: interrupted", err
    assert not list(dest.rglob(TEMP_PREFIX + "*"))
    assert not (dest / "model" / "model.safetensors").exists()
    assert not list((tmp_path / "tmp").iterdir())
