"""Registry authentication: anonymous, Basic, and the Bearer token dance.

A registry says how it wants to be authenticated only by answering 401 with a
`WWW-Authenticate` challenge. kitfs starts anonymous, learns the scheme from
the first challenge, and from then on authenticates up front: Basic with the
stored credentials, or a bearer token per scope (`repository:<repo>:pull`,
`...:pull,push`) fetched from the challenge's realm, cached until shortly
before it expires.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import trio

from kitfs.errors import AuthError, RegistryError


@dataclass(frozen=True)
class Credential:
    """What `kit login` stored for a registry (docker config.json semantics)."""

    username: str = ""
    password: str = ""
    identity_token: str = ""
    """An OAuth2 refresh token (`kit login` with a password but no username)."""
    registry_token: str = ""
    """A bearer token to send as is."""

    @property
    def is_empty(self) -> bool:
        return not (self.username or self.password or self.identity_token or self.registry_token)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class Challenge:
    scheme: str
    """Lower-case: "basic" or "bearer"."""
    params: dict[str, str]


_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


def parse_challenges(values: list[str]) -> list[Challenge]:
    """Parse WWW-Authenticate values into challenges (quoted values may hold commas)."""
    found: list[Challenge] = []
    for value in values:
        rest = value.strip()
        while rest:
            m = re.match(r"([A-Za-z][A-Za-z0-9_-]*)\s*", rest)
            if m is None:
                break
            scheme = m.group(1).lower()
            rest = rest[m.end() :]
            params: dict[str, str] = {}
            while True:
                p = _PARAM_RE.match(rest)
                if p is None or not p.group(0):
                    break
                key, raw = p.group(1).lower(), p.group(2)
                if raw.startswith('"'):
                    raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
                params[key] = raw
                rest = rest[p.end() :]
            found.append(Challenge(scheme, params))
            rest = rest.lstrip(", ")
    return found


def pull_scope(repo: str) -> str:
    return f"repository:{repo}:pull"


def push_scope(repo: str) -> str:
    return f"repository:{repo}:pull,push"


def delete_scope(repo: str) -> str:
    return f"repository:{repo}:delete"


@dataclass
class _Token:
    value: str
    refresh_at: float


TokenFetcher = Callable[[httpx.Request, str], Awaitable[httpx.Response]]
"""Sends a token request with retries and error mapping; the str says what it is for."""

CredentialSource = Callable[[], Awaitable[Credential | None]]


class Authenticator:
    """Per-registry auth state, shared by every concurrent request of one client."""

    def __init__(self, registry: str, credentials: CredentialSource, fetch: TokenFetcher) -> None:
        self.registry = registry
        self._credentials = credentials
        self._fetch = fetch
        self._credential: Credential | None = None
        self._looked_up = False
        self._scheme: str | None = None
        self._realm = ""
        self._service = ""
        self._tokens: dict[str, _Token] = {}
        self._locks: dict[str, trio.Lock] = {}

    async def credential(self) -> Credential | None:
        if not self._looked_up:
            cred = await self._credentials()
            self._credential = None if cred is None or cred.is_empty else cred
            self._looked_up = True
        return self._credential

    @property
    def scheme(self) -> str | None:
        return self._scheme

    async def authorization(self, scopes: tuple[str, ...]) -> str | None:
        """The Authorization header to send up front, once a challenge taught the scheme."""
        if self._scheme == "basic":
            cred = await self.credential()
            return cred.basic_header() if cred is not None and cred.username else None
        if self._scheme == "bearer":
            return "Bearer " + await self._token(scopes, force=False)
        return None

    async def challenged(self, response: httpx.Response, scopes: tuple[str, ...]) -> None:
        """Learn from a 401 and get fresh credentials; raise AuthError when there are none."""
        challenges = parse_challenges(response.headers.get_list("www-authenticate"))
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        cred = await self.credential()
        if bearer is not None:
            self._scheme = "bearer"
            realm = bearer.params.get("realm", "")
            if not realm:
                raise AuthError(f"{self.registry} sent a bearer challenge without a token realm")
            self._realm = realm
            self._service = bearer.params.get("service", "")
            extra = bearer.params.get("scope", "")
            wanted = _merge_scopes(scopes, tuple(extra.split()) if extra else ())
            await self._token(wanted, force=True)
            if wanted != scopes:
                self._tokens[_scope_key(scopes)] = self._tokens[_scope_key(wanted)]
        elif basic is not None:
            had = self._scheme == "basic"
            self._scheme = "basic"
            if cred is None or not cred.username:
                raise AuthError(_login_hint(self.registry))
            if had:
                raise AuthError(f"wrong username or password for {self.registry}")
        else:
            raise AuthError(
                f"{self.registry} answered 401 without a usable authentication challenge"
            )

    async def _token(self, scopes: tuple[str, ...], *, force: bool) -> str:
        key = _scope_key(scopes)
        lock = self._locks.setdefault(key, trio.Lock())
        stale = self._tokens.get(key) if force else None
        async with lock:
            token = self._tokens.get(key)
            if token is not None and token is not stale and trio.current_time() < token.refresh_at:
                return token.value
            token = await self._fetch_token(scopes)
            self._tokens[key] = token
            return token.value

    async def _fetch_token(self, scopes: tuple[str, ...]) -> _Token:
        cred = await self.credential()
        if cred is not None and cred.registry_token:
            return _Token(cred.registry_token, float("inf"))
        what = f"getting an access token for {self.registry} from {self._realm}"
        try:
            if cred is not None and cred.identity_token:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": cred.identity_token,
                    "client_id": "kitfs",
                    "scope": " ".join(scopes),
                }
                if self._service:
                    form["service"] = self._service
                request = httpx.Request("POST", self._realm, data=form)
            else:
                params: list[tuple[str, str | int | float | bool | None]] = []
                if self._service:
                    params.append(("service", self._service))
                params.extend(("scope", s) for s in scopes)
                headers = {}
                if cred is not None and cred.username:
                    headers["Authorization"] = cred.basic_header()
                request = httpx.Request("GET", self._realm, params=params, headers=headers)
        except (httpx.InvalidURL, ValueError) as exc:
            raise AuthError(f"{what}: invalid token realm ({exc})") from exc
        started = trio.current_time()
        response = await self._fetch(request, what)
        if response.status_code in (401, 403):
            if cred is not None:
                raise AuthError(f"wrong username or password for {self.registry}")
            raise AuthError(_login_hint(self.registry))
        if response.status_code != 200:
            raise RegistryError(f"{what}: token service answered HTTP {response.status_code}")
        try:
            body = json.loads(response.content)
            value = body.get("token") or body.get("access_token")
            expires_in = float(body.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError) as exc:
            raise RegistryError(f"{what}: token service sent malformed JSON") from exc
        if not isinstance(value, str) or not value:
            raise RegistryError(f"{what}: token service sent no token")
        # Refresh a little early so a request never goes out with a token that
        # expires on the way.
        margin = min(30.0, expires_in / 10)
        return _Token(value, started + max(0.0, expires_in - margin))


def _scope_key(scopes: tuple[str, ...]) -> str:
    return " ".join(sorted(scopes))


def _merge_scopes(ours: tuple[str, ...], theirs: tuple[str, ...]) -> tuple[str, ...]:
    merged = list(ours)
    merged.extend(s for s in theirs if s not in merged)
    return tuple(merged)


def _login_hint(registry: str) -> str:
    return f"{registry} requires authentication: run `kit login {registry}` (or `kitfs login`)"
