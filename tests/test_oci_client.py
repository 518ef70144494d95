"""RegistryClient against the in-process fake registry: protocol, auth and faults."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import httpx
import pytest
import trio
from fakeregistry import AUTH, REGISTRY, STORAGE, FakeRegistry, Fault, sha

from kitfs.errors import (
    AuthError,
    IntegrityError,
    NotFoundError,
    RegistryError,
    UnreachableError,
)
from kitfs.oci import client as client_module
from kitfs.oci.client import (
    OCI_INDEX,
    OCI_MANIFEST,
    ClientOptions,
    RegistryClient,
)

MODELKIT_ARTIFACT = "application/vnd.kitops.modelkit.manifest.v1+json"
MODELKIT_CONFIG = "application/vnd.kitops.modelkit.config.v1+json"
BLOB = bytes(range(256)) * 4096  # 1 MiB, every offset distinguishable mod 256


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "kitops"
    home.mkdir()
    monkeypatch.setenv("KITOPS_HOME", str(home))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    return home


@pytest.fixture
def fake() -> FakeRegistry:
    return FakeRegistry()


def opts(home: Path, **kw: float) -> ClientOptions:
    return ClientOptions(
        kitops_home=str(home), retry_budget=kw.pop("retry_budget", 2.0), connect_retry=0.3, **kw
    )  # type: ignore[arg-type]


def client(fake: FakeRegistry, home: Path, **kw: float) -> RegistryClient:
    return RegistryClient(REGISTRY, opts(home, **kw), transport=fake.transport())


def write_creds(home: Path, user: str, password: str, host: str = REGISTRY) -> None:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (home / "credentials.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))


def manifest(config_digest: str, layers: list[str], artifact: bool = True) -> bytes:
    body: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": MODELKIT_CONFIG, "digest": config_digest, "size": 2},
        "layers": [
            {"mediaType": "application/vnd.kitops.modelkit.model.v1.tar", "digest": d, "size": 1}
            for d in layers
        ],
    }
    if artifact:
        body["artifactType"] = MODELKIT_ARTIFACT
    return json.dumps(body).encode()


# -- manifests -------------------------------------------------------------------


async def test_get_manifest_by_tag_and_digest(fake: FakeRegistry, home: Path) -> None:
    body = manifest(sha(b"{}"), [])
    digest = fake.add_manifest("org/kit", body, OCI_MANIFEST, "v1")
    async with client(fake, home) as c:
        assert await c.get_manifest("org/kit", "v1") == (body, OCI_MANIFEST, digest)
        assert await c.get_manifest("org/kit", digest) == (body, OCI_MANIFEST, digest)
    accept = fake.requests[0].headers["accept"]
    assert OCI_MANIFEST in accept and OCI_INDEX in accept
    assert "application/vnd.docker.distribution.manifest.v2+json" in accept


async def test_manifest_not_matching_requested_digest(fake: FakeRegistry, home: Path) -> None:
    body = manifest(sha(b"{}"), [])
    wrong = sha(b"something else")
    fake.manifests["org/kit"] = {wrong: (body, OCI_MANIFEST)}
    async with client(fake, home) as c:
        with pytest.raises(IntegrityError, match="does not match"):
            await c.get_manifest("org/kit", wrong)


async def test_manifest_missing_names_registry_and_ref(fake: FakeRegistry, home: Path) -> None:
    async with client(fake, home) as c:
        with pytest.raises(NotFoundError) as err:
            await c.get_manifest("org/kit", "nope")
    message = str(err.value)
    assert f"{REGISTRY}/org/kit:nope" in message and "MANIFEST_UNKNOWN" in message
    assert "\n" not in message


async def test_manifest_media_type_from_body_when_header_generic(
    fake: FakeRegistry, home: Path
) -> None:
    old_kit = json.dumps({"schemaVersion": 2, "config": {}, "layers": []}).encode()
    fake.add_manifest("org/kit", old_kit, "application/json", "old")
    async with client(fake, home) as c:
        _, media_type, _ = await c.get_manifest("org/kit", "old")
    assert media_type == OCI_MANIFEST


async def test_resolve_modelkit_by_artifact_type(fake: FakeRegistry, home: Path) -> None:
    kit = manifest(sha(b"{}"), [])
    kit_digest = fake.add_manifest("org/kit", kit, OCI_MANIFEST, None)
    other = json.dumps({"schemaVersion": 2, "config": {"mediaType": "x"}}).encode()
    other_digest = fake.add_manifest("org/kit", other, OCI_MANIFEST, None)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": other_digest, "size": len(other)},
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": kit_digest,
                    "size": len(kit),
                    "artifactType": MODELKIT_ARTIFACT,
                },
            ],
        }
    ).encode()
    fake.add_manifest("org/kit", index, OCI_INDEX, "latest")
    async with client(fake, home) as c:
        assert await c.resolve_modelkit("org/kit", "latest") == (kit, OCI_MANIFEST, kit_digest)
    # chosen from the descriptor alone: the other child was never fetched
    assert fake.count("GET", other_digest) == 0


async def test_resolve_modelkit_by_fetching_children(fake: FakeRegistry, home: Path) -> None:
    kit = manifest(sha(b"{}"), [], artifact=False)
    kit_digest = fake.add_manifest("org/kit", kit, OCI_MANIFEST, None)
    image = json.dumps(
        {"schemaVersion": 2, "config": {"mediaType": "application/vnd.oci.image.config.v1+json"}}
    ).encode()
    image_digest = fake.add_manifest("org/kit", image, OCI_MANIFEST, None)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": image_digest, "size": len(image)},
                {"mediaType": OCI_MANIFEST, "digest": kit_digest, "size": len(kit)},
            ],
        }
    ).encode()
    fake.add_manifest("org/kit", index, OCI_INDEX, "latest")
    only_image = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": image_digest, "size": len(image)}],
        }
    ).encode()
    fake.add_manifest("org/kit", only_image, OCI_INDEX, "image")
    async with client(fake, home) as c:
        assert await c.resolve_modelkit("org/kit", "latest") == (kit, OCI_MANIFEST, kit_digest)
        with pytest.raises(NotFoundError, match="no ModelKit manifest"):
            await c.resolve_modelkit("org/kit", "image")
        plain = await c.resolve_modelkit("org/kit", kit_digest)
    assert plain[2] == kit_digest


async def test_put_manifest_reports_digest_and_subject(fake: FakeRegistry, home: Path) -> None:
    fake.oci_subject = True
    body = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "subject": {"digest": sha(b"x")}}
    ).encode()
    async with client(fake, home) as c:
        digest, subject = await c.put_manifest("org/kit", "v2", body, OCI_MANIFEST)
        assert (digest, subject) == (sha(body), True)
        fake.oci_subject = False
        assert await c.put_manifest("org/kit", "v3", body, OCI_MANIFEST) == (sha(body), False)
    assert fake.tags["org/kit"]["v2"] == sha(body)
    put = next(r for r in fake.requests if r.method == "PUT")
    assert put.headers["content-type"] == OCI_MANIFEST


# -- auth ------------------------------------------------------------------------


async def test_bearer_challenge_then_cached_token(fake: FakeRegistry, home: Path) -> None:
    fake.auth = "bearer"
    fake.users = {"alice": "pw"}
    write_creds(home, "alice", "pw")
    digest = fake.add_blob("org/kit", BLOB)
    async with client(fake, home) as c:
        assert await c.head_blob("org/kit", digest) == len(BLOB)
        assert await c.head_blob("org/kit", digest) == len(BLOB)
        assert await c.get_blob("org/kit", digest) == BLOB
    tokens = [r for r in fake.requests if r.host == AUTH]
    assert len(tokens) == 1  # one token for the pull scope, reused
    assert tokens[0].headers["authorization"] == "Basic " + base64.b64encode(b"alice:pw").decode()
    assert tokens[0].url.params.get_list("scope") == ["repository:org/kit:pull"]
    assert tokens[0].url.params["service"] == REGISTRY
    assert tokens[0].headers["user-agent"].startswith("kitfs/")
    statuses = [r.status for r in fake.requests if r.host == REGISTRY]
    assert statuses == [401, 200, 200, 200]


async def test_push_scope_gets_its_own_token(fake: FakeRegistry, home: Path) -> None:
    fake.auth = "bearer"
    fake.users = {"alice": "pw"}
    write_creds(home, "alice", "pw")
    async with client(fake, home) as c:
        assert await c.push_blob_bytes("org/kit", sha(b"{}"), b"{}") is True
    scopes = [r.url.params.get_list("scope") for r in fake.requests if r.host == AUTH]
    assert ["repository:org/kit:pull,push"] in scopes
    assert fake.blobs["org/kit"][sha(b"{}")] == b"{}"


async def test_revoked_token_refetched_once(fake: FakeRegistry, home: Path) -> None:
    fake.auth = "bearer"
    fake.anonymous_pull = True
    digest = fake.add_blob("org/kit", b"abc")
    async with client(fake, home) as c:
        await c.head_blob("org/kit", digest)
        fake.expired_tokens.update(t for t, _ in fake.issued_tokens)
        assert await c.head_blob("org/kit", digest) == 3
        assert len(fake.issued_tokens) == 2
        # a registry that rejects every token: exactly one retry, then AuthError
        fake.hook = lambda r: (
            httpx.Response(401, headers={"WWW-Authenticate": f'Bearer realm="https://{AUTH}/t"'})
            if r.url.host == REGISTRY
            else None
        )
        before = len(fake.requests)
        with pytest.raises(AuthError, match="access denied"):
            await c.head_blob("org/kit", digest)
        assert len(fake.requests) - before == 3  # request, token, one retry


async def test_token_refreshed_before_expiry(
    fake: FakeRegistry, home: Path, autojump_clock: trio.abc.Clock
) -> None:
    fake.auth = "bearer"
    fake.anonymous_pull = True
    fake.token_lifetime = 60
    digest = fake.add_blob("org/kit", b"abc")
    async with client(fake, home) as c:
        await c.head_blob("org/kit", digest)
        await trio.sleep(59)  # inside the refresh margin
        await c.head_blob("org/kit", digest)
    assert len(fake.issued_tokens) == 2
    # the refresh happened up front: no second 401
    assert [r.status for r in fake.requests if r.host == REGISTRY] == [401, 200, 200]


async def test_basic_auth(fake: FakeRegistry, home: Path) -> None:
    fake.auth = "basic"
    fake.users = {"bob": "secret"}
    fake.add_manifest("org/kit", b"{}", OCI_MANIFEST, "v1")
    async with client(fake, home) as c:
        with pytest.raises(AuthError, match=r"kit login registry\.test"):
            await c.get_manifest("org/kit", "v1")
    write_creds(home, "bob", "wrong")
    async with client(fake, home) as c:
        with pytest.raises(AuthError, match=r"wrong username or password for registry\.test"):
            await c.get_manifest("org/kit", "v1")
    write_creds(home, "bob", "secret")
    async with client(fake, home) as c:
        await c.get_manifest("org/kit", "v1")
        await c.get_manifest("org/kit", "v1")
    # after learning the scheme, Basic goes up front: one 401 in total
    last = fake.requests[-3:]
    assert [r.status for r in last] == [401, 200, 200]
    assert last[2].headers["authorization"].startswith("Basic ")


async def test_bearer_wrong_password(fake: FakeRegistry, home: Path) -> None:
    fake.auth = "bearer"
    fake.users = {"alice": "pw"}
    write_creds(home, "alice", "nope")
    async with client(fake, home) as c:
        with pytest.raises(AuthError, match=r"wrong username or password for registry\.test"):
            await c.ping()


# -- retries ---------------------------------------------------------------------


async def test_429_honours_retry_after(
    fake: FakeRegistry, home: Path, autojump_clock: trio.abc.Clock
) -> None:
    fake.add_manifest("org/kit", b"{}", OCI_MANIFEST, "v1")
    fake.faults.append(Fault("GET", "/manifests/", 429, headers={"Retry-After": "3"}))
    async with client(fake, home, retry_budget=10) as c:
        start = trio.current_time()
        await c.get_manifest("org/kit", "v1")
        assert trio.current_time() - start >= 3
    assert [r.status for r in fake.requests] == [429, 200]


async def test_429_retry_after_beyond_budget_gives_up(fake: FakeRegistry, home: Path) -> None:
    fake.faults.append(Fault("GET", "/manifests/", 429, headers={"Retry-After": "120"}))
    async with client(fake, home, retry_budget=5) as c:
        with trio.fail_after(2):
            with pytest.raises(RegistryError, match=r"rate limited by registry\.test"):
                await c.get_manifest("org/kit", "v1")


async def test_503_then_success(fake: FakeRegistry, home: Path) -> None:
    digest = fake.add_blob("org/kit", BLOB)
    fake.faults.append(Fault("GET", "/blobs/", 503, times=2))
    async with client(fake, home) as c:
        assert await c.get_blob("org/kit", digest) == BLOB
    assert [r.status for r in fake.requests] == [503, 503, 200]


async def test_5xx_forever_stops_within_budget(fake: FakeRegistry, home: Path) -> None:
    fake.faults.append(Fault("GET", "/manifests/", 500, times=1000))
    async with client(fake, home, retry_budget=0.5) as c:
        with trio.fail_after(3):
            with pytest.raises(RegistryError, match=r"HTTP 500.*after retrying \d+ times"):
                await c.get_manifest("org/kit", "v1")
    assert 2 <= len(fake.requests) < 20


async def test_5xx_retried_for_a_few_seconds_then_named(
    fake: FakeRegistry, home: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A registry failing every attempt is reported by its answer within the server-error
    window (at most half the budget), not retried until the budget, or a reader, runs out."""
    digest = fake.add_blob("org/kit", BLOB)
    fake.faults.append(Fault("GET", "/blobs/", 502, times=10**6))
    async with client(fake, home, retry_budget=30, server_error_retry=4) as c:
        start = trio.current_time()
        with pytest.raises(RegistryError) as err:
            await c.read_range("org/kit", digest, 0, 10)
        assert 3 <= trio.current_time() - start <= 4.5
    assert "registry.test answered HTTP 502 Bad Gateway" in str(err.value)
    assert "reading bytes 0-9 of blob" in str(err.value) and "after retrying" in str(err.value)
    fake.requests.clear()
    async with client(fake, home, retry_budget=3, server_error_retry=10) as c:
        start = trio.current_time()
        with pytest.raises(RegistryError, match="HTTP 502"):
            await c.read_range("org/kit", digest, 0, 10)
        assert trio.current_time() - start <= 1.6


async def test_retries_end_before_the_callers_deadline(
    fake: FakeRegistry, home: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Within a caller's deadline (a reader's bound), the last retry leaves time for its
    answer: the caller hears the registry's, not its own timeout."""
    fake.faults.append(Fault("GET", "/manifests/", 429, times=10**6))
    async with client(fake, home, retry_budget=60) as c:
        with trio.fail_after(10), pytest.raises(RegistryError, match="rate limited"):
            await c.get_manifest("org/kit", "v1")
        assert trio.current_time() < 10


async def test_connection_errors_retried_then_unreachable(fake: FakeRegistry, home: Path) -> None:
    digest = fake.add_blob("org/kit", b"abc")
    fake.faults.append(Fault("*", "", 0, times=2, exception=httpx.ConnectError("refused")))
    async with client(fake, home) as c:
        assert await c.head_blob("org/kit", digest) == 3
        fake.faults.append(Fault("*", "", 0, times=10**6, exception=httpx.ConnectError("refused")))
        with trio.fail_after(3):
            with pytest.raises(UnreachableError) as err:
                await c.head_blob("org/kit", digest)
    assert "registry.test" in str(err.value) and "refused" in str(err.value)


async def test_read_error_never_leaks_httpx(fake: FakeRegistry, home: Path) -> None:
    fake.faults.append(Fault("*", "", 0, times=10**6, exception=httpx.ReadError("reset")))
    async with client(fake, home, retry_budget=0.2) as c:
        with pytest.raises(UnreachableError, match=r"connection to registry\.test lost"):
            await c.list_tags("org/kit")


# -- blobs -----------------------------------------------------------------------


async def test_redirect_drops_authorization_and_is_cached(fake: FakeRegistry, home: Path) -> None:
    fake.auth = "bearer"
    fake.users = {"alice": "pw"}
    write_creds(home, "alice", "pw")
    fake.redirect_blobs = True
    digest = fake.add_blob("org/kit", BLOB)
    async with client(fake, home) as c:
        assert await c.read_range("org/kit", digest, 10, 100) == BLOB[10:110]
        assert await c.read_range("org/kit", digest, 5000, 7) == BLOB[5000:5007]
        async with c.stream_blob("org/kit", digest) as chunks:
            assert b"".join([x async for x in chunks]) == BLOB
    storage = [r for r in fake.requests if r.host == STORAGE]
    assert len(storage) == 3
    assert all("authorization" not in r.headers for r in storage)
    registry_gets = [r for r in fake.requests if r.host == REGISTRY and r.method == "GET"]
    assert registry_gets[-1].headers["authorization"].startswith("Bearer ")
    # later reads went straight to the cached storage URL
    assert fake.count("GET", "/blobs/", host=REGISTRY) == 2  # the 401 and the 307


async def test_expired_storage_url_is_re_resolved(fake: FakeRegistry, home: Path) -> None:
    fake.redirect_blobs = True
    digest = fake.add_blob("org/kit", BLOB)
    async with client(fake, home) as c:
        await c.read_range("org/kit", digest, 0, 10)
        fake.faults.append(Fault("GET", "/bucket/", 403))
        assert await c.read_range("org/kit", digest, 20, 10) == BLOB[20:30]
    assert fake.count("GET", "/blobs/", host=REGISTRY) == 2


async def test_registry_ignoring_range(fake: FakeRegistry, home: Path) -> None:
    fake.honor_range = False
    digest = fake.add_blob("org/kit", BLOB)
    async with client(fake, home) as c:
        assert await c.read_range("org/kit", digest, 300_000, 70_000) == BLOB[300_000:370_000]
        assert await c.read_range("org/kit", digest, len(BLOB) - 1, 1) == BLOB[-1:]
    assert fake.requests[0].headers["range"] == "bytes=300000-369999"
    assert fake.requests[0].status == 200


async def test_range_request_uses_206(fake: FakeRegistry, home: Path) -> None:
    digest = fake.add_blob("org/kit", BLOB)
    async with client(fake, home) as c:
        assert await c.read_range("org/kit", digest, 1, 3) == BLOB[1:4]
        assert await c.read_range("org/kit", digest, 7, 0) == b""
        with pytest.raises(RegistryError, match="past the end"):
            await c.read_range("org/kit", digest, len(BLOB) - 2, 10)
        with pytest.raises(RegistryError, match="416"):
            await c.read_range("org/kit", digest, len(BLOB) + 5, 10)
    assert fake.requests[0].status == 206
    assert fake.requests[0].headers["accept-encoding"] == "identity"


async def test_truncated_body_is_resumed(fake: FakeRegistry, home: Path) -> None:
    digest = fake.add_blob("org/kit", BLOB)
    fake.truncate_blobs = 1
    fake.truncate_to = 1000
    async with client(fake, home) as c, c.stream_blob("org/kit", digest) as chunks:
        assert b"".join([x async for x in chunks]) == BLOB
    assert [r.headers.get("range") for r in fake.requests] == [None, "bytes=1000-"]


async def test_truncated_forever_is_an_error_never_short_data(
    fake: FakeRegistry, home: Path
) -> None:
    digest = fake.add_blob("org/kit", BLOB)
    fake.truncate_blobs = 10**6
    fake.truncate_to = 10
    async with client(fake, home, retry_budget=0.3) as c:
        # a connection that keeps dropping is the network, not a lie (a lie poisons a
        # layer until remount)
        with pytest.raises(UnreachableError, match="truncated"):
            await c.read_range("org/kit", digest, 0, 5000)
        fake.honor_range = False
        with pytest.raises(UnreachableError, match="truncated"):
            await c.get_blob("org/kit", digest)


async def test_corrupt_body(fake: FakeRegistry, home: Path) -> None:
    digest = fake.add_blob("org/kit", BLOB)
    fake.corrupt_blobs = True
    async with client(fake, home) as c:
        with pytest.raises(IntegrityError, match="does not match its digest"):
            await c.get_blob("org/kit", digest)
        received = 0
        with pytest.raises(IntegrityError):
            async with c.stream_blob("org/kit", digest) as chunks:
                async for chunk in chunks:
                    received += len(chunk)
        assert received == len(BLOB)  # the error comes at the end, after every byte


async def test_big_stream_verified_in_thread(fake: FakeRegistry, home: Path) -> None:
    data = os.urandom(20 << 20)
    digest = fake.add_blob("org/kit", data)
    async with client(fake, home) as c:
        async with c.stream_blob("org/kit", digest) as chunks:
            assert sum([len(x) async for x in chunks]) == len(data)
        fake.corrupt_blobs = True
        with pytest.raises(IntegrityError):
            async with c.stream_blob("org/kit", digest) as chunks:
                async for _ in chunks:
                    pass


async def test_get_blob_size_limit(fake: FakeRegistry, home: Path) -> None:
    digest = fake.add_blob("org/kit", BLOB)
    async with client(fake, home) as c:
        with pytest.raises(RegistryError, match="more than"):
            await c.get_blob("org/kit", digest, max_size=1000)


async def test_head_blob(fake: FakeRegistry, home: Path) -> None:
    digest = fake.add_blob("org/kit", b"12345")
    async with client(fake, home) as c:
        assert await c.head_blob("org/kit", digest) == 5
        assert await c.head_blob("org/kit", sha(b"other")) is None


# -- uploads ---------------------------------------------------------------------


async def test_push_small_blob_monolithic(fake: FakeRegistry, home: Path, tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    path = tmp_path / "blob"
    path.write_bytes(data)
    progress: list[int] = []
    async with client(fake, home) as c:
        assert (
            await c.push_blob("org/kit", sha(data), len(data), str(path), progress=progress.append)
            is True
        )
        assert await c.push_blob("org/kit", sha(data), len(data), str(path)) is False
    assert fake.blobs["org/kit"][sha(data)] == data
    assert sum(progress) == len(data)
    assert [r.method for r in fake.requests] == ["HEAD", "POST", "PUT", "HEAD"]
    assert fake.requests[2].url.params["digest"] == sha(data)


async def test_push_big_blob_in_chunks(
    fake: FakeRegistry, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "MONOLITHIC_UPLOAD_LIMIT", 1 << 20)
    monkeypatch.setattr(client_module, "UPLOAD_CHUNK_SIZE", 1 << 20)
    data = os.urandom((3 << 20) + 12345)
    path = tmp_path / "blob"
    path.write_bytes(data)
    progress: list[int] = []
    fake.faults.append(Fault("PATCH", "/uploads/", 503))  # first chunk: resumed via status
    async with client(fake, home) as c:
        assert (
            await c.push_blob("org/kit", sha(data), len(data), str(path), progress=progress.append)
            is True
        )
    assert fake.blobs["org/kit"][sha(data)] == data
    assert sum(progress) == len(data)
    patches = [r for r in fake.requests if r.method == "PATCH"]
    ranges = [r.headers["content-range"] for r in patches if r.status == 202]
    mib = 1 << 20
    assert ranges == [
        f"0-{mib - 1}",
        f"{mib}-{2 * mib - 1}",
        f"{2 * mib}-{3 * mib - 1}",
        f"{3 * mib}-{len(data) - 1}",
    ]
    assert fake.count("GET", "/uploads/") == 1
    final = fake.requests[-1]
    assert final.method == "PUT" and final.headers["content-length"] == "0"


async def test_push_blob_mount(fake: FakeRegistry, home: Path, tmp_path: Path) -> None:
    data = b"shared layer"
    digest = fake.add_blob("org/base", data)
    path = tmp_path / "blob"
    path.write_bytes(data)
    async with client(fake, home) as c:
        assert (
            await c.push_blob("org/kit", digest, len(data), str(path), mount_from="org/base")
            is False
        )
    post = next(r for r in fake.requests if r.method == "POST")
    assert post.url.params["mount"] == digest and post.url.params["from"] == "org/base"
    assert fake.count("PUT") == 0 and fake.blobs["org/kit"][digest] == data


async def test_push_rejects_wrong_digest(fake: FakeRegistry, home: Path, tmp_path: Path) -> None:
    async with client(fake, home) as c:
        with pytest.raises(IntegrityError):
            await c.push_blob_bytes("org/kit", sha(b"a"), b"b")
        assert fake.requests == []
        path = tmp_path / "blob"
        path.write_bytes(b"b")
        with pytest.raises(IntegrityError, match="rejected the upload"):
            await c.push_blob("org/kit", sha(b"a"), 1, str(path))


# -- listing ---------------------------------------------------------------------


async def test_list_tags_follows_link_pagination(fake: FakeRegistry, home: Path) -> None:
    for tag in ["a", "b", "c", "d", "e"]:
        fake.add_manifest("org/kit", tag.encode(), OCI_MANIFEST, tag)
    fake.tag_page_size = 2
    async with client(fake, home) as c:
        assert await c.list_tags("org/kit") == ["a", "b", "c", "d", "e"]
        with pytest.raises(NotFoundError):
            await c.list_tags("org/missing")
    assert fake.count("GET", "/tags/list") == 4


async def test_referrers_api_and_tag_fallback(fake: FakeRegistry, home: Path) -> None:
    subject = fake.add_manifest("org/kit", manifest(sha(b"{}"), []), OCI_MANIFEST, "v1")
    sig = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "sig",
            "subject": {"digest": subject},
        }
    ).encode()
    att = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "att",
            "subject": {"digest": subject},
        }
    ).encode()
    fake.add_manifest("org/kit", sig, OCI_MANIFEST, None)
    fake.add_manifest("org/kit", att, OCI_MANIFEST, None)
    async with client(fake, home) as c:
        assert {d["artifactType"] for d in await c.referrers("org/kit", subject)} == {"sig", "att"}
        only = await c.referrers("org/kit", subject, "sig")
        assert [d["digest"] for d in only] == [sha(sig)]
        fake.referrers_api = False
        assert await c.referrers("org/kit", subject) == []
        index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    {
                        "mediaType": OCI_MANIFEST,
                        "digest": sha(sig),
                        "size": len(sig),
                        "artifactType": "sig",
                    }
                ],
            }
        ).encode()
        fake.add_manifest("org/kit", index, OCI_INDEX, subject.replace(":", "-"))
        assert [d["digest"] for d in await c.referrers("org/kit", subject, "sig")] == [sha(sig)]
        assert await c.referrers("org/kit", subject, "att") == []
