"""Registry credentials, stored exactly where and how `kit login` stores them.

`kit` keeps them in `$KITOPS_HOME/credentials.json`, a Docker config.json
(oras-go's credentials store: `auths{host:{auth:base64(user:pass)}}`, or a
credential helper named by `credsStore` / `credHelpers`), and falls back to
Docker's own config for reads. A user who ran `kit login` must not have to log
in again for kitfs, and the other way round.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import json
import logging
import os
import shutil
import subprocess
import tempfile
from typing import Any

import httpx
import trio

from kitfs.errors import AuthError, LocalStorageError
from kitfs.oci.auth import Credential
from kitfs.oci.options import ClientOptions
from kitfs.oci.reference import DOCKER_HUB_HOSTS

log = logging.getLogger(__name__)

CREDENTIALS_FILE = "credentials.json"
HELPER_PREFIX = "docker-credential-"
_TOKEN_USERNAME = "<token>"
_HELPER_TIMEOUT = 30.0
_DOCKER_HUB_ADDRESS = "https://index.docker.io/v1/"


def kitops_home(override: str | None = None) -> str:
    """$KITOPS_HOME as `kit` resolves it on Linux."""
    if override:
        return override
    env = os.environ.get("KITOPS_HOME")
    if env:
        return env
    data = os.environ.get("XDG_DATA_HOME")
    if not data:
        home = os.environ.get("HOME") or os.path.expanduser("~")
        data = os.path.join(home, ".local", "share")
    return os.path.join(data, "kitops")


def credentials_path(home: str | None = None) -> str:
    return os.path.join(kitops_home(home), CREDENTIALS_FILE)


def docker_config_path() -> str:
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(base, "config.json")


def server_address(registry: str) -> str:
    """The key a registry's credentials are stored under (Docker Hub has a legacy one)."""
    return _DOCKER_HUB_ADDRESS if registry in DOCKER_HUB_HOSTS else registry


def _hostname(key: str) -> str:
    """`https://host/v1/` -> `host`: legacy config files keep URLs as keys."""
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key.split("/", 1)[0]


# -- reading config files --------------------------------------------------------


def _load(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise LocalStorageError(f"cannot read credentials file {path}: {exc.strerror}") from exc
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise LocalStorageError(f"credentials file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise LocalStorageError(f"credentials file {path} is not a JSON object")
    return data


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _auth_configured(config: dict[str, Any]) -> bool:
    return bool(
        config.get("credsStore") or _dict(config.get("credHelpers")) or _dict(config.get("auths"))
    )


def _default_helper() -> str:
    """The helper oras-go picks for a config with nothing configured (Linux rules)."""
    name = "pass" if shutil.which("pass") else "secretservice"
    return name if shutil.which(HELPER_PREFIX + name) else ""


def _helper_for(config: dict[str, Any], address: str, detect: bool) -> str:
    helper = _dict(config.get("credHelpers")).get(address)
    if isinstance(helper, str) and helper:
        return helper
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        return store
    if detect and not _auth_configured(config):
        return _default_helper()
    return ""


def entry_credential(entry: dict[str, Any], where: str) -> Credential:
    """The credential of one config.json `auths` entry; LocalStorageError if its auth is
    not base64 of user:password (the CSI driver checks a pod's secret with it too)."""
    username = str(entry.get("username") or "")
    password = str(entry.get("password") or "")
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth, validate=False).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise LocalStorageError(f"malformed auth entry in {where}") from exc
        username, sep, password = decoded.partition(":")
        if not sep:
            raise LocalStorageError(f"malformed auth entry in {where}: expected user:password")
    return Credential(
        username=username,
        password=password,
        identity_token=str(entry.get("identitytoken") or ""),
        registry_token=str(entry.get("registrytoken") or ""),
    )


def _file_credential(config: dict[str, Any], address: str, path: str) -> Credential | None:
    auths = _dict(config.get("auths"))
    entry = auths.get(address)
    if entry is None:
        entry = next((v for k, v in auths.items() if _hostname(k) == address), None)
    if not isinstance(entry, dict):
        return None
    cred = entry_credential(entry, path)
    return None if cred.is_empty else cred


async def _helper_get(helper: str, address: str) -> Credential | None:
    program = HELPER_PREFIX + helper
    if shutil.which(program) is None:
        log.warning("credential helper %s is not installed; going on without credentials", program)
        return None
    try:
        with trio.fail_after(_HELPER_TIMEOUT):
            done = await trio.run_process(
                [program, "get"],
                stdin=address.encode(),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    except trio.TooSlowError:
        raise AuthError(
            f"credential helper {program} did not answer within {_HELPER_TIMEOUT:.0f}s"
        ) from None
    except OSError as exc:
        raise AuthError(f"cannot run credential helper {program}: {exc.strerror}") from exc
    return _parse_helper_output(program, done.returncode, done.stdout, done.stderr)


def _parse_helper_output(
    program: str, returncode: int, stdout: bytes, stderr: bytes
) -> Credential | None:
    if returncode != 0:
        message = (stdout or stderr).decode(errors="replace").strip()
        if "credentials not found" in message.lower():
            return None
        first = message.splitlines()[0] if message else f"exit status {returncode}"
        raise AuthError(f"credential helper {program} failed: {first}")
    try:
        data = json.loads(stdout)
        username = str(data.get("Username") or "")
        secret = str(data.get("Secret") or "")
    except (ValueError, AttributeError) as exc:
        raise AuthError(f"credential helper {program} printed malformed JSON") from exc
    if username == _TOKEN_USERNAME:
        return Credential(identity_token=secret)
    cred = Credential(username=username, password=secret)
    return None if cred.is_empty else cred


async def _lookup_in(path: str, registry: str, detect: bool) -> Credential | None:
    config = _load(path)
    address = server_address(registry)
    helper = _helper_for(config, address, detect)
    if helper:
        cred = await _helper_get(helper, address)
        if cred is not None:
            return cred
    return _file_credential(config, address, path)


async def lookup_credential(registry: str, home: str | None = None) -> Credential | None:
    """The credentials `kit` would use for `registry`: its own file, then Docker's."""
    cred = await _lookup_in(credentials_path(home), registry, detect=True)
    if cred is None:
        cred = await _lookup_in(docker_config_path(), registry, detect=False)
    return cred


# -- writing ----------------------------------------------------------------------


def _write_atomic(path: str, config: dict[str, Any]) -> None:
    directory = os.path.dirname(path) or "."
    data = (json.dumps(config, indent="\t") + "\n").encode()
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".credentials-", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise LocalStorageError(f"cannot write credentials in {directory}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise LocalStorageError(f"cannot write credentials file {path}: {exc.strerror}") from exc


def save_auths(home: str, auths: dict[str, Any]) -> None:
    """Write a credentials file (0600) in `home` holding exactly these `auths` entries: the
    CSI driver hands a pod's registry secret to the daemon that serves its volume this way."""
    _write_atomic(credentials_path(home), {"auths": auths})


def _helper_run(helper: str, action: str, payload: bytes) -> None:
    program = HELPER_PREFIX + helper
    try:
        done = subprocess.run(
            [program, action],
            input=payload,
            capture_output=True,
            timeout=_HELPER_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise LocalStorageError(f"credential helper {program} is not installed") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LocalStorageError(f"credential helper {program} failed: {exc}") from exc
    if done.returncode != 0:
        message = (done.stdout or done.stderr).decode(errors="replace").strip()
        if action == "erase" and "not found" in message.lower():
            return
        first = message.splitlines()[0] if message else f"exit status {done.returncode}"
        raise LocalStorageError(f"credential helper {program} {action} failed: {first}")


def save_login(registry: str, username: str, password: str, home: str | None = None,
               *, file_only: bool = False) -> None:
    """Store credentials where `kit login` would; other entries are kept.

    An empty username stores `password` as an identity (refresh) token, as kit does.
    `file_only` keeps them in `home`'s file even where kit would pick a credential
    helper: a throwaway home (kitfs-kserve's) must not leave them in a keyring.
    """
    path = credentials_path(home)
    config = _load(path)
    address = server_address(registry)
    helper = "" if file_only else _helper_for(config, address, detect=True)
    if helper:
        secret = {"ServerURL": address, "Username": username or _TOKEN_USERNAME, "Secret": password}
        _helper_run(helper, "store", json.dumps(secret).encode())
        if not config.get("credsStore") and not _dict(config.get("credHelpers")).get(address):
            config["credsStore"] = helper  # oras-go records the detected helper on first put
            _write_atomic(path, config)
        return
    entry: dict[str, str] = {}
    if username:
        entry["auth"] = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    else:
        entry["identitytoken"] = password
    auths = _dict(config.get("auths"))
    auths[address] = entry
    config["auths"] = auths
    _write_atomic(path, config)


def remove_login(registry: str, home: str | None = None) -> bool:
    """Forget a registry's credentials, as `kit logout` does; False if there were none."""
    path = credentials_path(home)
    config = _load(path)
    address = server_address(registry)
    helper = _helper_for(config, address, detect=False)
    if helper:
        _helper_run(helper, "erase", address.encode())
        return True
    auths = _dict(config.get("auths"))
    keys = [k for k in auths if k == address or _hostname(k) == address]
    if not keys:
        return False
    for k in keys:
        del auths[k]
    config["auths"] = auths
    _write_atomic(path, config)
    return True


async def login(
    registry: str,
    username: str,
    password: str,
    options: ClientOptions | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    file_only: bool = False,
) -> None:
    """Check the credentials against the registry, then store them; nothing is saved on failure.

    `transport` replaces the network, for tests; `file_only` as for save_login.
    """
    from kitfs.oci.client import RegistryClient  # the client itself reads credentials

    options = options or ClientOptions()
    cred = (
        Credential(username=username, password=password)
        if username
        else Credential(identity_token=password)
    )
    async with RegistryClient(registry, options, credential=cred, transport=transport) as client:
        try:
            await client.ping()
        except AuthError:
            raise AuthError(f"wrong username or password for {registry}") from None
    await trio.to_thread.run_sync(
        functools.partial(save_login, registry, username, password, options.kitops_home,
                          file_only=file_only))
