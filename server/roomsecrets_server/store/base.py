"""The storage interface every backend implements, and the records it stores.

A backend keeps rows and enforces the few invariants that must hold atomically: primary keys,
the unique (type, name) per owner and delegation, etag check-and-set, and the pending -> closed
transition of a request (exactly one answer wins). It never sees plaintext: `sealed` is opaque.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol


class RequestState(enum.StrEnum):
    PENDING = "pending"
    PROVIDED = "provided"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


# Secret rows are NamedTuples: built on every read, and a tuple is several times cheaper to make
# than a frozen dataclass.
class SecretKey(NamedTuple):
    room: str
    owner: str
    delegated_to: str
    secret_id: str


class SecretRecord(NamedTuple):
    key: SecretKey
    type: str
    name: str
    etag: str
    crc32c: int
    size: int
    sealed: bytes
    update_time: float
    # Which key-encryption key wraps `sealed` (lets rewrap find old rows without opening them).
    kek_id: str


@dataclass(frozen=True, slots=True)
class RequestRecord:
    request_id: str
    room: str
    kind: str  # "secret" | "oauth"
    requested_by: str
    target: str
    url: str
    type: str
    delegate_to: str
    state: RequestState
    reason: str
    created: float
    deadline: float
    # Where a provided value was stored (owner is `target`).
    secret_id: str = ""
    # Sealed flow parameters (OAuth: client config, PKCE verifier, state); opaque to the store.
    params: bytes = b""


@dataclass(frozen=True, slots=True)
class WriteCondition:
    """Check-and-set precondition of a write: any, must be absent, or must have this etag."""

    etag: str | None = None
    absent: bool = False


ANY = WriteCondition()
ABSENT = WriteCondition(absent=True)


class Store(Protocol):
    async def open(self) -> None:
        """Connect and create or migrate the schema; OSError if the backend cannot be reached."""
        ...

    # -- secrets ------------------------------------------------------------------------------
    async def get_secret(self, key: SecretKey) -> SecretRecord | None:
        """Point read: the hot path of GetSecret; keep it cheap."""
        ...

    async def find_secrets(
        self, room: str, owner: str, delegated_to: str, type_: str, name: str
    ) -> list[SecretRecord]:
        """Lookup by (type, name) within one owner and delegation; `type_` "" matches any type.
        Returns at most two (enough to tell a unique match from an ambiguous one)."""
        ...

    async def list_secrets(
        self, room: str, identity: str, after: tuple[str, str, str] | None, limit: int
    ) -> list[SecretRecord]:
        """Secrets owned by or delegated to `identity`, ordered by (owner, delegated_to, secret_id),
        starting after that key. Metadata only: `sealed` is empty (a listing never opens values,
        and reading them would make a page cost grow with their size)."""
        ...

    async def list_owned(self, room: str, owner: str, type_: str, limit: int) -> list[SecretRecord]:
        """Secrets of exactly this owner with this type, not delegated, ordered by secret_id
        (server-held records such as OAuth connectors, whose owner is no participant)."""
        ...

    async def put_secret(self, record: SecretRecord, condition: WriteCondition) -> None:
        """Insert or replace. Raises EtagMismatch if `condition` fails and AlreadyExists if
        another secret of this owner and delegation has the same (type, name)."""
        ...

    async def delete_secret(self, key: SecretKey, condition: WriteCondition) -> bool:
        """False if absent; raises EtagMismatch if `condition.etag` is stale."""
        ...

    async def delete_secrets_by_name(
        self, room: str, owners_or_delegate: str, delegated_to: str, type_: str, name: str
    ) -> int:
        """Delete secrets with this (type, name, delegated_to) owned by `owners_or_delegate`, or,
        when `delegated_to` equals it, delegated to it by anyone. Returns how many."""
        ...

    # -- requests -----------------------------------------------------------------------------
    async def create_request(self, record: RequestRecord) -> None: ...

    async def get_request(self, request_id: str) -> RequestRecord | None: ...

    async def find_pending_request(
        self, room: str, requested_by: str, target: str, kind: str, url: str, type_: str, delegate_to: str
    ) -> RequestRecord | None: ...

    async def pending_requests_for(self, room: str, target: str, now: float) -> list[RequestRecord]: ...

    async def close_request(
        self,
        request_id: str,
        state: RequestState,
        reason: str,
        *,
        secret: SecretRecord | None = None,
        secret_condition: WriteCondition = ANY,
    ) -> bool:
        """Move a pending request to `state`; with `secret`, store it in the same transaction.
        False (and nothing written) if the request is no longer pending."""
        ...

    async def expire_due(self, now: float) -> list[RequestRecord]:
        """Close every pending request past its deadline as expired; return them."""
        ...

    # -- leases -------------------------------------------------------------------------------
    async def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Take the named lease for `ttl` seconds if it is free or expired (check-and-set in the
        store, so it holds across processes sharing it). True if `holder` now holds it."""
        ...

    async def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up, if `holder` still holds it."""
        ...

    # -- key rotation -------------------------------------------------------------------------
    async def sealed_not_under(self, root_id: str, limit: int) -> list[tuple[SecretKey, bytes]]:
        """Values sealed under neither key `root_id` nor one of its generations (to re-wrap)."""
        ...

    async def kek_samples(self) -> dict[str, bytes]:
        """One sealed value per key-encryption key that stored values use (the startup check that
        the keyring has, and opens, every key the data needs)."""
        ...

    async def reserve_wraps(self, kek_id: str, count: int) -> int:
        """Add `count` to the data keys wrapped under `kek_id` by any process, durably; returns
        the new total (crypto/rotation.py)."""
        ...

    async def wrap_counts(self) -> dict[str, int]:
        """Every key-encryption key's total of reserved wraps."""
        ...

    async def replace_sealed(self, key: SecretKey, old: bytes, new: bytes, kek_id: str) -> bool:
        """Swap the sealed blob if it is still `old` (re-wrapping never races a write)."""
        ...

    async def close(self) -> None: ...


# Records from rows in the column order both backends select: the SecretKey fields, then the
# rest of SecretRecord; RequestRecord in field order.
def secret_from_row(row: tuple[Any, ...]) -> SecretRecord:
    return SecretRecord(SecretKey(row[0], row[1], row[2], row[3]), *row[4:])


def request_from_row(row: tuple[Any, ...]) -> RequestRecord:
    return RequestRecord(
        request_id=row[0],
        room=row[1],
        kind=row[2],
        requested_by=row[3],
        target=row[4],
        url=row[5],
        type=row[6],
        delegate_to=row[7],
        state=RequestState(row[8]),
        reason=row[9],
        created=row[10],
        deadline=row[11],
        secret_id=row[12],
        params=bytes(row[13]),  # PostgreSQL hands bytea back as memoryview
    )


def listing_queries(
    columns: str, room: str, identity: str, after: tuple[str, str, str] | None, limit: int
) -> list[tuple[str, tuple[object, ...]]]:
    """The statements (with `?` placeholders) of one list_secrets page, each an index range scan:
    what `identity` owns (primary key order), and what others delegated to it (secrets_by_delegate
    order), each after the cursor. An `owner=? OR delegated_to=?` filter would instead walk the
    rows of every owner sorting after the cursor, other participants' included."""
    after_owner, after_delegate, after_id = after or ("", "", "")
    queries: list[tuple[str, tuple[object, ...]]] = []
    if after_owner <= identity:
        start = (after_delegate, after_id) if after_owner == identity else ("", "")
        queries.append(
            (
                f"SELECT {columns} FROM secrets WHERE room=? AND owner=? "
                "AND (delegated_to, secret_id) > (?,?) ORDER BY delegated_to, secret_id LIMIT ?",
                (room, identity, *start, limit),
            )
        )
    # Rows delegated to identity sort as (owner, identity, secret_id): after the cursor if owner is
    # greater, or equal with (identity, secret_id) greater (decided here, not by the database's
    # collation of two parameters).
    same_owner: tuple[str, tuple[object, ...]] = (
        ("TRUE", ())
        if identity > after_delegate
        else ("secret_id > ?", (after_id,))
        if identity == after_delegate
        else ("FALSE", ())
    )
    queries.append(
        (
            f"SELECT {columns} FROM secrets WHERE room=? AND delegated_to=? AND delegated_to <> '' "
            "AND owner <> ? AND owner >= ? "
            f"AND (owner > ? OR {same_owner[0]}) ORDER BY owner, secret_id LIMIT ?",
            (room, identity, identity, after_owner, after_owner, *same_owner[1], limit),
        )
    )
    return queries


def merge_listing(pages: list[list[SecretRecord]], limit: int) -> list[SecretRecord]:
    """One list_secrets page from the results of listing_queries."""
    rows = sorted(
        (r for page in pages for r in page), key=lambda r: (r.key.owner, r.key.delegated_to, r.key.secret_id)
    )
    return rows[:limit]
