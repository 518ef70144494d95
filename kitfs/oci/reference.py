"""ModelKit references, parsed exactly as `kit` parses them.

`kit` (pkg/lib/repo/util/reference.go) decides that the first path segment
is a registry only when it contains '.' or ':'; everything else lives in its
local storage under the registry name `localhost`. Users move between the two
tools, so the same string must mean the same thing to both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kitfs.errors import BadReferenceError

LOCAL_REGISTRY = "localhost"
#: Docker Hub's names: kit's and the user's, and the ones its API answers at.
DOCKER_HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io")
DEFAULT_REPOSITORY = "_"
DEFAULT_TAG = "latest"

_REPO_RE = re.compile(
    r"^[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*)*$"
)
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$", re.ASCII)
_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$|^sha512:[a-f0-9]{128}$")
_REGISTRY_RE = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$"
)


def is_digest(text: str) -> bool:
    return _DIGEST_RE.match(text) is not None


@dataclass(frozen=True)
class Reference:
    """A parsed reference: where a ModelKit lives and which version of it."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None
    extra_tags: tuple[str, ...] = field(default=())

    @property
    def is_local(self) -> bool:
        """True when the ModelKit lives in `kit`'s local storage, not a registry."""
        return self.registry == LOCAL_REGISTRY

    @property
    def name(self) -> str:
        """`registry/repository`, the key `kit` uses for a repository."""
        return f"{self.registry}/{self.repository}"

    @property
    def target(self) -> str:
        """What to ask the registry for: the digest if there is one (it wins), else the tag."""
        if self.digest is not None:
            return self.digest
        return self.tag or DEFAULT_TAG

    @property
    def tags(self) -> tuple[str, ...]:
        """Every tag a push to this reference should set."""
        first = () if self.tag is None else (self.tag,)
        return first + self.extra_tags

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest, self.extra_tags)

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> Reference:
    """Parse `[registry/]repo[:tag][@digest][,tag2,...]` the way `kit` does."""
    original = text
    text = text.strip()
    if not text:
        raise BadReferenceError("empty ModelKit reference")
    if is_digest(text):
        return Reference(LOCAL_REGISTRY, DEFAULT_REPOSITORY, None, text)

    first, *extra = text.split(",")
    registry = LOCAL_REGISTRY
    rest = first
    if "/" in first:
        head, tail = first.split("/", 1)
        if ":" in head or "." in head:
            registry, rest = head, tail

    tag: str | None = None
    digest: str | None = None
    if "@" in rest:
        # kit drops a tag given beside a digest: the digest alone names the version
        repo, digest = rest.split("@", 1)
        repo = repo.split(":", 1)[0]
    elif ":" in rest:
        repo, tag = rest.split(":", 1)
    else:
        repo, tag = rest, DEFAULT_TAG

    where = f"in reference {original!r}"
    if not _REGISTRY_RE.match(registry):
        raise BadReferenceError(f"invalid registry {registry!r} {where}")
    if not repo:
        raise BadReferenceError(f"missing repository {where}")
    if repo.lower() != repo:
        raise BadReferenceError(f"repository {repo!r} must be lowercase {where}")
    if not _REPO_RE.match(repo):
        raise BadReferenceError(
            f"invalid repository {repo!r} {where}: use lowercase letters, digits and "
            "'.', '_', '-' separators, starting and ending with a letter or digit"
        )
    for t in ([tag] if tag is not None else []) + extra:
        if not _TAG_RE.match(t):
            raise BadReferenceError(
                f"invalid tag {t!r} {where}: up to 128 letters, digits, '_', '.' or '-', "
                "not starting with '.' or '-'"
            )
    if digest is not None and not is_digest(digest):
        raise BadReferenceError(f"invalid digest {digest!r} {where}: expected sha256:<64 hex>")
    return Reference(registry, repo, tag, digest, tuple(extra))
