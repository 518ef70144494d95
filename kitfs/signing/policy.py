"""Which ModelKits must be signed, and by whom: one mount's flags, and the node's policy file.

A regulated node states its rules once, in /etc/kitfs/policy.yaml, and every
mount and unpack on it obeys them, whatever flags a user passes; flags can
only add a requirement, never lift one. The file is read fresh by each mount
and a broken one refuses everything (a typo must not turn checking off).

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
segment, `**` spans any number. Keys may also be given inline as PEM text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml

from kitfs.errors import SignatureError, UsageError
from kitfs.signing.flags import FlagNames, SignatureFlags
from kitfs.signing.keyless import Identity
from kitfs.signing.keys import PublicKey, load_public_key
from kitfs.signing.trust import Trust
from kitfs.signing.trustroot import TrustedRoot, load_trusted_root

DEFAULT_POLICY = Path("/etc/kitfs/policy.yaml")
POLICY_ENV = "KITFS_POLICY"
#: Policies, keys and trusted roots are kilobytes; a bigger file is a mistake.
MAX_FILE = 16 << 20

#: read(path, what) -> bytes: a file the policy or the flags name; `what` names it in errors.
Reader = Callable[[str, str], bytes]


def read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_FILE)
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None


@dataclass(frozen=True)
class Requirement:
    """Signatures a reference must carry: any one of `trusts` passing is enough.
    `origin` says who asked (a flag, a policy rule), for the refusal a user reads."""

    trusts: tuple[Trust, ...]
    origin: str


class PolicyRejected(SignatureError):
    """The node's policy forbids this reference, signed or not."""


def load_key(spec: str, what: str, read: Reader = read_file) -> PublicKey:
    """A public key from a PEM file's path, or from PEM text itself (CSI attributes)."""
    if spec.lstrip().startswith("-----BEGIN"):
        return load_public_key(spec.encode(), what)
    return load_public_key(read(spec, what), Path(spec).name)


def load_root(path: str, what: str, read: Reader = read_file) -> TrustedRoot:
    return load_trusted_root(read(path, what), Path(path).name)


def requirement_from_flags(
    flags: SignatureFlags, names: FlagNames, origin: str, read: Reader = read_file
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
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    table = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(table.get(p, re.escape(p)) for p in parts))


@dataclass(frozen=True)
class Rule:
    patterns: tuple[str, ...]
    action: Literal["require", "allow", "reject"]
    requirement: Requirement | None = None
    reason: str = ""

    @cached_property
    def _compiled(self) -> tuple[re.Pattern[str], ...]:
        return tuple(_glob(p) for p in self.patterns)

    def matches(self, name: str) -> bool:
        return any(p.fullmatch(name) for p in self._compiled)


@dataclass(frozen=True)
class Policy:
    source: str
    rules: tuple[Rule, ...]
    default: Literal["reject", "allow"] = "reject"

    def requirement_for(self, name: str) -> Requirement | None:
        """What the node asks of `name` (REGISTRY/REPOSITORY): a requirement, or None when
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


def parse_policy(text: bytes, source: str, read: Reader = read_file) -> Policy:
    """The policy in `text` (YAML), the files it names read through `read` relative to
    `source`'s directory; a UsageError naming the first thing wrong."""
    base = Path(source).parent

    def fail(message: str) -> UsageError:
        return UsageError(f"policy {source}: {message}")

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise fail(f"not valid YAML{where}") from None
    if not isinstance(doc, dict):
        raise fail("must be a mapping with `version: 1` and `rules`")
    _only(doc, _TOP, "the top level", fail)
    if doc.get("version") != 1:
        raise fail(f"version must be 1, not {doc.get('version')!r}")
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
        return load_root(path(value, what), f"policy {source} {what}", read)

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
                or not all(isinstance(p, str) and p.strip() for p in patterns)):
            raise fail(f"{where}: match must be a pattern or a list of them")
        actions = [a for a in ("require", "allow", "reject") if a in item]
        if len(actions) != 1:
            raise fail(f"{where}: needs exactly one of require, allow, reject")
        action = actions[0]
        ignore = item.get("ignoreTlog", False)
        if not isinstance(ignore, bool):
            raise fail(f"{where}: ignoreTlog must be true or false")
        if action == "allow":
            if item["allow"] != "unsigned":
                raise fail(f"{where}: allow takes the value unsigned")
            rules.append(Rule(tuple(patterns), "allow"))
        elif action == "reject":
            reason = item["reject"]
            rules.append(Rule(tuple(patterns), "reject",
                              reason="" if reason is True else str(reason or "")))
        else:
            root = root_at(item.get("trustedRoot"), f"{where} trustedRoot") or top_root
            signers = item["require"]
            if not isinstance(signers, list) or not signers:
                raise fail(f"{where}: require must be a non-empty list of signers")
            trusts = tuple(_signer(s, f"{where} require[{n}]", root, ignore, path, fail,
                                   source, read)
                           for n, s in enumerate(signers))
            rules.append(Rule(tuple(patterns), "require",
                              Requirement(trusts, f"{source} {where}")))
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
        what = f"policy {source} {where} key"
        inline = spec.lstrip().startswith("-----BEGIN")
        key = load_key(spec if inline else path(spec, f"{where} key"), what, read)
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


def _only(doc: Mapping[str, Any], allowed: set[str], where: str,
          fail: Callable[[str], UsageError]) -> None:
    unknown = sorted(str(k) for k in doc if k not in allowed)
    if unknown:
        raise fail(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(allowed))})")


def load_policy(environ: Mapping[str, str]) -> Policy | None:
    """The node's policy: $KITFS_POLICY (which must exist), else /etc/kitfs/policy.yaml if
    it exists; None when there is none."""
    named = environ.get(POLICY_ENV, "").strip()
    if named:
        return parse_policy(read_file(named, f"${POLICY_ENV}"), named)
    if not DEFAULT_POLICY.exists():
        return None
    return parse_policy(read_file(str(DEFAULT_POLICY), "policy"), str(DEFAULT_POLICY))
