"""Typed client exceptions, one per gRPC status code, with google.rpc BadRequest field violations."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field: its name (e.g. "top_p", "prompt") and what is wrong with it."""

    field: str
    description: str


class NextCharError(Exception):
    """A failed call. `code` is the gRPC status code, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str,
                 field_violations: tuple[FieldViolation, ...] = ()) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.field_violations = field_violations


class InvalidArgument(NextCharError):
    """The request was bad; `field_violations` names each field at fault."""


class NotFound(NextCharError):
    """No such model or version."""


class FailedPrecondition(NextCharError):
    """The model version exists but cannot be served (e.g. a damaged file)."""


class ResourceExhausted(NextCharError):
    """The server is at its concurrency limit, or a message was too large."""


class Unavailable(NextCharError):
    """The server is unreachable or shutting down; retrying elsewhere or later may work."""


class DeadlineExceeded(NextCharError):
    """The call's deadline passed; the server stopped the work."""


class Cancelled(NextCharError):
    """The call was cancelled."""


class Unauthenticated(NextCharError):
    """The server wants a bearer token (--token / NEXTCHAR_TOKEN), or the one sent is wrong."""


class PermissionDenied(NextCharError):
    """The caller may not make this call (e.g. Admin from another host without a token)."""


class Internal(NextCharError):
    """A server bug (or another unexpected status)."""


_BY_CODE: dict[grpc.StatusCode, type[NextCharError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def _violations(metadata) -> tuple[FieldViolation, ...]:
    for key, value in metadata or ():
        if key != _DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        found: list[FieldViolation] = []
        for detail in status.details:
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(bad):
                found.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
        return tuple(found)
    return ()


def from_rpc_error(error: grpc.RpcError) -> NextCharError:
    """A grpc.RpcError (sync) or grpc.aio.AioRpcError as the matching NextCharError subclass."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    metadata = error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else ()
    cls = _BY_CODE.get(code, Internal)
    return cls(code, details or "", _violations(metadata))


_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def from_status(code: int, details: str, field: str = "") -> NextCharError:
    """A status carried inside a message (a Session's per-request error) as its NextCharError subclass."""
    status = _BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    violations = (FieldViolation(field, details.removeprefix(f"{field}: ")),) if field else ()
    return _BY_CODE.get(status, Internal)(status, details, violations)
