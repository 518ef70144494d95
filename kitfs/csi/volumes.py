"""The driver's records on disk, the locks around them, and adoption after a restart.

Nothing the driver knows lives only in its memory: a gRPC server killed at any
point and started again must find every published volume and every daemon it
started. So each fact is one small JSON file, replaced atomically:

    STATE/volumes/<hash of target>.json  one per published target: who asked, which key
    STATE/daemons/<key>.json             one per shared daemon: what it mounts, where
    STATE/homes/<key>/credentials.json   the registry credentials that daemon uses (0600)

Records are data, never trusted as paths: a daemon record's key must be a key
(24 hex digits, its file's name), its mountpoint and home are derived from the
key, and a volume record's target must be the canonical absolute path its
file is named for. Anything else is skipped with a warning, never acted on
(`"key": "../../x"` would otherwise make drop_daemon remove a sibling).

A daemon's users are the volume records naming its key (derived, never stored
twice, so they cannot disagree). A volume record is written before its bind
mount is made and removed after it is undone, so a crash in between leaves a
record that unpublish still cleans up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kitfs.engine.api import PrefetchMode, VerifyMode
from kitfs.oci.reference import parse_reference

log = logging.getLogger(__name__)

KEY_RE = re.compile(r"[0-9a-f]{24}")


def is_key(text: object) -> bool:
    """`text` is what daemon_key makes: safe as a file name, never a path."""
    return isinstance(text, str) and KEY_RE.fullmatch(text) is not None


def is_canonical(path: object) -> bool:
    """An absolute path with no `.`, `..`, `//` or trailing slash (what kubelet passes)."""
    return (isinstance(path, str) and os.path.isabs(path) and "\0" not in path
            and os.path.normpath(path) == path and not path.startswith("//"))


@dataclass(frozen=True)
class Attributes:
    """What a pod asked for in its volumeAttributes, validated."""

    reference: str
    filter: str
    verify: VerifyMode
    prefetch: PrefetchMode
    #: Who must have signed the ModelKit (checked at each publish; not part of the daemon
    #: key: the daemon serves one digest, which each volume's own check covers).
    signature_key: str = ""  # PEM text of a cosign public key
    signature_identity: str = ""
    signature_issuer: str = ""
    signature_ignore_tlog: bool = False

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Attributes:
        """Fields this version does not know (a record written by a newer driver, then
        rolled back) are left out rather than failing adoption."""
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class VolumeRecord:
    volume_id: str
    target: str
    key: str
    attributes: Attributes
    pod: str  # namespace/name, for the log only

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> VolumeRecord:
        return cls(volume_id=doc["volume_id"], target=doc["target"], key=doc["key"],
                   attributes=Attributes.from_json(doc["attributes"]), pod=doc.get("pod", ""))


@dataclass(frozen=True)
class DaemonRecord:
    key: str
    reference: str  # pinned to the digest: the daemon serves exactly what was authorized
    digest: str
    attributes: Attributes
    mountpoint: str
    home: str | None  # --config of the daemon (the credentials of the volume that started it)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> DaemonRecord:
        return cls(key=doc["key"], reference=doc["reference"], digest=doc["digest"],
                   attributes=Attributes.from_json(doc["attributes"]), mountpoint=doc["mountpoint"],
                   home=doc.get("home"))


def daemon_key(digest: str, attributes: Attributes) -> str:
    """Pods asking for the same manifest digest in the same repository (and filter, verify,
    prefetch) share a daemon.

    The registry and repository are part of the key because access is granted per
    repository: a pod that proved it may read a digest in one repository (even one it
    serves itself) must not join a daemon reading that digest from another.
    """
    ref = parse_reference(attributes.reference)
    text = json.dumps([ref.registry.lower(), ref.repository, digest, attributes.filter,
                       attributes.verify, attributes.prefetch])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    """Atomically and durably: a restarted driver reads the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable record %s: %s", path, exc)
        return None
    return doc if isinstance(doc, dict) else None


class Busy(Exception):
    """Another call holds the lock: the CSI spec's ABORTED, which kubelet retries."""


class Records:
    """The records under the driver's --state-dir, and the locks that order changes to them.

    Lock order: a target's lock, then a key's lock. Publish and unpublish of one
    target are serialized; the key lock makes "start the daemon or join it" and
    "leave it, and stop it if last" atomic with respect to each other. A target's
    lock is never waited for (Busy at once): kubelet's retries of one slow call
    would otherwise each block a gRPC worker. A key's lock is waited for, within a
    bound: it is shared by every pod using that daemon, and another pod's daemon
    starting is no reason to fail this pod's volume.
    """
    def __init__(self, root: Path, staging: Path) -> None:
        self.root = root
        self.staging = staging
        self._volumes = root / "volumes"
        self._daemons = root / "daemons"
        self._homes = root / "homes"
        for directory in (root, self._volumes, self._daemons):
            directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._homes.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self._homes, 0o700)
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    @contextlib.contextmanager
    def locked(self, name: str, *, wait: float = 0.0,
               busy: str | None = None) -> Iterator[None]:
        """Hold lock `name`, waiting up to `wait` seconds for it; Busy after that, with
        the message `busy` (default: an operation on this volume is in progress)."""
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        if not (lock.acquire(timeout=wait) if wait > 0 else lock.acquire(blocking=False)):
            raise Busy(busy or f"an operation on this volume is already in progress ({name})")
        try:
            yield
        finally:
            lock.release()

    # -- volumes ------------------------------------------------------------------

    def _volume_path(self, target: str) -> Path:
        return self._volumes / (hashlib.sha256(os.fsencode(target)).hexdigest()[:32] + ".json")

    def _load_volume(self, path: Path) -> VolumeRecord | None:
        doc = _read_json(path)
        if doc is None:
            return None
        try:
            record = VolumeRecord.from_json(doc)
        except (KeyError, TypeError):
            record = None
        if (record is None or not is_key(record.key) or not is_canonical(record.target)
                or self._volume_path(record.target) != path):
            log.warning("ignoring malformed volume record %s", path)
            return None
        return record

    def volume(self, target: str) -> VolumeRecord | None:
        return self._load_volume(self._volume_path(target))

    def volumes(self) -> list[VolumeRecord]:
        found = []
        for path in sorted(self._volumes.glob("*.json")):
            record = self._load_volume(path)
            if record is not None:
                found.append(record)
        return found

    def users(self, key: str) -> list[VolumeRecord]:
        return [v for v in self.volumes() if v.key == key]

    def save_volume(self, record: VolumeRecord) -> None:
        _write_json(self._volume_path(record.target), record.to_json())

    def drop_volume(self, target: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._volume_path(target).unlink()

    # -- daemons ------------------------------------------------------------------

    def mountpoint(self, key: str) -> Path:
        """Where the daemon for `key` mounts: derived, never read from a record."""
        return self.staging / key / "mnt"

    def home(self, key: str) -> Path:
        """The daemon's credentials directory, when it has one."""
        return self._homes / key

    def daemon(self, key: str) -> DaemonRecord | None:
        if not is_key(key):
            log.warning("ignoring daemon record %r: not a daemon key", key)
            return None
        doc = _read_json(self._daemons / f"{key}.json")
        if doc is None:
            return None
        try:
            record = DaemonRecord.from_json(doc)
        except (KeyError, TypeError):
            record = None
        if (record is None or record.key != key
                or record.mountpoint != str(self.mountpoint(key))
                or record.home not in (None, str(self.home(key)))):
            log.warning("ignoring malformed daemon record %s", key)
            return None
        return record

    def daemons(self) -> list[DaemonRecord]:
        found = []
        for path in sorted(self._daemons.glob("*.json")):
            record = self.daemon(path.stem)
            if record is not None:
                found.append(record)
        return found

    def save_daemon(self, record: DaemonRecord) -> None:
        _write_json(self._daemons / f"{record.key}.json", record.to_json())

    def drop_daemon(self, key: str) -> None:
        if not is_key(key):
            raise ValueError(f"not a daemon key: {key!r}")
        with contextlib.suppress(FileNotFoundError):
            (self._daemons / f"{key}.json").unlink()
        shutil.rmtree(self._homes / key, ignore_errors=True)

    # -- credentials --------------------------------------------------------------

    def credentials_dir(self, name: str) -> Path:
        """A fresh 0700 directory for one set of credentials (a kit home for --config)."""
        path = self._homes / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(mode=0o700)
        return path

    def drop_credentials(self, name: str) -> None:
        shutil.rmtree(self._homes / name, ignore_errors=True)

    def drop_leftover_credentials(self) -> None:
        """Remove credentials no daemon record names: a server killed mid-publish leaves
        request-* (an authorization) or a daemon's home written before its record."""
        for path in self._homes.iterdir():
            if not (is_key(path.name) and (self._daemons / f"{path.name}.json").exists()):
                log.info("removing leftover credentials %s", path.name)
                shutil.rmtree(path, ignore_errors=True)
