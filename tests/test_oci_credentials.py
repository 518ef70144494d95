"""Credentials: the files and helpers `kit login` uses, read and written the same way."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
from fakeregistry import REGISTRY, FakeRegistry

from kitfs.errors import AuthError, LocalStorageError
from kitfs.oci.auth import Credential
from kitfs.oci.client import ClientOptions
from kitfs.oci.credentials import (
    credentials_path,
    kitops_home,
    login,
    lookup_credential,
    remove_login,
    save_login,
    server_address,
)

HELPER = """#!/bin/sh
# A docker credential helper keeping secrets in files under $FAKE_HELPER_DIR.
dir="$FAKE_HELPER_DIR"
read -r first
case "$1" in
  get)
    if [ -f "$dir/$(echo "$first" | tr '/:' '__')" ]; then
      cat "$dir/$(echo "$first" | tr '/:' '__')"
    else
      echo "credentials not found in native keychain"; exit 1
    fi ;;
  store)
    host=$(printf '%s' "$first" | sed 's/.*"ServerURL": *"\\([^"]*\\)".*/\\1/')
    printf '%s' "$first" > "$dir/$(echo "$host" | tr '/:' '__')"
    echo "$first" >> "$dir/log" ;;
  erase)
    rm -f "$dir/$(echo "$first" | tr '/:' '__')"; echo "erase $first" >> "$dir/log" ;;
esac
"""


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Isolated KITOPS_HOME and DOCKER_CONFIG, and a PATH holding only the fake helper."""
    home = tmp_path / "kitops"
    monkeypatch.setenv("KITOPS_HOME", str(home))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-fake"
    helper.write_text(HELPER)
    helper.chmod(0o755)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    monkeypatch.setenv("FAKE_HELPER_DIR", str(secrets))
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return home


def test_kitops_home_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KITOPS_HOME", "/k")
    monkeypatch.setenv("XDG_DATA_HOME", "/xdg")
    assert kitops_home("/override") == "/override"
    assert kitops_home() == "/k"
    monkeypatch.delenv("KITOPS_HOME")
    assert kitops_home() == "/xdg/kitops"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert kitops_home() == str(tmp_path / ".local" / "share" / "kitops")
    assert credentials_path("/h") == "/h/credentials.json"


def test_docker_hub_server_address() -> None:
    assert server_address("docker.io") == "https://index.docker.io/v1/"
    assert server_address("ghcr.io") == "ghcr.io"


async def test_save_lookup_remove_roundtrip(env: Path) -> None:
    env.mkdir()
    path = env / "credentials.json"
    path.write_text(
        json.dumps(
            {
                "auths": {"other.io": {"auth": base64.b64encode(b"o:p").decode()}},
                "HttpHeaders": {"X-Keep": "me"},
            }
        )
    )
    save_login("localhost:5000", "alice", "pa:ss")
    data = json.loads(path.read_text())
    assert data["auths"]["localhost:5000"] == {"auth": base64.b64encode(b"alice:pa:ss").decode()}
    assert data["auths"]["other.io"]["auth"] == base64.b64encode(b"o:p").decode()
    assert data["HttpHeaders"] == {"X-Keep": "me"}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in env.iterdir()] == ["credentials.json"]  # no temp file left
    assert await lookup_credential("localhost:5000") == Credential("alice", "pa:ss")
    assert remove_login("localhost:5000") is True
    assert remove_login("localhost:5000") is False
    assert await lookup_credential("localhost:5000") is None
    assert "other.io" in json.loads(path.read_text())["auths"]


async def test_token_login_stored_as_identity_token(env: Path) -> None:
    save_login("ghcr.io", "", "refresh-123", str(env))
    data = json.loads((env / "credentials.json").read_text())
    assert data["auths"]["ghcr.io"] == {"identitytoken": "refresh-123"}
    assert await lookup_credential("ghcr.io", str(env)) == Credential(identity_token="refresh-123")


async def test_legacy_url_keys_and_docker_fallback(env: Path, tmp_path: Path) -> None:
    docker = tmp_path / "docker"
    docker.mkdir()
    (docker / "config.json").write_text(
        json.dumps(
            {
                "auths": {
                    "https://quay.io/v1/": {"auth": base64.b64encode(b"d:q").decode()},
                    "https://index.docker.io/v1/": {"username": "hub", "password": "h"},
                }
            }
        )
    )
    assert await lookup_credential("quay.io") == Credential("d", "q")
    assert await lookup_credential("docker.io") == Credential("hub", "h")
    save_login("quay.io", "kit", "k")  # kit's own file wins over Docker's
    assert await lookup_credential("quay.io") == Credential("kit", "k")
    assert await lookup_credential("nowhere.io") is None


async def test_creds_store_helper(env: Path, tmp_path: Path) -> None:
    env.mkdir()
    (env / "credentials.json").write_text(json.dumps({"credsStore": "fake"}))
    save_login("reg.example:5000", "helper-user", "helper-pw")
    # nothing in the file: the helper holds it
    assert json.loads((env / "credentials.json").read_text()) == {"credsStore": "fake"}
    log = (tmp_path / "secrets" / "log").read_text()
    assert json.loads(log.splitlines()[0]) == {
        "ServerURL": "reg.example:5000",
        "Username": "helper-user",
        "Secret": "helper-pw",
    }
    assert await lookup_credential("reg.example:5000") == Credential("helper-user", "helper-pw")
    assert await lookup_credential("unknown.example") is None
    assert remove_login("reg.example:5000") is True
    assert await lookup_credential("reg.example:5000") is None


async def test_cred_helpers_per_registry_and_token_user(env: Path, tmp_path: Path) -> None:
    env.mkdir()
    (env / "credentials.json").write_text(
        json.dumps(
            {
                "credHelpers": {"tok.example": "fake"},
                "auths": {"plain.example": {"auth": base64.b64encode(b"p:q").decode()}},
            }
        )
    )
    (tmp_path / "secrets" / "tok.example").write_text(
        json.dumps({"ServerURL": "tok.example", "Username": "<token>", "Secret": "rt"})
    )
    assert await lookup_credential("tok.example") == Credential(identity_token="rt")
    assert await lookup_credential("plain.example") == Credential("p", "q")


async def test_broken_helper_and_file(env: Path) -> None:
    env.mkdir()
    (env / "credentials.json").write_text(json.dumps({"credsStore": "missing"}))
    assert await lookup_credential("x.example") is None  # a missing helper is skipped
    (env / "credentials.json").write_text("{not json")
    with pytest.raises(LocalStorageError, match="not valid JSON"):
        await lookup_credential("x.example")


async def test_login_saves_only_after_registry_accepts(env: Path) -> None:
    fake = FakeRegistry()
    fake.auth = "bearer"
    fake.users = {"alice": "pw"}
    options = ClientOptions(kitops_home=str(env), retry_budget=0.5)
    with pytest.raises(AuthError, match=f"wrong username or password for {REGISTRY}"):
        await login(REGISTRY, "alice", "bad", options, transport=fake.transport())
    assert not (env / "credentials.json").exists()
    await login(REGISTRY, "alice", "pw", options, transport=fake.transport())
    assert await lookup_credential(REGISTRY, str(env)) == Credential("alice", "pw")
    fake.auth = "basic"
    with pytest.raises(AuthError, match="wrong username or password"):
        await login(REGISTRY, "alice", "worse", options, transport=fake.transport())
    assert await lookup_credential(REGISTRY, str(env)) == Credential("alice", "pw")
