"""The error types every layer raises.

The CLI prints `str(error)` as one line and exits with `exit_code`; anything
that is not a `KitfsError` is a bug and gets a traceback in the log. Each
layer turns the failures of what it wraps (httpx, YAML, the file system) into
one of these so that no foreign exception reaches a user or a FUSE handler.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class KitfsError(Exception):
    """Base of every error kitfs reports to a user."""

    exit_code: int = 1


class UsageError(KitfsError):
    """The command line itself is wrong."""

    exit_code = 2


class BadReferenceError(KitfsError):
    """A ModelKit reference that `kit` would not accept either."""

    exit_code = 2


class KitfileError(KitfsError):
    """A Kitfile that `kit pack` would reject."""


class FormatError(KitfsError):
    """A manifest, config, tar stream or table of contents that is not what it claims."""


class RegistryError(KitfsError):
    """The registry answered, but not with what was asked for."""


class NotFoundError(RegistryError):
    """The registry has no such repository, manifest, tag or blob."""


class AuthError(RegistryError):
    """Credentials are missing, wrong or not enough for the operation."""


class AccessDeniedError(AuthError):
    """The registry took the credentials and still refused (HTTP 403): logging in again
    will not help, being granted access will (the CSI driver's PERMISSION_DENIED)."""


class RegistryBusyError(RegistryError):
    """The registry answered 5xx or 429 (after the retries): there, but not serving now.
    `status` tells which; trying again later may work (the CSI driver's UNAVAILABLE)."""

    def __init__(self, message: str, status: int = 503) -> None:
        # a default: helpers re-raise an error as type(exc)(new message)
        super().__init__(message)
        self.status = status


class UnreachableError(RegistryError):
    """The registry could not be reached, or stopped answering within the deadline."""


class BlockedError(UnreachableError):
    """Not reached, though it may well be up: its TLS could not be trusted (an impostor
    looks the same), a proxy refused the tunnel or our credentials, or kitfs's own
    connection pool had no room. kitfs/oci raises it where it knows the cause (the
    exception's type, not its message); an offline fallback must not treat it as an
    outage (kitfs/offline.py). A subclass, so re-raising as type(exc)(...) keeps it."""


class IntegrityError(KitfsError):
    """Bytes did not match the digest or length that vouches for them."""


class MirrorDataError(IntegrityError):
    """A registry mirror's bytes did not match their digest; that mirror is now skipped for
    the blob (oci/mirrors.py), so reading it again takes it from the next host."""


class SignatureError(KitfsError):
    """A signature check that was asked for could not be made or did not pass."""


class PolicyError(UsageError):
    """A signature policy file that cannot be used: every mount it governs is refused
    (the node's operator must fix it; the user's request was not at fault)."""


class LocalStorageError(KitfsError):
    """kit's local storage (or a file kitfs writes) could not be read or written."""


def leaf_errors(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """What failed inside (nested) exception groups, cancellations left out: the
    nurseries of a command or a daemon wrap a user's error in groups, and the one
    line a user sees must be that error, not the group."""
    import trio  # only here: the error types themselves need nothing

    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)

    collect(group)
    return leaves


def user_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error to report out of (nested) exception groups: an interrupt, else the
    first KitfsError, else the group itself (a bug, with all its tracebacks). The
    others are logged, so nothing disappears: other KitfsErrors at INFO (seen with
    -v), anything else as a warning with its traceback."""
    leaves = leaf_errors(group)
    chosen = next((e for e in leaves if isinstance(e, KeyboardInterrupt)), None) or next(
        (e for e in leaves if isinstance(e, KitfsError)), None)
    if chosen is None:
        return group
    for other in leaves:
        if other is chosen:
            continue
        if isinstance(other, KitfsError):
            # Parallel work meeting the same trouble (a full disk, a registry gone):
            # the user gets one line; -v shows the rest.
            log.info("also failed: %s", other)
        else:
            log.warning("also failed: %r", other, exc_info=other)
    return chosen
