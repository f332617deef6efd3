"""The storage interface every backend implements, and the records it stores.

A backend keeps rows and enforces the few invariants that must hold atomically: primary keys,
the unique (type, name) per owner and delegation, etag check-and-set, and the pending -> closed
transition of a request (exactly one answer wins). It never sees plaintext: `sealed` is opaque.

It also keeps usage counters — secret rows and value bytes per (room, owner) and per room — in
the transaction of every write that changes them (triggers on the secrets table, so every writer,
any process or version, keeps them right), and holds them, and the pending requests per identity,
to the caps it is opened with (`UsageCaps`): a write that would take one past its cap fails with
the cap's refusal and writes nothing. What the caps are, and how a refusal reads, is policy
(quotas.py). Project records (room "") are not counted.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
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


class SecretKind(enum.StrEnum):
    """Where a secret row came from. Kinds never share a (type, name): an answer to a request
    never replaces a secret its owner stored, and a template never replaces a secret it did not
    create. Bound into the sealed value's associated data (a row cannot change kind)."""

    STORED = ""  # SetSecret, and the server's own records (connectors, tokens, project records)
    ANSWER = "answer"  # ProvideSecret: an answer to a secret request, keyed by (url, type)
    TEMPLATE_VARIABLE = "template"  # an `obscure` ServiceTemplate variable, owned by the service


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
    kind: str = SecretKind.STORED


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


class Usage(NamedTuple):
    secrets: int
    bytes: int


def _no_refusal(cap: str, room: str, identity: str) -> Exception:
    return RuntimeError(f"usage cap {cap} reached ({room!r}, {identity!r})")


@dataclass(frozen=True, slots=True)
class UsageCaps:
    """Caps the store holds its counters to, in the transaction of the write that would pass one
    (0: none). Secrets and bytes count rows (and their `size`) in participant rooms, per owner and
    per room; a write is refused only for a counter it grows. Pending requests count those not
    past their deadline, per (room, requester) and per (room, target). A refused write fails with
    `refusal(cap, room, identity)` — cap: the field's name; identity: the owner, requester or
    target whose counter it is (for a room's cap, the owner of the row written) — and writes
    nothing."""

    owner_secrets: int = 0
    owner_bytes: int = 0
    room_secrets: int = 0
    room_bytes: int = 0
    pending_asked: int = 0
    pending_addressed: int = 0
    refusal: Callable[[str, str, str], Exception] = _no_refusal

    @property
    def secrets_capped(self) -> bool:
        return any((self.owner_secrets, self.owner_bytes, self.room_secrets, self.room_bytes))


NO_CAPS = UsageCaps()
# How a store's refusal of a capped secrets write names the cap (SQLite RAISE, PostgreSQL RAISE).
CAP_REACHED = "roomsecrets usage cap reached: "


class Store(Protocol):
    async def open(self, caps: UsageCaps = NO_CAPS) -> None:
        """Connect and create or migrate the schema (bringing the usage counters of an older
        database up to date); from then on hold writes to `caps`. OSError if the backend cannot
        be reached."""
        ...

    # -- secrets ------------------------------------------------------------------------------
    async def get_secret(self, key: SecretKey) -> SecretRecord | None:
        """Point read: the hot path of GetSecret; keep it cheap."""
        ...

    async def find_secrets(
        self, room: str, owner: str, delegated_to: str, kind: str, type_: str, name: str
    ) -> list[SecretRecord]:
        """Lookup by (type, name) among one owner's secrets of one kind and delegation; `type_` ""
        matches any type. Returns at most two (enough to tell a unique match from an ambiguous one)."""
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
        """Insert or replace. Raises EtagMismatch if `condition` fails, AlreadyExists if another
        secret of this owner, delegation and kind has the same (type, name), and the refusal of
        the cap it would pass (UsageCaps). A replacement no larger than the row it replaces
        costs the counters nothing."""
        ...

    async def delete_secret(self, key: SecretKey, condition: WriteCondition) -> bool:
        """False if absent; raises EtagMismatch if `condition.etag` is stale."""
        ...

    async def delete_answers(
        self, room: str, identity: str, delegated_to: str, type_: str, name: str
    ) -> list[SecretKey]:
        """Delete answers to requests (kind ANSWER, never other kinds) with this (type, name)
        that `identity` owns with delegation `delegated_to`, and, when `delegated_to` is
        `identity`, those delegated to it by anyone. Returns the keys deleted."""
        ...

    async def usage(self, room: str, owner: str | None = None) -> Usage:
        """The counters of `owner`'s secrets in `room`, or with owner None the room's."""
        ...

    # -- requests -----------------------------------------------------------------------------
    async def create_request(self, record: RequestRecord) -> None:
        """Store a pending request; refused (UsageCaps pending_asked / pending_addressed) if its
        requester or its target has as many pending in the room as the cap allows."""
        ...

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
        """Move a pending request to `state`; with `secret`, store it in the same transaction
        (held to the caps as put_secret is). False (and nothing written) if the request is no
        longer pending."""
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
