"""Errors to gRPC status codes, with a message a user can act on.

kubelet shows a failed NodePublishVolume's message in the pod's events, so
the message is kitfs's own one line (never a traceback), and the code says
what kind of trouble it is: a bad volume attribute, credentials, a registry
that is down. Anything unexpected is INTERNAL and logged with its traceback.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from kitfs.csi.mounter import MounterUnavailable
from kitfs.csi.volumes import Busy
from kitfs.errors import (
    AccessDeniedError,
    AuthError,
    BadReferenceError,
    KitfileError,
    KitfsError,
    NotFoundError,
    PolicyError,
    RegistryBusyError,
    SignatureError,
    UnreachableError,
    UsageError,
)

log = logging.getLogger(__name__)

R = TypeVar("R")


class CsiError(Exception):
    """A failure the driver itself decides on, with its gRPC code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def invalid(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The code and message a failed call answers with."""
    if isinstance(exc, CsiError):
        return exc.code, str(exc)
    if isinstance(exc, Busy):
        return grpc.StatusCode.ABORTED, str(exc)
    if isinstance(exc, PolicyError):  # the node's policy file: not the pod's fault
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, BadReferenceError | KitfileError | UsageError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    # 403 is checked first: it is an AuthError too, but logging in again will not help.
    if isinstance(exc, AccessDeniedError | SignatureError):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    if isinstance(exc, AuthError):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc)
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, UnreachableError | MounterUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    # A rate limit is a quota (Docker Hub's pull limit): RESOURCE_EXHAUSTED tells the
    # operator so, where UNAVAILABLE would read as an outage. kubelet retries both.
    if isinstance(exc, RegistryBusyError):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if exc.status == 429 else \
            grpc.StatusCode.UNAVAILABLE
        return code, str(exc)
    if isinstance(exc, KitfsError):
        return grpc.StatusCode.INTERNAL, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def rpc(method: Callable[[Any, Any, Any], R]) -> Callable[[Any, Any, Any], R]:
    """Make a servicer method answer every failure with its status code and one line."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: Any) -> R:
        try:
            return method(self, request, context)
        except Exception as exc:
            code, message = status_of(exc)
            if isinstance(exc, KitfsError | CsiError | Busy):
                log.warning("%s failed: %s: %s", method.__name__, code.name, message)
            else:
                log.error("%s failed", method.__name__, exc_info=exc)
            context.abort(code, message)
            raise AssertionError("context.abort returned") from exc

    return wrapper


def answer_unimplemented(service: type, base: type) -> None:
    """Give `service` every RPC of its generated `base` it does not define, answering
    UNIMPLEMENTED (the generated ones say so too, but grpc logs a traceback for each)."""

    def make(name: str) -> Callable[[Any, Any, Any], Any]:
        def unimplemented(self: Any, request: Any, context: Any) -> Any:
            context.abort(grpc.StatusCode.UNIMPLEMENTED,
                          f"{name} is not implemented: kitfs is a node-only driver for "
                          "inline ephemeral volumes")

        unimplemented.__name__ = name
        return unimplemented

    for name in vars(base):
        if name[:1].isupper() and name not in vars(service):
            setattr(service, name, make(name))
