"""Typed errors of the roomsecrets client.

Every failed call raises a `SecretsError` carrying the gRPC status code, the server's message and
the `google.rpc.ErrorInfo` reason (when the server sent one). Subclasses follow the status code,
and a few reasons get their own, more specific class:

    INVALID_ARGUMENT     InvalidArgumentError (``field`` names the offending field)
    NOT_FOUND            NotFoundError
    ALREADY_EXISTS       AlreadyExistsError
    UNAUTHENTICATED      UnauthenticatedError
    PERMISSION_DENIED    PermissionDeniedError
                         └ RequestRejectedError      (reason REQUEST_REJECTED)
    ABORTED              AbortedError
                         └ EtagMismatchError         (reason ETAG_MISMATCH)
    FAILED_PRECONDITION  FailedPreconditionError
                         ├ NotListeningError         (reason NOT_LISTENING)
                         ├ RequestCancelledError     (reason REQUEST_CANCELLED)
                         └ RequestNotPendingError    (reason REQUEST_NOT_PENDING)
    DEADLINE_EXCEEDED    DeadlineExceededError
    RESOURCE_EXHAUSTED   ResourceExhaustedError
    UNAVAILABLE          UnavailableError
    DATA_LOSS            DataLossError
                         └ ChecksumMismatchError     (raised by the client: a CRC32C did not match)
    UNIMPLEMENTED        UnimplementedError
    CANCELLED            CallCancelledError
    INTERNAL / UNKNOWN   InternalError / UnknownError

Messages never contain secret values: the server promises that for its messages, and the client
adds none.
"""

from __future__ import annotations

from typing import ClassVar, cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "CallCancelledError",
    "ChecksumMismatchError",
    "DataLossError",
    "DeadlineExceededError",
    "EtagMismatchError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "NotListeningError",
    "PermissionDeniedError",
    "RequestCancelledError",
    "RequestNotPendingError",
    "RequestRejectedError",
    "ResourceExhaustedError",
    "SecretsError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "error_from_rpc",
]


class SecretsError(Exception):
    """A call failed. `code` is the gRPC status code, `reason` the google.rpc.ErrorInfo reason."""

    default_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        code: grpc.StatusCode | None = None,
        message: str = "",
        reason: str | None = None,
        *,
        field: str | None = None,
    ) -> None:
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.message = message
        self.reason = reason
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, message={self.message!r}, reason={self.reason!r})"
        )


class InvalidArgumentError(SecretsError):
    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(SecretsError):
    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(SecretsError):
    default_code = grpc.StatusCode.ALREADY_EXISTS


class UnauthenticatedError(SecretsError):
    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(SecretsError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class RequestRejectedError(PermissionDeniedError):
    """The asked participant refused the request; `message` carries its reason."""


class AbortedError(SecretsError):
    default_code = grpc.StatusCode.ABORTED


class EtagMismatchError(AbortedError):
    """Check-and-set failed: the secret changed (or does not exist) since the etag was read."""


class FailedPreconditionError(SecretsError):
    default_code = grpc.StatusCode.FAILED_PRECONDITION


class NotListeningError(FailedPreconditionError):
    """The asked participant has no open WatchRequests stream (nobody could answer)."""


class RequestCancelledError(FailedPreconditionError):
    """The request was cancelled (e.g. the asked participant stopped listening)."""


class RequestNotPendingError(FailedPreconditionError):
    """The request was already answered, cancelled or expired."""


class DeadlineExceededError(SecretsError):
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhaustedError(SecretsError):
    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(SecretsError):
    default_code = grpc.StatusCode.UNAVAILABLE


class DataLossError(SecretsError):
    default_code = grpc.StatusCode.DATA_LOSS


class ChecksumMismatchError(DataLossError):
    """The CRC32C the server sent does not match the bytes received."""


class UnimplementedError(SecretsError):
    default_code = grpc.StatusCode.UNIMPLEMENTED


class CallCancelledError(SecretsError):
    default_code = grpc.StatusCode.CANCELLED


class InternalError(SecretsError):
    default_code = grpc.StatusCode.INTERNAL


class UnknownError(SecretsError):
    default_code = grpc.StatusCode.UNKNOWN


_BY_CODE: dict[grpc.StatusCode, type[SecretsError]] = {
    cls.default_code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        UnauthenticatedError,
        PermissionDeniedError,
        AbortedError,
        FailedPreconditionError,
        DeadlineExceededError,
        ResourceExhaustedError,
        UnavailableError,
        DataLossError,
        UnimplementedError,
        CallCancelledError,
        InternalError,
        UnknownError,
    )
}

_BY_REASON: dict[tuple[grpc.StatusCode, str], type[SecretsError]] = {
    (grpc.StatusCode.PERMISSION_DENIED, "REQUEST_REJECTED"): RequestRejectedError,
    (grpc.StatusCode.ABORTED, "ETAG_MISMATCH"): EtagMismatchError,
    (grpc.StatusCode.FAILED_PRECONDITION, "NOT_LISTENING"): NotListeningError,
    (grpc.StatusCode.FAILED_PRECONDITION, "REQUEST_CANCELLED"): RequestCancelledError,
    (grpc.StatusCode.FAILED_PRECONDITION, "REQUEST_NOT_PENDING"): RequestNotPendingError,
}


def error_class(code: grpc.StatusCode, reason: str | None) -> type[SecretsError]:
    if reason:
        specific = _BY_REASON.get((code, reason))
        if specific is not None:
            return specific
    return _BY_CODE.get(code, SecretsError)


def _details(error: grpc.RpcError) -> tuple[str | None, str | None]:
    """(ErrorInfo reason, BadRequest field) from the google.rpc.Status details, if any."""
    try:
        status = rpc_status.from_call(cast(grpc.Call, error))
    except Exception:  # malformed details: the code and message are still good
        return None, None
    if status is None:
        return None, None
    reason: str | None = None
    field: str | None = None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if reason is None and detail.Unpack(info):
            reason = str(info.reason) or None
            continue
        bad = error_details_pb2.BadRequest()
        if field is None and detail.Unpack(bad) and bad.field_violations:
            field = str(bad.field_violations[0].field) or None
    return reason, field


def error_from_rpc(error: grpc.RpcError) -> SecretsError:
    """The typed error for a failed call (sync or asyncio)."""
    code_of = getattr(error, "code", None)
    details_of = getattr(error, "details", None)
    code = code_of() if callable(code_of) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    message = details_of() if callable(details_of) else None
    reason, field = _details(error) if hasattr(error, "trailing_metadata") else (None, None)
    cls = error_class(code, reason)
    return cls(code, str(message or ""), reason, field=field)
