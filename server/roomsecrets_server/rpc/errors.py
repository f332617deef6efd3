"""The one table from domain errors to gRPC status codes, and the status builder.

Every error carries google.rpc.ErrorInfo (reason + domain); an invalid field also carries
google.rpc.BadRequest naming it. Messages come from the domain and never hold secret values.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from .. import errors as e

ERROR_DOMAIN = "roomsecrets.dev"
# UTF-8 bytes of a message (and of a field name) a status carries at most. It travels in the
# trailers twice (percent-encoded, up to 3x, and base64-encoded in the details, twice for
# INVALID_ARGUMENT), and a gRPC client starts refusing trailers past 8 KiB: the caller would see
# RESOURCE_EXHAUSTED "Stream removed" instead of the error (messages may quote a caller's name,
# key, path or rejection reason). 1200 bytes take at most ~7.2 KiB.
MAX_MESSAGE = 1200
MAX_FIELD = 128

STATUS_CODES: dict[type[e.DomainError], grpc.StatusCode] = {
    e.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    e.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    e.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    e.RequestRejected: grpc.StatusCode.PERMISSION_DENIED,
    e.NotFound: grpc.StatusCode.NOT_FOUND,
    e.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    e.EtagMismatch: grpc.StatusCode.ABORTED,
    e.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    e.RequestTimedOut: grpc.StatusCode.DEADLINE_EXCEEDED,
    e.IntegrityError: grpc.StatusCode.DATA_LOSS,
    e.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    e.Unavailable: grpc.StatusCode.UNAVAILABLE,
    e.NotImplementedYet: grpc.StatusCode.UNIMPLEMENTED,
}


def status_code(error: e.DomainError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def _bounded(text: str, limit: int) -> str:
    raw = text.encode()
    return text if len(raw) <= limit else raw[: limit - 3].decode(errors="ignore") + "…"


def to_status(error: e.DomainError) -> grpc.Status:
    code = status_code(error)
    message = _bounded(error.message, MAX_MESSAGE)
    details = [error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN)]
    if isinstance(error, e.InvalidArgument):
        field = _bounded(error.field, MAX_FIELD)
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=packed))
