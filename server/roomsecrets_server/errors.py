"""Domain errors. Services raise these; rpc/errors.py maps each to one gRPC status.

Messages are shown to callers: they name fields and ids, never secret values or tokens.
"""

from __future__ import annotations

from typing import TypeVar


class DomainError(Exception):
    """Base of every error a caller may see. `reason` goes into google.rpc.ErrorInfo.
    `audited`: the domain already wrote this refusal's audit line (rpc/gate.py writes none)."""

    reason = "ERROR"
    audited = False

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


E = TypeVar("E", bound=DomainError)


def audited(error: E) -> E:
    """`error`, marked as a refusal whose audit line the domain wrote (with its own detail)."""
    error.audited = True
    return error


class InvalidArgument(DomainError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Unauthenticated(DomainError):
    reason = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    reason = "PERMISSION_DENIED"


class NotFound(DomainError):
    reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    reason = "ALREADY_EXISTS"


class EtagMismatch(DomainError):
    """Check-and-set failed: the caller's etag is not the current one."""

    reason = "ETAG_MISMATCH"


class FailedPrecondition(DomainError):
    reason = "FAILED_PRECONDITION"


class RequestRejected(DomainError):
    """The asked participant refused a request."""

    reason = "REQUEST_REJECTED"


class RequestTimedOut(DomainError):
    reason = "REQUEST_EXPIRED"


class IntegrityError(DomainError):
    """A stored value failed authentication (tampered, moved, or wrong key)."""

    reason = "INTEGRITY_CHECK_FAILED"


class ResourceExhausted(DomainError):
    reason = "RESOURCE_EXHAUSTED"


class Unavailable(DomainError):
    reason = "STORE_UNAVAILABLE"


class NotImplementedYet(DomainError):
    reason = "NOT_IMPLEMENTED"
