"""The CSI Node service: publish a ModelKit at a pod's target path, unpublish it.

Publishing checks the pod's volume attributes, resolves the reference to its
manifest digest with the pod's own credentials and reaches every blob it names
in that repository (the authorization check: a pod joins a daemon another pod
started only after proving it may read that ModelKit there), then joins or
starts the daemon for (registry, repository, digest, filter, verify, prefetch)
at <staging-dir>/<key>/mnt and bind-mounts it read-only at the target. The
daemon is a `kitfs mount` process in its own session, so it outlives this
server; with --mounter it is the mounter's child, so it also outlives this
server's container. The last user's unpublish stops it (by the pid in its
state file, whoever started it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import grpc
import trio

from kitfs.csi import LAUNCH_WAIT, binds, csi_pb2, csi_pb2_grpc
from kitfs.csi.codes import CsiError, answer_unimplemented, invalid, rpc
from kitfs.csi.mounter import mount_request, request_daemon
from kitfs.csi.volumes import (
    Attributes,
    Busy,
    DaemonRecord,
    Records,
    VolumeRecord,
    daemon_key,
)
from kitfs.enforcement import SignatureGate, load_policies, may_require, signature_gate
from kitfs.engine.api import PrefetchMode, VerifyMode
from kitfs.errors import (
    FormatError,
    LocalStorageError,
    NotFoundError,
    PolicyError,
    SignatureError,
    UsageError,
)
from kitfs.modelkit.filters import FilterSet
from kitfs.modelkit.manifest import manifest_blobs
from kitfs.mounts import (
    FS_TYPE,
    MountConfig,
    MountError,
    absolute_mountpoint,
    daemon_argv,
    find_mount,
    read_state,
    start_daemon,
    umount,
)
from kitfs.oci.client import RegistryClient
from kitfs.oci.credentials import entry_credential, save_auths
from kitfs.oci.options import ClientOptions
from kitfs.oci.reference import Reference, parse_reference
from kitfs.parents import open_modelkit
from kitfs.signing.flags import FlagNames, SignatureFlags, is_pem, parse_bool
from kitfs.signing.policy import Policy

log = logging.getLogger(__name__)

ATTRIBUTES = ("reference", "filter", "verify", "prefetch", "signatureKey", "signatureIdentity",
              "signatureIssuer", "signatureIgnoreTlog")
#: The signature settings as a pod spells them, for errors that name what to change.
ATTRIBUTE_NAMES = FlagNames(key="signatureKey", identity="signatureIdentity",
                            issuer="signatureIssuer", trusted_root="the driver's --trusted-root",
                            ignore_tlog='signatureIgnoreTlog: "true"')
#: kubelet adds these (podInfoOnMount, ephemeral): csi.storage.k8s.io/pod.name, ...
KUBELET_PREFIX = "csi.storage.k8s.io/"
VERIFY_MODES: tuple[VerifyMode, ...] = ("lazy", "strict")
PREFETCH_MODES: tuple[PrefetchMode, ...] = ("model", "none", "all")
#: The keys a kubernetes.io/dockerconfigjson (or legacy dockercfg) secret holds.
SECRET_KEYS = (".dockerconfigjson", ".dockercfg")
#: What a secret's registry entry may say; anything else (credsStore, credHelpers: a
#: program to run on the node) is not taken from a pod's secret.
ENTRY_FIELDS = ("auth", "username", "password", "identitytoken", "registrytoken")
#: How long a publish or unpublish waits for a daemon's lock, which another volume of the
#: same daemon may hold while that daemon starts (up to the mounter's launch wait) or
#: stops; under kubelet's 2 minute deadline, so the answer is ABORTED, not a timeout.
KEY_WAIT = 45.0


@dataclass(frozen=True)
class DriverConfig:
    """What `kitfs csi` was started with."""

    node_id: str
    state_dir: Path
    staging_dir: Path
    cache_dir: Path
    client: ClientOptions
    cache_size: int | None = None  # bytes each daemon keeps its cache within; None: no limit
    #: "repository": a chunk cache per repository (see Node.cache_dir); "node": one for all.
    cache_scope: Literal["repository", "node"] = "repository"
    daemon_env: Mapping[str, str] | None = None  # None: the driver's own environment
    #: The mounter's socket (`--mounter`): it starts the daemons, outside this container.
    #: None: this server starts them itself, and they die with its container.
    mounter: Path | None = None
    verbose: int = 0
    #: sigstore trusted_root.json for volumes that ask for a signature (--trusted-root).
    trusted_root: str | None = None


# -- the request ------------------------------------------------------------------


def parse_attributes(context: Mapping[str, str]) -> Attributes:
    """The pod's volumeAttributes, checked; every mistake is INVALID_ARGUMENT naming it."""
    unknown = sorted(k for k in context if k not in ATTRIBUTES
                     and not k.startswith(KUBELET_PREFIX))
    if unknown:
        raise invalid(f"unknown volume attribute {', '.join(map(repr, unknown))} "
                      f"(kitfs takes {', '.join(ATTRIBUTES)})")
    text = context.get("reference", "").strip()
    if not text:
        raise invalid("volume attribute 'reference' is required: the ModelKit to serve, "
                      "e.g. ghcr.io/org/model:v1")
    ref = parse_reference(text)
    if ref.is_local:
        raise invalid(f"reference {text!r} names kit's local storage (its first part has no "
                      "'.' or ':'); a volume needs a registry, e.g. ghcr.io/org/model:v1")
    filter_ = context.get("filter", "model").strip() or "model"
    FilterSet.parse([filter_])
    key = context.get("signatureKey", "").strip()
    identity = context.get("signatureIdentity", "").strip()
    # Signed: serve only verified bytes unless the pod says otherwise (kitfs mount's rule).
    verify = context.get("verify", "strict" if key or identity else "lazy")
    if verify not in VERIFY_MODES:
        raise invalid(f"volume attribute verify={verify!r}: use strict or lazy")
    prefetch = context.get("prefetch", "model")
    if prefetch not in PREFETCH_MODES:
        raise invalid(f"volume attribute prefetch={prefetch!r}: use model, none or all")
    if key and not is_pem(key):
        raise invalid("volume attribute signatureKey: the PEM text of a cosign public key "
                      "(-----BEGIN PUBLIC KEY-----...), not a file name: pods do not see "
                      "the node's files")
    try:
        ignore = parse_bool(context.get("signatureIgnoreTlog", ""), "signatureIgnoreTlog")
    except UsageError as exc:
        raise invalid(f"volume attribute {exc}") from None
    return Attributes(text, filter_, verify, prefetch, key, identity,
                      context.get("signatureIssuer", "").strip(), ignore)


def secret_auths(secrets: Mapping[str, str]) -> dict[str, Any] | None:
    """The registry entries of the pod's nodePublishSecretRef; None without a secret.

    Messages name keys, never values: they end up in pod events and logs.
    """
    if not secrets:
        return None
    raw = next((secrets[k] for k in SECRET_KEYS if k in secrets), None)
    if raw is None:
        raise invalid(f"the volume's secret has no {SECRET_KEYS[0]} key (it has "
                      f"{', '.join(sorted(secrets))}); use a kubernetes.io/dockerconfigjson "
                      "secret")
    try:
        doc = json.loads(raw)
    except ValueError:
        raise invalid(f"the volume's secret: {SECRET_KEYS[0]} is not valid JSON") from None
    auths = doc.get("auths", doc) if isinstance(doc, dict) else None
    entries = {
        str(host): {f: entry[f] for f in ENTRY_FIELDS if isinstance(entry.get(f), str)}
        for host, entry in (auths.items() if isinstance(auths, dict) else ())
        if isinstance(entry, dict)
    }
    entries = {host: entry for host, entry in entries.items() if entry}
    for host, entry in entries.items():
        try:  # as the daemon will read it, so a bad one fails here, as the pod's mistake
            entry_credential(entry, "the volume's secret")
        except LocalStorageError:
            raise invalid(f"the volume's secret: the auth of registry {host!r} is not "
                          "base64 of USER:PASSWORD") from None
    if not entries:
        raise invalid(f"the volume's secret: {SECRET_KEYS[0]} holds no registry credentials "
                      "(expected {\"auths\": {\"REGISTRY\": {\"auth\": ...}}})")
    return entries


async def _resolve(ref: Reference, options: ClientOptions) -> str:
    """The manifest digest, once these credentials have reached every blob it names here.

    The node's chunk cache is content addressed and daemons are shared, so reading the
    manifest alone proves too little: anyone can serve a copy of a private manifest from
    a registry of their own. HEAD of the config and of every layer in this repository,
    with these credentials, is what the daemon's own reads would need (every layer, not
    only those the filter selects: a superset, and it needs no config parsing).
    """
    async with RegistryClient(ref.registry, options) as client:
        manifest, _, digest = await client.resolve_modelkit(ref.repository, ref.target)
        try:
            blobs, _ = manifest_blobs(manifest)
        except FormatError as exc:
            raise invalid(f"{ref}: {exc}") from None
        for blob in blobs:  # one at a time: a handful of HEADs, and one plain error
            if await client.head_blob(ref.repository, blob.digest) is None:
                raise NotFoundError(f"{ref}: blob {blob.digest} is not in "
                                    f"{ref.registry}/{ref.repository}")
    return digest


@dataclass(frozen=True)
class Authorized:
    """What a publish may serve: the manifest digest, and (when signatures were checked)
    the digests of the parent ModelKits that passed, nearest first."""

    digest: str
    parents: tuple[str, ...] | None = None  # None: not checked


async def _resolve_checked(ref: Reference, options: ClientOptions,
                           gate: SignatureGate | None) -> Authorized:
    """_resolve, then the signature check of that very digest and of each parent its
    Kitfile names. The daemon is started (or joined) for the digest, never the tag; it
    resolves parents itself, so publish compares what it serves with what passed here."""
    digest = await _resolve(ref, options)
    if gate is None:
        return Authorized(digest)
    gate.options = options  # the pod's credentials reach its signatures too
    async with open_modelkit(ref.with_digest(digest), options, where="remote", toc=False,
                             gate=gate) as (_, ins):
        return Authorized(digest, tuple(p.inspection.digest for p in ins.parents))


# -- the node -----------------------------------------------------------------------


def signature_flags(attrs: Attributes, trusted_root: str | None) -> SignatureFlags:
    """A volume's signature attributes as flags (no trusted root unless it asks for one)."""
    if not (attrs.signature_key or attrs.signature_identity or attrs.signature_issuer):
        return SignatureFlags()
    return SignatureFlags(
        key=attrs.signature_key or None, identity=attrs.signature_identity or None,
        issuer=attrs.signature_issuer or None, trusted_root=trusted_root,
        ignore_tlog=attrs.signature_ignore_tlog)


def _same_parents(daemon: DaemonRecord, authorized: Authorized) -> None:
    """Refuse to bind a daemon whose parent ModelKits are not the ones whose signatures
    were just checked (a parent's tag moved since, or the daemon found another copy)."""
    if authorized.parents is None:
        return
    state = read_state(Path(daemon.mountpoint))
    if state is not None and state.parents is None:
        raise SignatureError(
            f"{daemon.reference}: its daemon was started by an older kitfs, which does not "
            "say which parent ModelKits it serves; refusing to publish a signed volume on "
            "it (it stops when its last volume is unpublished)")
    serving = tuple(state.parents or ()) if state is not None else None
    if serving != authorized.parents:
        raise SignatureError(
            f"{daemon.reference}: the parent ModelKits served ({', '.join(serving or ())}) "
            f"are not those whose signatures were checked "
            f"({', '.join(authorized.parents)}); refusing to publish")


def _remove_dir(path: Path) -> None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc.strerror)


def _reap(pid: int) -> None:
    """Collect a daemon this process started (its zombie); one a previous server started is
    the supervisor's child, one the mounter started the mounter's: they collect it."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _is_ours(target: Path) -> bool:
    info = find_mount(target)
    return info is not None and info.fstype == FS_TYPE


class Node:
    """Publish and unpublish, safe to call from many threads at once."""

    def __init__(self, config: DriverConfig) -> None:
        self.config = config
        self.records = Records(config.state_dir, config.staging_dir)
        self.key_wait = KEY_WAIT
        #: stop_unused's last answer (Probe reports it without waiting for another).
        self.unused: tuple[str, ...] = ()

    def _key_locked(self, key: str, reference: str) -> contextlib.AbstractContextManager[None]:
        """The daemon's lock, waited for: other pods' volumes share it."""
        return self.records.locked(
            f"key:{key}", wait=self.key_wait,
            busy=f"the daemon for {reference}, shared with another volume on this node, is "
                 f"still starting or stopping after {self.key_wait:.0f}s (kubelet retries)")

    # -- daemons --------------------------------------------------------------------

    def serving(self, daemon: DaemonRecord) -> bool:
        """The daemon is alive and its mount is in place."""
        state = read_state(Path(daemon.mountpoint))
        return state is not None and state.alive and _is_ours(Path(daemon.mountpoint))

    def cache_dir(self, ref: Reference) -> Path:
        """The chunk cache of the daemons reading from `ref`'s repository: one per
        repository, under --cache-dir.

        The cache finds chunks, layouts and verified layers by digest alone, so a daemon
        sharing one with a daemon that read a private ModelKit serves those bytes without
        asking its registry: a pod naming a registry of its own that claims the same blobs
        (HEAD 200; _resolve cannot tell) would read them. Bytes read with access to one
        repository are therefore only ever served to daemons of that repository, whose
        users proved access to it.
        """
        if self.config.cache_scope == "node":  # the operator vouches for every pod
            return self.config.cache_dir
        name = f"{ref.registry.lower()}/{ref.repository}"
        return self.config.cache_dir / "repos" / hashlib.sha256(name.encode()).hexdigest()[:24]

    def _start(self, key: str, digest: str, attrs: Attributes,
               auths: dict[str, Any] | None) -> DaemonRecord:
        ref = parse_reference(attrs.reference)
        pinned = str(Reference(ref.registry, ref.repository, ref.tag, digest))
        mountpoint = self.config.staging_dir / key / "mnt"
        mountpoint.mkdir(mode=0o755, parents=True, exist_ok=True)
        home: Path | None = None
        if auths is not None:
            home = self.records.credentials_dir(key)
            save_auths(str(home), auths)
        record = DaemonRecord(key, pinned, digest, attrs, str(mountpoint),
                              str(home) if home is not None else None)
        self.records.save_daemon(record)  # first: a crash from here on leaves it to clean up
        config = MountConfig(
            reference=pinned, mountpoint=mountpoint, cache_dir=self.cache_dir(ref),
            client=self.config.client, filters=(attrs.filter,), prefetch=attrs.prefetch,
            verify=attrs.verify, allow_other=True,  # pods run as any user
            cache_size=self.config.cache_size,
        )
        kit_home = record.home or self.config.client.kitops_home
        try:
            if self.config.mounter is None:
                argv = daemon_argv(config, kitops_home=kit_home, verbose=self.config.verbose)
                # bounded as the mounter bounds it: a daemon that never says ready must
                # not hold this volume's locks and a publish slot forever
                state, _ = start_daemon(argv, mountpoint, self.config.daemon_env,
                                        timeout=LAUNCH_WAIT)
            else:  # fields, not flags: the mounter builds the command line itself
                env = self.config.daemon_env
                request = mount_request(config, key, home=kit_home, verbose=self.config.verbose,
                                        env=os.environ if env is None else env)
                state = request_daemon(self.config.mounter, request, mountpoint)
        except BaseException:
            try:
                self._stop(record)
            except MountError as exc:
                log.warning("cleaning up after the daemon for %s: %s", pinned, exc)
            raise
        log.info("started daemon pid %d for %s at %s", state.pid, pinned, mountpoint)
        return record

    def _stop(self, daemon: DaemonRecord) -> None:
        """Stop the daemon (or clean up after a dead one) and forget it. Key lock held."""
        mountpoint = Path(daemon.mountpoint)
        state = read_state(mountpoint)
        if state is not None or find_mount(mountpoint) is not None:
            # A daemon that will not stop keeps its record: the next unpublish, publish
            # or adoption tries again, rather than leaving a daemon nobody tracks.
            log.info("%s", umount(mountpoint))
            if state is not None:
                _reap(state.pid)
        self.records.drop_daemon(daemon.key)
        _remove_dir(mountpoint)
        _remove_dir(mountpoint.parent)

    def _daemon_for(self, key: str, digest: str, attrs: Attributes,
                    auths: dict[str, Any] | None) -> DaemonRecord:
        """The daemon serving `key`, started if none is. Key lock held."""
        existing = self.records.daemon(key)
        if existing is not None:
            if self.serving(existing):
                return existing
            log.warning("the daemon for %s is gone; starting a new one", existing.reference)
            self._stop(existing)
        return self._start(key, digest, attrs, auths)

    # -- volumes --------------------------------------------------------------------

    def _authorize(self, attrs: Attributes, auths: dict[str, Any] | None,
                   policies: tuple[Policy, ...] | None = None) -> Authorized:
        """The manifest digest, resolved with this request's credentials, and its
        signatures checked when the volume or the node's policy asks for them."""
        ref = parse_reference(attrs.reference)
        gate = self._gate(attrs, policies)
        if auths is None:
            return trio.run(_resolve_checked, ref, self.config.client, gate)
        name = "request-" + uuid.uuid4().hex
        home = self.records.credentials_dir(name)
        try:
            save_auths(str(home), auths)
            return trio.run(_resolve_checked, ref,
                            replace(self.config.client, kitops_home=str(home)), gate)
        finally:
            self.records.drop_credentials(name)

    def _gate(self, attrs: Attributes,
              policies: tuple[Policy, ...] | None) -> SignatureGate | None:
        """The check this volume needs: its attributes' and the node policy's (read again
        for every publish, so an edited policy applies to the next pod)."""
        flags = signature_flags(attrs, self.config.trusted_root)
        problem = flags.problem(ATTRIBUTE_NAMES)
        if problem is not None:
            raise invalid(f"volume attributes: {problem}")
        try:
            return signature_gate(flags, ATTRIBUTE_NAMES, self.config.client,
                                  policies=policies)
        except UsageError as exc:
            if flags.trusted_root and "--trusted-root" in str(exc):
                raise PolicyError(str(exc)) from None  # the node's file, not the pod's
            raise

    def _leave(self, volume: VolumeRecord) -> None:
        """Undo one volume; the last user of a daemon stops it. Key lock held."""
        target = Path(volume.target)
        binds.unbind(target)
        _remove_dir(target)
        self.records.drop_volume(volume.target)
        if not self.records.users(volume.key):
            daemon = self.records.daemon(volume.key)
            if daemon is not None:
                self._stop(daemon)

    def stop_unused(self) -> list[str]:
        """Stop daemons no volume uses (one that would not stop at adoption or at its last
        unpublish); the references of those still running without users, also kept in
        `unused` for Probe.

        Called at adoption and then every few seconds by the server's sweeper thread, so
        a daemon that could not be stopped once is tried again rather than left to run
        untracked - never inside a call: each stop may wait out umount's timeout. One whose
        key another call holds is left for the next time.
        """
        used = {v.key for v in self.records.volumes()}
        left = []
        for daemon in self.records.daemons():
            if daemon.key in used:
                continue
            try:
                with self.records.locked(f"key:{daemon.key}"):
                    again = self.records.daemon(daemon.key)
                    if again is not None and not self.records.users(daemon.key):
                        log.info("stopping the daemon for %s: no volume uses it",
                                 daemon.reference)
                        self._stop(again)
            except Busy:
                continue
            except (MountError, OSError) as exc:
                log.warning("cannot stop the unused daemon for %s: %s", daemon.reference, exc)
                left.append(daemon.reference)
        self.unused = tuple(left)
        return left

    def publish(self, volume_id: str, target: Path, attrs: Attributes,
                auths: dict[str, Any] | None, pod: str = "",
                policies: tuple[Policy, ...] | None = None) -> None:
        """Serve `attrs`' ModelKit at `target`; `policies`: the node's, as read for this
        request (None: read them now)."""
        with self.records.locked(f"target:{target}"):
            existing = self.records.volume(str(target))
            if existing is not None:
                if existing.volume_id != volume_id or existing.attributes != attrs:
                    raise CsiError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"{target} is already published as volume {existing.volume_id} "
                        f"({existing.attributes.reference}); unpublish it first")
                daemon = self.records.daemon(existing.key)
                if daemon is not None and self.serving(daemon) and _is_ours(target):
                    return
                log.warning("republishing %s: its mount or its daemon is gone", target)
                with self._key_locked(existing.key, existing.attributes.reference):
                    self._leave(existing)
            elif find_mount(target) is not None:
                raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"{target} is already a mount point that kitfs did not make")
            authorized = self._authorize(attrs, auths, policies)
            digest = authorized.digest
            key = daemon_key(digest, attrs)
            with self._key_locked(key, attrs.reference):
                daemon = self._daemon_for(key, digest, attrs, auths)
                volume = VolumeRecord(volume_id, str(target), key, attrs, pod)
                self.records.save_volume(volume)
                try:
                    _same_parents(daemon, authorized)
                    target.mkdir(mode=0o755, exist_ok=True)
                    binds.bind_readonly(Path(daemon.mountpoint), target)
                except BaseException:
                    self._leave(volume)
                    raise
            log.info("published %s (%s) at %s for %s", attrs.reference, digest, target,
                     pod or volume_id)

    def unpublish(self, target: Path) -> None:
        with self.records.locked(f"target:{target}"):
            volume = self.records.volume(str(target))
            if volume is None:
                if _is_ours(target):  # a bind whose record was lost
                    binds.unbind(target)
                _remove_dir(target)
                return
            with self._key_locked(volume.key, volume.attributes.reference):
                self._leave(volume)
            log.info("unpublished %s (%s)", target, volume.attributes.reference)

    # -- after a restart ------------------------------------------------------------

    def adopt(self) -> None:
        """Take over what an earlier server left: its volumes, their daemons."""
        self.records.drop_leftover_credentials()
        self.stop_unused()  # one that will not stop is logged, kept, retried, probed
        volumes = self.records.volumes()
        for daemon in self.records.daemons():
            users = [v for v in volumes if v.key == daemon.key]
            if not users:
                continue
            alive = self.serving(daemon)
            log.info("adopted the daemon for %s serving %d volume(s)%s", daemon.reference,
                     len(users), "" if alive else " (it is gone: a publish remounts it, an "
                     "unpublish cleans up)")
        for volume in volumes:
            if not _is_ours(Path(volume.target)):
                log.warning("volume %s at %s is not mounted; unpublish cleans it up",
                            volume.volume_id, volume.target)


# -- the gRPC service -----------------------------------------------------------------


def target_path(text: str) -> Path:
    """The request's target_path, which must be the canonical path kubelet made.

    Records are keyed by it and bind mounts made on it: a path with `..`, a symlink in its
    parents or a symlink as its last component would put the mount (or the unmount)
    somewhere other than the path the record names.
    """
    if not text or not os.path.isabs(text):
        raise invalid(f"target_path {text!r} is not an absolute path")
    canonical = absolute_mountpoint(text)
    if str(canonical) != text:
        raise invalid(f"target_path {text!r} is not canonical (it is {str(canonical)!r}): "
                      "no '..', '.', '//' or symbolic links in it")
    if os.path.islink(text):
        raise invalid(f"target_path {text!r} is a symbolic link")
    return canonical



class NodeService(csi_pb2_grpc.NodeServicer):
    """The Node RPCs; at most `slots` publishes and unpublishes run at once.

    Each may take minutes (a registry, a daemon starting, an umount timing out) and
    kubelet starts a node's pods in parallel: without a bound they could hold every gRPC
    worker, and Probe (the plugin's readiness) and NodeGetCapabilities would queue
    behind them. One past the bound is answered RESOURCE_EXHAUSTED at once, which
    kubelet retries with backoff.
    """

    def __init__(self, node: Node, slots: int) -> None:
        self.node = node
        self.slots = slots
        self._free = threading.BoundedSemaphore(slots)

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        if not self._free.acquire(blocking=False):
            raise CsiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"{self.slots} volume publishes and unpublishes are already in "
                           "progress on this node; kubelet retries")
        try:
            yield
        finally:
            self._free.release()

    @rpc
    def NodePublishVolume(self, request: Any, context: Any) -> Any:
        if not request.volume_id:
            raise invalid("volume_id is missing")
        target = target_path(request.target_path)
        if not request.HasField("volume_capability"):
            raise invalid("volume_capability is missing")
        if request.volume_capability.HasField("block"):
            raise invalid("block access is not supported: a ModelKit volume is a file system "
                          "(use a mount volume)")
        attrs = parse_attributes(request.volume_context)
        policies = load_policies(os.environ)  # once: the verify default and the check agree
        if "verify" not in request.volume_context and may_require(
                signature_flags(attrs, None), policies):
            attrs = replace(attrs, verify="strict")  # a signed volume serves verified bytes
        auths = secret_auths(request.secrets)
        pod = "/".join(request.volume_context.get(KUBELET_PREFIX + k, "")
                       for k in ("pod.namespace", "pod.name")).strip("/")
        with self._slot():
            self.node.publish(request.volume_id, target, attrs, auths, pod, policies)
        return csi_pb2.NodePublishVolumeResponse()

    @rpc
    def NodeUnpublishVolume(self, request: Any, context: Any) -> Any:
        if not request.volume_id:
            raise invalid("volume_id is missing")
        target = target_path(request.target_path)
        with self._slot():
            self.node.unpublish(target)
        return csi_pb2.NodeUnpublishVolumeResponse()

    @rpc
    def NodeGetCapabilities(self, request: Any, context: Any) -> Any:
        # No staging (each publish is self-contained), no stats, no expansion.
        return csi_pb2.NodeGetCapabilitiesResponse()

    @rpc
    def NodeGetInfo(self, request: Any, context: Any) -> Any:
        return csi_pb2.NodeGetInfoResponse(node_id=self.node.config.node_id)


answer_unimplemented(NodeService, csi_pb2_grpc.NodeServicer)
