"""Which ModelKits must be signed, and by whom: one mount's flags, and a node's policy file.

A regulated node states its rules once, in /etc/kitfs/policy.yaml, and every
mount and unpack on it obeys them, whatever flags a user passes; flags can
only add a requirement, never lift one. The file is read fresh by each mount,
and anything doubtful in it (a duplicate key, a pattern that cannot match, an
unknown field) refuses everything: a typo must not turn checking off.

    version: 1
    default: reject               # or allow: what no rule matches (reject if absent)
    trustedRoot: trusted_root.json  # optional; paths are relative to this file
    rules:                        # the first rule that matches a reference decides
      - match: registry.example.com/prod/**
        require:                  # any one of these signers is enough
          - key: keys/release.pub
          - identity: https://github.com/org/repo/.github/workflows/release.yml@refs/heads/main
            issuer: https://token.actions.githubusercontent.com
        ignoreTlog: false         # true: keyed signatures need no log entry
      - match: [registry.example.com/dev/**, localhost:5000/**]
        allow: unsigned
      - match: docker.io/**
        reject: ModelKits from Docker Hub are not allowed here

`match` patterns name REGISTRY/REPOSITORY (no tag): `*` stays within one path
segment, `**` (a whole segment) spans any number of them, none included.
Registry names compare as hosts do: case-insensitively, `:443` and Docker
Hub's aliases folded (policy_name). Keys may also be given inline as PEM.

Pure: files are read through the `read` callable the caller passes
(kitfs/enforcement.py reads them from disk).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kitfs.errors import PolicyError, SignatureError, UsageError
from kitfs.oci.reference import DOCKER_HUB_HOSTS
from kitfs.signing.flags import FlagNames, SignatureFlags, is_pem
from kitfs.signing.keyless import Identity
from kitfs.signing.keys import PublicKey, load_public_key
from kitfs.signing.trust import Trust
from kitfs.signing.trustroot import TrustedRoot, load_trusted_root

#: read(path, what) -> bytes: a file the policy or the flags name; `what` names it in errors.
Reader = Callable[[str, str], bytes]

def policy_host(registry: str) -> str:
    """A registry as policies compare it: hosts case-insensitively, the HTTPS port as no
    port (`:443`, `:0443`: what an HTTP client dials), Docker Hub by one name."""
    host, colon, port = registry.lower().rpartition(":")
    if not colon or "]" in port:  # no port (an IPv6 literal's colons are inside [])
        host = registry.lower()
    elif port.isdigit() and int(port) == 443:
        pass  # the default port, however written
    else:
        host = f"{host}:{int(port)}" if port.isdigit() else registry.lower()
    return "docker.io" if host in DOCKER_HUB_HOSTS else host


def policy_name(registry: str, repository: str) -> str:
    """REGISTRY/REPOSITORY as policies match it (policy_host)."""
    return f"{policy_host(registry)}/{repository}"


@dataclass(frozen=True)
class Requirement:
    """Signatures a reference must carry: any one of `trusts` passing is enough.
    `origin` says who asked (a flag, a policy rule), for the refusal a user reads."""

    trusts: tuple[Trust, ...]
    origin: str


class PolicyRejected(SignatureError):
    """The node's policy forbids this reference, signed or not."""


def load_key(spec: str, what: str, read: Reader) -> PublicKey:
    """A public key from a PEM file's path, or from PEM text itself; a UsageError naming
    `what` when it is not a usable key (a setting to fix, not a refused signature)."""
    try:
        if is_pem(spec):
            return load_public_key(spec.encode(), what)
        return load_public_key(read(spec, what), Path(spec).name)
    except SignatureError as exc:
        raise (PolicyError if what.startswith("policy ") else UsageError)(
            f"{what}: {exc}") from None


def load_root(path: str, what: str, read: Reader) -> TrustedRoot:
    try:
        return load_trusted_root(read(path, what), Path(path).name)
    except SignatureError as exc:
        raise (PolicyError if what.startswith("policy ") else UsageError)(
            f"{what}: {exc}") from None


def requirement_from_flags(
    flags: SignatureFlags, names: FlagNames, origin: str, read: Reader
) -> Requirement | None:
    """What `flags` ask for (None: nothing), their files loaded; a UsageError if they
    cannot make a check."""
    problem = flags.problem(names)
    if problem is not None:
        raise UsageError(problem)
    if not flags.given:
        return None
    root = load_root(flags.trusted_root, names.trusted_root, read) if flags.trusted_root else None
    if flags.key:
        trust = Trust(key=load_key(flags.key, names.key, read), root=root,
                      ignore_tlog=flags.ignore_tlog)
    else:
        assert flags.identity and flags.issuer
        trust = Trust(identity=Identity(flags.identity, flags.issuer), root=root,
                      ignore_tlog=flags.ignore_tlog)
    return Requirement((trust,), origin)


def _glob(pattern: str) -> re.Pattern[str]:
    """`**` as a whole segment: any number of segments (`a/**/b` matches `a/b`); `*` and
    `?` within one. The registry (first segment) is folded as policy_host folds names."""
    host, _, rest = pattern.partition("/")
    if host == "**":
        return re.compile(".*")
    if not any(c in host for c in "*?"):
        host = policy_host(host)
    out = [re.escape(host.lower()).replace(r"\*", "[^/]*").replace(r"\?", "[^/]")]
    segments = rest.split("/") if rest else []
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "**":
            out.append("(?:/.*)?" if last else "(?:/[^/]+)*")
        else:
            body = "".join({"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c)) for c in segment)
            out.append("/" + body)
    return re.compile("".join(out))


def _pattern_problem(pattern: str) -> str | None:
    """Why `pattern` could never match a reference (a rule that silently does nothing is
    how a typo turns checking off), or None."""
    if pattern != pattern.strip() or not pattern:
        return f"pattern {pattern!r} has blanks around it"
    if pattern == "**":
        return None
    host, _, rest = pattern.partition("/")
    if "@" in pattern or ":" in rest:
        return (f"pattern {pattern!r} names a tag or digest; patterns match "
                "REGISTRY/REPOSITORY only")
    if not rest or "" in rest.split("/") or not host:
        return (f"pattern {pattern!r} needs REGISTRY/REPOSITORY, with no empty path "
                "segment (e.g. registry.example.com/team/**)")
    if rest != rest.lower():
        return f"pattern {pattern!r}: repositories are lower case, so it can never match"
    if any("**" in s and s != "**" for s in pattern.split("/")):
        return f"pattern {pattern!r}: ** must be a whole path segment"
    return None


@dataclass(frozen=True)
class Rule:
    patterns: tuple[str, ...]
    action: Literal["require", "allow", "reject"]
    requirement: Requirement | None = None
    reason: str = ""
    compiled: tuple[re.Pattern[str], ...] = field(default=(), compare=False, repr=False)

    def matches(self, name: str) -> bool:
        return any(p.fullmatch(name) for p in self.compiled)


@dataclass(frozen=True)
class Policy:
    source: str
    rules: tuple[Rule, ...]
    default: Literal["reject", "allow"] = "reject"

    def requirement_for(self, name: str) -> Requirement | None:
        """What the node asks of `name` (policy_name's form): a requirement, or None when
        it may be used unsigned; PolicyRejected when it may not be used at all."""
        for index, rule in enumerate(self.rules, 1):
            if not rule.matches(name):
                continue
            if rule.action == "reject":
                why = f": {rule.reason}" if rule.reason else ""
                raise PolicyRejected(f"{name} is rejected by {self.source} rule {index}{why}")
            return rule.requirement
        if self.default == "reject":
            raise PolicyRejected(f"{name} matches no rule of {self.source}, whose default is "
                                 "reject")
        return None


_TOP = {"version", "default", "trustedRoot", "rules"}
_RULE = {"match", "require", "allow", "reject", "ignoreTlog", "trustedRoot"}
_SIGNER = {"key", "identity", "issuer"}


class _StrictLoader(yaml.SafeLoader):
    """safe_load, but a key given twice is an error, not silently the last one (a second
    `rules:` would otherwise drop every rule of the first)."""


def _no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode,
                   deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a key that is a list or mapping", key_node.start_mark) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"{key!r} given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def parse_policy(text: bytes, source: str, read: Reader) -> Policy:
    """The policy in `text` (YAML), the files it names read through `read` relative to
    `source`'s directory; a UsageError naming the first thing wrong."""
    base = Path(source).parent

    def fail(message: str) -> UsageError:
        return PolicyError(f"policy {source}: {message}")

    def read_named(path: str, what: str) -> bytes:
        try:
            return read(path, what)
        except UsageError as exc:  # a file the policy names: the policy's fault
            raise PolicyError(str(exc)) from None

    try:
        doc = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None)
        raise fail(f"not valid YAML{where}" + (f": {problem}" if problem else "")) from None
    except RecursionError:
        raise fail("not valid YAML (nested too deep)") from None
    if not isinstance(doc, dict):
        raise fail("must be a mapping with `version: 1` and `rules`")
    _only(doc, _TOP, "the top level", fail)
    version = doc.get("version")
    if type(version) is not int or version != 1:
        raise fail(f"version must be 1, not {version!r}")
    default = doc.get("default", "reject")
    if default not in ("reject", "allow"):
        raise fail(f"default must be reject or allow, not {default!r}")

    def path(value: Any, what: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise fail(f"{what} must be a file path")
        return str(base / value)

    def root_at(value: Any, what: str) -> TrustedRoot | None:
        if value is None:
            return None
        return load_root(path(value, what), f"policy {source} {what}", read_named)

    top_root = root_at(doc.get("trustedRoot"), "trustedRoot")
    rules_doc = doc.get("rules", [])
    if not isinstance(rules_doc, list):
        raise fail("rules must be a list")
    rules = []
    for index, item in enumerate(rules_doc, 1):
        where = f"rule {index}"
        if not isinstance(item, dict):
            raise fail(f"{where} must be a mapping")
        _only(item, _RULE, where, fail)
        patterns = item.get("match")
        if isinstance(patterns, str):
            patterns = [patterns]
        if (not isinstance(patterns, list) or not patterns
                or not all(isinstance(p, str) for p in patterns)):
            raise fail(f"{where}: match must be a pattern or a list of them")
        for pattern in patterns:
            problem = _pattern_problem(pattern)
            if problem is not None:
                raise fail(f"{where}: {problem}")
        compiled = tuple(_glob(p) for p in patterns)
        actions = [a for a in ("require", "allow", "reject") if a in item]
        if len(actions) != 1:
            raise fail(f"{where}: needs exactly one of require, allow, reject")
        action = actions[0]
        if action != "require" and ("ignoreTlog" in item or "trustedRoot" in item):
            raise fail(f"{where}: ignoreTlog and trustedRoot belong to require rules")
        ignore = item.get("ignoreTlog", False)
        if not isinstance(ignore, bool):
            raise fail(f"{where}: ignoreTlog must be true or false")
        if action == "allow":
            if item["allow"] != "unsigned":
                raise fail(f"{where}: allow takes the value unsigned")
            rules.append(Rule(tuple(patterns), "allow", compiled=compiled))
        elif action == "reject":
            reason = item["reject"]
            if reason is not True and not (isinstance(reason, str) and reason.strip()):
                raise fail(f"{where}: reject takes a reason (text) or true")
            rules.append(Rule(tuple(patterns), "reject", compiled=compiled,
                              reason="" if reason is True else reason.strip()))
        else:
            root = root_at(item.get("trustedRoot"), f"{where} trustedRoot") or top_root
            signers = item["require"]
            if not isinstance(signers, list) or not signers:
                raise fail(f"{where}: require must be a non-empty list of signers")
            trusts = tuple(_signer(s, f"{where} require[{n}]", root, ignore, path, fail,
                                   source, read_named)
                           for n, s in enumerate(signers))
            rules.append(Rule(tuple(patterns), "require",
                              Requirement(trusts, f"{source} {where}"), compiled=compiled))
    return Policy(source, tuple(rules), default)


def _signer(item: Any, where: str, root: TrustedRoot | None, ignore: bool,
            path: Callable[[Any, str], str], fail: Callable[[str], UsageError],
            source: str, read: Reader) -> Trust:
    if not isinstance(item, dict):
        raise fail(f"{where} must be a mapping: key, or identity and issuer")
    _only(item, _SIGNER, where, fail)
    if "key" in item:
        if "identity" in item or "issuer" in item:
            raise fail(f"{where}: a key, or an identity and issuer, not both")
        spec = item["key"]
        if not isinstance(spec, str):
            raise fail(f"{where}: key must be a file path or PEM text")
        key = load_key(spec if is_pem(spec) else path(spec, f"{where} key"),
                       f"policy {source} {where} key", read)
        if root is None and not ignore:
            raise fail(f"{where}: a key needs a trustedRoot to check transparency-log "
                       "entries, or ignoreTlog: true on its rule")
        return Trust(key=key, root=root, ignore_tlog=ignore)
    identity, issuer = item.get("identity"), item.get("issuer")
    if not (isinstance(identity, str) and identity and isinstance(issuer, str) and issuer):
        raise fail(f"{where}: keyless needs both identity and issuer")
    if root is None:
        raise fail(f"{where}: keyless needs a trustedRoot (top level or on its rule)")
    return Trust(identity=Identity(identity, issuer), root=root, ignore_tlog=ignore)


def _only(doc: Mapping[Any, Any], allowed: set[str], where: str,
          fail: Callable[[str], UsageError]) -> None:
    unknown = sorted(str(k) for k in doc if k not in allowed)
    if unknown:
        raise fail(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(allowed))})")
