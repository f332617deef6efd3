"""Storage backends. They store and return sealed bytes only: plaintext never reaches them."""

from .base import (
    ABSENT,
    ANY,
    RequestRecord,
    RequestState,
    SecretKey,
    SecretKind,
    SecretRecord,
    Store,
    WriteCondition,
)

__all__ = [
    "ABSENT",
    "ANY",
    "RequestRecord",
    "RequestState",
    "SecretKey",
    "SecretKind",
    "SecretRecord",
    "Store",
    "WriteCondition",
]
