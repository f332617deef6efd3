"""Input validation shared by the domain services. Each check names the field it refuses."""

from __future__ import annotations

import re

from .errors import InvalidArgument

MAX_ID = 256
MAX_IDENTITY = 256
MAX_TYPE = 255
MAX_NAME = 2048
MAX_URL = 2048
MAX_REASON = 1024
MAX_ETAG = 128
DEFAULT_TYPE = "application/octet-stream"
# Types of the rows the server keeps itself (OAuth token sets, connectors, project records): no
# caller may write, request or delete a secret of such a type through the room Secrets API.
RESERVED_TYPE_PREFIX = "application/vnd.roomsecrets."

_ID = re.compile(r"[A-Za-z0-9._~:@/+=%-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _length(field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidArgument(field, f"must be at most {limit} characters (got {len(value)})")


def secret_id(value: str, field: str = "secret_id") -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    _length(field, value, MAX_ID)
    if not _ID.fullmatch(value):
        raise InvalidArgument(field, "may contain only letters, digits and . _ ~ : @ / + = % -")
    return value


def etag(value: str, field: str = "etag") -> str:
    """An etag for check-and-set, or empty for "any version". One that matches no version is
    ABORTED later (stale); only one that cannot be an etag at all is refused here."""
    return text(value, field, MAX_ETAG)


def identity(value: str, field: str, *, required: bool = False) -> str:
    """A participant identity (a token's `name`). Empty means 'none' unless required."""
    if not value:
        if required:
            raise InvalidArgument(field, "is required")
        return ""
    _length(field, value, MAX_IDENTITY)
    if _CONTROL.search(value) or value != value.strip():
        raise InvalidArgument(field, "must not contain control characters or surrounding spaces")
    return value


def text(value: str, field: str, limit: int, *, required: bool = False) -> str:
    if not value and required:
        raise InvalidArgument(field, "is required")
    _length(field, value, limit)
    if _CONTROL.search(value):
        raise InvalidArgument(field, "must not contain control characters")
    return value


def user_type(value: str, field: str = "type") -> str:
    """A secret type a caller may use: not one the server keeps for its own rows."""
    value = text(value, field, MAX_TYPE)
    if value.lower().startswith(RESERVED_TYPE_PREFIX):  # MIME types compare case-insensitively
        raise InvalidArgument(field, f"types starting with {RESERVED_TYPE_PREFIX!r} are kept by the server")
    return value


def secret_type(value: str, field: str = "type", *, default: str = DEFAULT_TYPE) -> str:
    return user_type(value, field) or default


def data(value: bytes, limit: int, field: str = "data") -> bytes:
    if len(value) > limit:
        raise InvalidArgument(field, f"is {len(value)} bytes; the limit is {limit} bytes")
    return value


def timeout(value: int, field: str = "timeout", *, default: int = 300, maximum: int = 86_400) -> int:
    if value < 0:
        raise InvalidArgument(field, "must not be negative")
    if value > maximum:
        raise InvalidArgument(field, f"must be at most {maximum} seconds")
    return value or default
