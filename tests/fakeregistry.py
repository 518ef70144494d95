"""An in-process fake OCI registry for httpx.MockTransport, with fault injection.

It implements just enough of the distribution API for kitfs (manifests, blobs
with ranges, uploads, mounts, tags with pagination, referrers, Basic and
Bearer auth) and lets a test make it misbehave the ways real registries and
object stores do: 401 challenges, 429 with Retry-After, 5xx, redirects to
another host, ignoring Range, truncated or corrupted bodies. Every request is
recorded so tests can assert on headers and counts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import httpx

REGISTRY = "registry.test"
STORAGE = "storage.test"
AUTH = "auth.test"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Recorded:
    method: str
    url: httpx.URL
    headers: httpx.Headers
    status: int

    @property
    def host(self) -> str:
        return self.url.host

    @property
    def path(self) -> str:
        return self.url.path


@dataclass
class Fault:
    """Answer the next `times` requests matching `method` and `path` (a regex) with `status`."""

    method: str
    path: str
    status: int
    times: int = 1
    headers: dict[str, str] = field(default_factory=dict)
    exception: Exception | None = None

    def matches(self, request: httpx.Request) -> bool:
        return (
            self.times > 0
            and (self.method == "*" or request.method == self.method)
            and re.search(self.path, request.url.path) is not None
        )


@dataclass
class Upload:
    repo: str
    data: bytearray = field(default_factory=bytearray)


class FakeRegistry:
    """State plus a request handler; `transport()` plugs it into RegistryClient."""

    def __init__(self, host: str = REGISTRY) -> None:
        self.host = host
        self.blobs: dict[str, dict[str, bytes]] = {}
        self.manifests: dict[str, dict[str, tuple[bytes, str]]] = {}
        self.tags: dict[str, dict[str, str]] = {}
        self.uploads: dict[str, Upload] = {}
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        # behaviour switches
        self.auth: str | None = None  # None, "basic" or "bearer"
        self.users: dict[str, str] = {}
        self.anonymous_pull = False  # basic: GET/HEAD need no auth; bearer: anonymous tokens
        self.token_lifetime = 300
        self.issued_tokens: list[tuple[str, list[str]]] = []
        self.expired_tokens: set[str] = set()
        self.redirect_blobs = False
        self.honor_range = True
        self.truncate_blobs = 0  # serve this many truncated blob bodies
        self.truncate_to = 100
        self.corrupt_blobs = False
        self.tag_page_size = 0  # 0: no pagination
        self.referrers_api = True
        self.oci_subject = False
        self.hook: Callable[[httpx.Request], httpx.Response | None] | None = None

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    # -- helpers for tests --------------------------------------------------------

    def add_blob(self, repo: str, data: bytes) -> str:
        digest = sha(data)
        self.blobs.setdefault(repo, {})[digest] = data
        return digest

    def add_manifest(self, repo: str, body: bytes, media_type: str, tag: str | None) -> str:
        digest = sha(body)
        self.manifests.setdefault(repo, {})[digest] = (body, media_type)
        if tag is not None:
            self.tags.setdefault(repo, {})[tag] = digest
        return digest

    def count(self, method: str | None = None, path: str = "", host: str | None = None) -> int:
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method)
            and path in r.path
            and (host is None or r.host == host)
        )

    # -- dispatch -----------------------------------------------------------------

    async def handle(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        response = self._dispatch(request)
        self.requests.append(
            Recorded(request.method, request.url, request.headers, response.status_code)
        )
        return response

    def _dispatch(self, request: httpx.Request) -> httpx.Response:
        for fault in self.faults:
            if fault.matches(request):
                fault.times -= 1
                if fault.exception is not None:
                    raise fault.exception
                return httpx.Response(fault.status, headers=fault.headers)
        if self.hook is not None:
            hooked = self.hook(request)
            if hooked is not None:
                return hooked
        host = request.url.host
        if host == AUTH:
            return self._token(request)
        if host == STORAGE:
            return self._storage(request)
        if host != self.host:
            return httpx.Response(502, text=f"unknown host {host}")
        path = request.url.path
        denied = self._check_auth(request)
        if denied is not None:
            return denied
        if path == "/v2/":
            return httpx.Response(200, json={})
        m = re.match(r"^/v2/(.+)/(manifests|blobs|tags|referrers)/(.*)$", path)
        if m is None:
            return _error(404, "NOT_FOUND", "no route")
        repo, kind, rest = m.groups()
        if kind == "manifests":
            return self._manifest(request, repo, rest)
        if kind == "blobs" and rest.startswith("uploads/"):
            return self._upload(request, repo, rest[len("uploads/") :])
        if kind == "blobs":
            return self._blob(request, repo, rest)
        if kind == "tags":
            return self._tags(request, repo)
        return self._referrers(request, repo, rest)

    # -- auth ---------------------------------------------------------------------

    def _basic_ok(self, header: str) -> bool:
        if not header.startswith("Basic "):
            return False
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return self.users.get(user) == password and bool(user)

    def _check_auth(self, request: httpx.Request) -> httpx.Response | None:
        header = request.headers.get("authorization", "")
        if self.auth is None:
            return None
        if self.auth == "basic":
            if self.anonymous_pull and request.method in ("GET", "HEAD") and not header:
                return None
            if self._basic_ok(header):
                return None
            return httpx.Response(
                401,
                headers={"WWW-Authenticate": f'Basic realm="{self.host}"'},
                json={"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
            )
        token = header[7:] if header.startswith("Bearer ") else ""
        valid = {t: s for t, s in self.issued_tokens}
        scope = self._needed_scope(request)
        live = token in valid and token not in self.expired_tokens
        if live and (scope is None or any(_scope_covers(g, scope) for g in valid[token])):
            return None
        challenge = f'Bearer realm="https://{AUTH}/token",service="{self.host}"'
        if scope is not None:
            challenge += f',scope="{scope}"'
        return httpx.Response(
            401,
            headers={"WWW-Authenticate": challenge},
            json={"errors": [{"code": "UNAUTHORIZED", "message": "token required"}]},
        )

    def _needed_scope(self, request: httpx.Request) -> str | None:
        m = re.match(r"^/v2/(.+)/(manifests|blobs|tags|referrers)/", request.url.path)
        if m is None:
            return None
        action = "pull" if request.method in ("GET", "HEAD") else "push"
        return f"repository:{m.group(1)}:{action}"

    def _token(self, request: httpx.Request) -> httpx.Response:
        header = request.headers.get("authorization", "")
        if header and not self._basic_ok(header):
            return httpx.Response(401, json={"details": "bad credentials"})
        if not header and not self.anonymous_pull:
            return httpx.Response(401, json={"details": "login required"})
        scopes = request.url.params.get_list("scope")
        granted = []
        for s in scopes:
            if not header and ":push" in s.replace("pull,push", "push"):
                continue
            granted.append(s)
        token = uuid.uuid4().hex
        self.issued_tokens.append((token, granted))
        return httpx.Response(200, json={"token": token, "expires_in": self.token_lifetime})

    # -- manifests ----------------------------------------------------------------

    def _manifest(self, request: httpx.Request, repo: str, ref: str) -> httpx.Response:
        store = self.manifests.setdefault(repo, {})
        if request.method == "PUT":
            media_type = request.headers.get("content-type", "")
            digest = self.add_manifest(repo, request.content, media_type, None)
            if not ref.startswith("sha256:"):
                self.tags.setdefault(repo, {})[ref] = digest
            headers = {
                "Docker-Content-Digest": digest,
                "Location": f"/v2/{repo}/manifests/{digest}",
            }
            if self.oci_subject and b'"subject"' in request.content:
                headers["OCI-Subject"] = json.loads(request.content)["subject"]["digest"]
            return httpx.Response(201, headers=headers)
        digest = ref if ref.startswith("sha256:") else self.tags.get(repo, {}).get(ref, "")
        if digest not in store:
            return _error(404, "MANIFEST_UNKNOWN", "manifest unknown")
        body, media_type = store[digest]
        return httpx.Response(
            200,
            content=body if request.method == "GET" else b"",
            headers={
                "Content-Type": media_type,
                "Docker-Content-Digest": digest,
                "Content-Length": str(len(body)),
            },
        )

    # -- blobs --------------------------------------------------------------------

    def _blob(self, request: httpx.Request, repo: str, digest: str) -> httpx.Response:
        data = self.blobs.get(repo, {}).get(digest)
        if data is None:
            return _error(404, "BLOB_UNKNOWN", "blob unknown")
        if request.method == "HEAD":
            return httpx.Response(200, headers={"Content-Length": str(len(data))})
        if self.redirect_blobs:
            return httpx.Response(
                307, headers={"Location": f"https://{STORAGE}/bucket/{digest}?sig=abc"}
            )
        return self._serve(request, data)

    def _storage(self, request: httpx.Request) -> httpx.Response:
        digest = request.url.path.rsplit("/", 1)[-1]
        for blobs in self.blobs.values():
            if digest in blobs:
                return self._serve(request, blobs[digest])
        return httpx.Response(404)

    def _serve(self, request: httpx.Request, data: bytes) -> httpx.Response:
        status = 200
        headers: dict[str, str] = {"Content-Type": "application/octet-stream"}
        body = data
        rng = request.headers.get("range")
        if rng and self.honor_range:
            m = re.match(r"bytes=(\d+)-(\d*)$", rng)
            assert m is not None, rng
            start = int(m.group(1))
            end = int(m.group(2)) + 1 if m.group(2) else len(data)
            if start >= len(data):
                return httpx.Response(416, headers={"Content-Range": f"bytes */{len(data)}"})
            end = min(end, len(data))
            body = data[start:end]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        headers["Content-Length"] = str(len(body))
        if self.corrupt_blobs and body:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        if self.truncate_blobs > 0:
            self.truncate_blobs -= 1
            body = body[: self.truncate_to]  # Content-Length still announces the full size
        return httpx.Response(status, headers=headers, content=body)

    # -- uploads ------------------------------------------------------------------

    def _upload(self, request: httpx.Request, repo: str, rest: str) -> httpx.Response:
        params = parse_qs(request.url.query.decode())
        if request.method == "POST" and rest == "":
            if "mount" in params:
                digest, source = params["mount"][0], params["from"][0]
                if digest in self.blobs.get(source, {}):
                    self.blobs.setdefault(repo, {})[digest] = self.blobs[source][digest]
                    return httpx.Response(
                        201,
                        headers={
                            "Location": f"/v2/{repo}/blobs/{digest}",
                            "Docker-Content-Digest": digest,
                        },
                    )
            session = uuid.uuid4().hex
            self.uploads[session] = Upload(repo)
            return httpx.Response(
                202,
                headers={
                    "Location": f"/v2/{repo}/blobs/uploads/{session}?state=s0",
                    "Range": "0-0",
                },
            )
        upload = self.uploads.get(rest)
        if upload is None:
            return _error(404, "BLOB_UPLOAD_UNKNOWN", "upload unknown")
        if request.method == "GET":
            return httpx.Response(
                204,
                headers={
                    "Location": f"/v2/{repo}/blobs/uploads/{rest}",
                    "Range": f"0-{max(0, len(upload.data) - 1)}",
                },
            )
        if request.method == "PATCH":
            cr = request.headers.get("content-range")
            if cr is not None:
                m = re.match(r"^(\d+)-(\d+)$", cr)
                if m is None or int(m.group(1)) != len(upload.data):
                    return httpx.Response(416)
                if int(m.group(2)) - int(m.group(1)) + 1 != len(request.content):
                    return httpx.Response(400)
            upload.data += request.content
            return httpx.Response(
                202,
                headers={
                    "Location": f"/v2/{repo}/blobs/uploads/{rest}?state=s{len(upload.data)}",
                    "Range": f"0-{len(upload.data) - 1}",
                },
            )
        if request.method == "PUT":
            upload.data += request.content
            digest = params.get("digest", [""])[0]
            if sha(bytes(upload.data)) != digest:
                return _error(
                    400, "DIGEST_INVALID", "provided digest did not match uploaded content"
                )
            del self.uploads[rest]
            self.blobs.setdefault(repo, {})[digest] = bytes(upload.data)
            return httpx.Response(
                201,
                headers={"Location": f"/v2/{repo}/blobs/{digest}", "Docker-Content-Digest": digest},
            )
        return httpx.Response(405)

    # -- listing ------------------------------------------------------------------

    def _tags(self, request: httpx.Request, repo: str) -> httpx.Response:
        if repo not in self.tags:
            return _error(404, "NAME_UNKNOWN", "repository name not known to registry")
        names = sorted(self.tags[repo])
        last = request.url.params.get("last")
        if last:
            names = [n for n in names if n > last]
        headers = {}
        if self.tag_page_size and len(names) > self.tag_page_size:
            names = names[: self.tag_page_size]
            headers["Link"] = (
                f'</v2/{repo}/tags/list?last={names[-1]}&n={self.tag_page_size}>; rel="next"'
            )
        return httpx.Response(200, json={"name": repo, "tags": names}, headers=headers)

    def _referrers(self, request: httpx.Request, repo: str, digest: str) -> httpx.Response:
        if not self.referrers_api:
            return _error(404, "NOT_FOUND", "no route")
        found: list[dict[str, Any]] = []
        for d, (body, media_type) in self.manifests.get(repo, {}).items():
            parsed = json.loads(body)
            if parsed.get("subject", {}).get("digest") == digest:
                found.append(
                    {
                        "mediaType": media_type,
                        "digest": d,
                        "size": len(body),
                        "artifactType": parsed.get("artifactType", ""),
                    }
                )
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": found,
        }
        return httpx.Response(
            200, json=index, headers={"Content-Type": "application/vnd.oci.image.index.v1+json"}
        )


def _scope_covers(granted: str, needed: str) -> bool:
    g_repo, _, g_actions = granted.rpartition(":")
    n_repo, _, n_action = needed.rpartition(":")
    return g_repo == n_repo and n_action in g_actions.split(",")


def _error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"errors": [{"code": code, "message": message}]})
