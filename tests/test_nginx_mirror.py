"""deploy/mirror/nginx.conf, run by the real nginx in front of a real registry.

The shipped file, rendered only for ports and paths, serves a ModelKit to
kitfs byte for byte; a second node (another cache) reading it costs the
origin no blob byte; ranges come back 206 with the right bytes and a plain
GET 200 with the whole blob; manifests are never cached. Behind an origin
that redirects blob reads to storage (as Distribution on S3 does), the
mirror follows the redirect itself, sends the storage no credentials, and
caches what it got.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nginxmirror import NGINX, Nginx, render, start_mirror, start_nginx

from helpers import kitfs, make_project, ok, source_files
from registry import RegistryServer, free_port, start_registry

MiB = 1 << 20
SLICE = 8 * MiB
MANIFEST_TYPES = "application/vnd.oci.image.manifest.v1+json"


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is what a test looks for: shown, never followed."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())


def redirecting_origin(registry: RegistryServer, state: Path) -> Nginx:
    """An origin that answers blob GETs with 307 to "object storage" (a second server
    serving the registry's own blob files, with ranges), as Distribution on S3 does; the
    storage refuses any request carrying an Authorization header."""
    port, storage = free_port(), free_port()
    blobs = registry.root / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256"
    config = f"""
user root;
worker_processes 1;
pid {state}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {state}/cb; proxy_temp_path {state}/pt; fastcgi_temp_path {state}/ft;
    uwsgi_temp_path {state}/ut; scgi_temp_path {state}/st;
    log_format bytes '"$request" $status $body_bytes_sent range="$http_range"';
    server {{
        listen 127.0.0.1:{port};
        location ~ "^/v2/.+/blobs/sha256:(?<hex>[0-9a-f]{{64}})$" {{
            if ($request_method = GET) {{
                return 307 http://127.0.0.1:{storage}/bucket/$hex?signature=s1gn3d;
            }}
            proxy_pass {registry.url};
        }}
        location / {{ proxy_pass {registry.url}; }}
    }}
    server {{
        listen 127.0.0.1:{storage};
        access_log {state}/storage.log bytes;
        location ~ "^/bucket/(?<a>[0-9a-f]{{2}})(?<b>[0-9a-f]{{62}})$" {{
            if ($http_authorization) {{ return 400; }}
            if ($arg_signature != "s1gn3d") {{ return 403; }}
            alias {blobs}/$a/$a$b/data;
        }}
    }}
}}
"""
    return start_nginx(config, state, f"127.0.0.1:{port}")


@dataclass
class Kit:
    repo: str
    files: dict[str, str]
    blobs: dict[str, int]  # layer digest -> size


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    server = start_registry(tmp_path_factory.mktemp("origin"), access_log=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def kit(origin: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> Kit:
    """A ModelKit whose weights span several slices, packed straight to the origin."""
    root = tmp_path_factory.mktemp("mirror-kit")
    project = make_project(root / "proj", weight_bytes=3 * SLICE + 12345)
    home = root / "home"
    home.mkdir()
    repo = "mirror/tiny"
    ok(kitfs("pack", str(project), "-t", f"{origin.host}/{repo}:v1", home=home))
    manifest = _DIRECT.open(urllib.request.Request(
        f"{origin.url}/v2/{repo}/manifests/v1", headers={"Accept": MANIFEST_TYPES})).read()
    layers = json.loads(manifest)["layers"]
    return Kit(repo, source_files(project), {d["digest"]: d["size"] for d in layers})


@pytest.fixture(scope="module")
def mirror(origin: RegistryServer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    server = start_mirror(origin.url, tmp_path_factory.mktemp("mirror"))
    try:
        yield server
    finally:
        server.stop()


def blob_url(base: str, repo: str, digest: str) -> str:
    return f"{base}/v2/{repo}/blobs/{digest}"


def get(url: str, headers: dict[str, str] | None = None,
        method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    try:
        with _DIRECT.open(urllib.request.Request(url, headers=headers or {},
                                                 method=method)) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def the_blob(origin: RegistryServer, repo: str, digest: str) -> bytes:
    """The blob as the origin stores it, read from its disk: no request it would count."""
    hexpart = digest.removeprefix("sha256:")
    return (origin.root / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256"
            / hexpart[:2] / hexpart / "data").read_bytes()


def biggest(kit: Kit) -> str:
    return max(kit.blobs, key=lambda d: kit.blobs[d])


def read_tree(root: Path, files: dict[str, str]) -> dict[str, str]:
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in files}


def read_through(ref: str, tmp: Path, cache: Path, files: dict[str, str]) -> None:
    """One node: mount `ref` (the mirror as its registry) with its own cache, read it all."""
    mnt = tmp / f"mnt-{cache.name}"
    mnt.mkdir()
    proc = kitfs("mount", ref, str(mnt), "--cache-dir", str(cache), "--plain-http",
                 "--prefetch", "none")
    assert proc.returncode == 0, proc.stderr
    try:
        assert read_tree(mnt, files) == files
    finally:
        kitfs("umount", str(mnt))


def origin_blob_bytes(origin: RegistryServer, since: int, kit: Kit) -> int:
    served = origin.served(since).by_blob
    return sum(served.get(d, 0) for d in kit.blobs)


# -- tests ------------------------------------------------------------------------------


def test_debian_nginx_has_the_slice_module_and_the_config_parses(tmp_path: Path) -> None:
    built = subprocess.run([NGINX, "-V"], capture_output=True, text=True).stderr
    assert "--with-http_slice_module" in built
    assert "--without-http_proxy_module" not in built
    state = tmp_path / "state"
    state.mkdir()
    conf = state / "nginx.conf"
    # https, as most origins are (no DNS here: an address)
    conf.write_text(render("https://127.0.0.1:5443", state, free_port()))
    check = subprocess.run([NGINX, "-t", "-p", str(state), "-c", str(conf), "-e",
                            str(state / "error.log")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_ranges_are_206_with_the_right_bytes_and_a_plain_get_200(
        origin: RegistryServer, mirror: Nginx, kit: Kit) -> None:
    digest = biggest(kit)
    blob = the_blob(origin, kit.repo, digest)
    url = blob_url(mirror.url, kit.repo, digest)
    for start, end in [(0, 99), (SLICE - 10, SLICE + 10), (123, 2 * SLICE + 5),
                       (len(blob) - 7, len(blob) - 1)]:
        status, headers, body = get(url, {"Range": f"bytes={start}-{end}"})
        assert status == 206
        assert headers["content-range"] == f"bytes {start}-{end}/{len(blob)}"
        assert body == blob[start:end + 1]
    status, headers, body = get(url, {"Range": f"bytes={len(blob) - 5}-"})
    assert status == 206 and body == blob[-5:]
    status, headers, body = get(url)
    assert status == 200 and "content-range" not in headers
    assert int(headers["content-length"]) == len(blob) and body == blob
    status, headers, body = get(url, method="HEAD")
    assert status == 200 and int(headers["content-length"]) == len(blob) and body == b""
    assert "cache=HIT" in mirror.settled()


def test_manifests_pass_through_uncached_and_unknown_blobs_are_404(
        origin: RegistryServer, mirror: Nginx, kit: Kit) -> None:
    url = f"{mirror.url}/v2/{kit.repo}/manifests/v1"
    first = get(url, {"Accept": MANIFEST_TYPES})
    second = get(url, {"Accept": MANIFEST_TYPES})
    assert first[0] == second[0] == 200 and first[2] == second[2]
    lines = [line for line in mirror.settled().splitlines() if "/manifests/v1" in line]
    assert len(lines) >= 2 and all("cache=-" in line for line in lines)
    missing = "sha256:" + "0" * 64
    assert get(blob_url(mirror.url, kit.repo, missing), {"Range": "bytes=0-9"})[0] == 404


def test_a_second_node_through_the_mirror_reads_no_blob_from_the_origin(
        origin: RegistryServer, kit: Kit, tmp_path: Path) -> None:
    mirror = start_mirror(origin.url, tmp_path / "mirror")  # its own: an empty cache
    try:
        _two_nodes(origin, mirror, kit, tmp_path)
    finally:
        mirror.stop()


def _two_nodes(origin: RegistryServer, mirror: Nginx, kit: Kit, tmp_path: Path) -> None:
    ref = f"{mirror.host}/{kit.repo}:v1"
    mark = origin.mark()
    read_through(ref, tmp_path, tmp_path / "node1", kit.files)
    first = origin_blob_bytes(origin, mark, kit)
    assert first >= sum(kit.blobs.values()) // 2  # the first node's reads did reach it
    mark = origin.mark()
    read_through(ref, tmp_path, tmp_path / "node2", kit.files)
    assert origin_blob_bytes(origin, mark, kit) == 0
    # The same blob through another repository name is the same cache entry.
    digest = biggest(kit)
    other = "mirror/other"
    mount = get(f"{origin.url}/v2/{other}/blobs/uploads/?mount={digest}&from={kit.repo}",
                method="POST")
    assert mount[0] == 201, mount
    expected = the_blob(origin, kit.repo, digest)[:1024]
    mark = origin.mark()
    status, _, body = get(blob_url(mirror.url, other, digest), {"Range": "bytes=0-1023"})
    assert status == 206 and body == expected
    assert origin.served(mark).by_blob.get(digest, 0) == 0


def test_redirects_to_storage_are_followed_inside_the_mirror_without_credentials(
        origin: RegistryServer, kit: Kit, tmp_path: Path) -> None:
    front = redirecting_origin(origin, tmp_path / "origin")
    try:
        # The origin does redirect: a client talking to it directly sees the 307.
        digest = biggest(kit)
        status, headers, _ = get(blob_url(front.url, kit.repo, digest))
        assert status == 307 and "/bucket/" in headers["location"]
        mirror = start_mirror(front.url, tmp_path / "mirror")
        try:
            blob = the_blob(origin, kit.repo, digest)
            url = blob_url(mirror.url, kit.repo, digest)
            status, headers, body = get(url, {"Range": f"bytes=5-{SLICE + 5}",
                                              "Authorization": "Bearer registry-token"})
            assert status == 206 and body == blob[5:SLICE + 6]
            assert "location" not in headers
            ref = f"{mirror.host}/{kit.repo}:v1"
            read_through(ref, tmp_path, tmp_path / "node1", kit.files)
            storage = front.settled("storage.log")
            assert storage and " 206 " in storage and " 400 " not in storage
            assert all('range="bytes=' in line for line in storage.splitlines())
            before = len(storage.splitlines())
            read_through(ref, tmp_path, tmp_path / "node2", kit.files)
            assert len(front.settled("storage.log").splitlines()) == before  # all from cache
        finally:
            mirror.stop()
    finally:
        front.stop()


def test_the_mirror_log_says_what_came_from_cache(mirror: Nginx, kit: Kit) -> None:
    """What an operator reads: one line per request with the cache status and the slice it
    was for (this test's own request: under xdist it may be the mirror's first)."""
    status, _, _ = get(blob_url(mirror.url, kit.repo, biggest(kit)), {"Range": "bytes=0-99"})
    assert status == 206
    lines = [line for line in mirror.settled().splitlines() if "/blobs/" in line]
    assert lines
    assert all(re.search(r'cache=(HIT|MISS|EXPIRED|UPDATING|STALE|-) slice="', line)
               for line in lines)


def test_credentials_pass_through_to_a_registry_that_wants_them(
        auth_registry: RegistryServer, tmp_path: Path) -> None:
    """The mirror authenticates nobody itself: the registry's challenge reaches the
    client, and the client's credentials reach the registry."""
    home = tmp_path / "home"
    home.mkdir()
    assert auth_registry.password is not None and auth_registry.username is not None
    ok(kitfs("login", auth_registry.host, "-u", auth_registry.username, "--password-stdin",
             home=home, stdin=auth_registry.password))
    project = make_project(tmp_path / "proj", weight_bytes=MiB)
    repo = "mirror/private"
    ok(kitfs("pack", str(project), "-t", f"{auth_registry.host}/{repo}:v1", home=home))
    mirror = start_mirror(auth_registry.url, tmp_path / "mirror")
    try:
        status, headers, _ = get(f"{mirror.url}/v2/{repo}/manifests/v1",
                                 {"Accept": MANIFEST_TYPES})
        assert status == 401 and "Basic" in headers.get("www-authenticate", "")
        ok(kitfs("login", mirror.host, "-u", auth_registry.username, "--password-stdin",
                 home=home, stdin=auth_registry.password))
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        proc = kitfs("mount", f"{mirror.host}/{repo}:v1", str(mnt), "--cache-dir",
                     str(tmp_path / "cache"), home=home)
        assert proc.returncode == 0, proc.stderr
        try:
            files = source_files(project)
            assert read_tree(mnt, files) == files
        finally:
            kitfs("umount", str(mnt))
    finally:
        mirror.stop()
