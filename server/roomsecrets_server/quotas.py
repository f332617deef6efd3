"""Quotas: how much one identity, and one room, may store and ask for. The policy, in one place.

Limits (each a serve flag --max-..., and ROOMSECRETS_MAX_... like every serve flag):

- secrets, and bytes of secret values, one identity owns in a room (10,000 / 64 MiB): a
  participant, an agent or a tool needs hundreds, not tens of thousands (ListSecrets pages hold
  at most 1,000); 64 MiB is 64 values of the largest size (--max-value-bytes) or 10,000 of 6 KiB;
- secrets and bytes in a room (100,000 / 1 GiB): ten identities at their own limits;
- pending requests one identity has asked in a room (32): an agent fanning out questions to
  humans waits for answers before it asks more; 32 covers any real workflow;
- pending requests addressed to one identity in a room (64): each may prompt a human, who cannot
  answer more than a few dozen at once; two requesters at their limit;
- open WatchRequests streams of one identity in a room (16): a participant runs a few clients
  (app, CLI, agent) and overlaps old and new streams while reconnecting; each idle stream holds
  ~27 KiB of server memory.

What counts: every row in a participant room, whoever writes it — SetSecret (for_identity: the
owner's), answers to requests, OAuth token sets, connectors (owner "", the room's server-held
records), template variables (the service identity's). An answer (ProvideSecret) and an OAuth
token set count against the asked identity, who owns the row: it chose to answer, and may delete
the row (DeleteSecret / DeleteRequestedSecret) to make room; the requester cannot grow it without
that consent, and each of its questions is one pending request of its own limit. When the asked
identity is full, its answer is refused and the request stays pending. Project records (room "")
are not counted: only a project's admins and developers write them, never a participant, and
room "" holds every project, so a room limit there would let one project starve the others.

Enforcement is exact and atomic: the store keeps the counters in the transaction of each write
and refuses, in that transaction, a write that would pass a cap (store/base.py UsageCaps), so no
write path can bypass the policy, concurrent writes (on any replica) cannot overshoot, and a
refused write writes nothing. A write that does not grow a counter (deleting, replacing a value
with one of the same or a smaller size) is never refused, even above a limit lowered since. The
streams limit is counted per server process (a participant may hold that many on each replica).

A refusal is RESOURCE_EXHAUSTED with ErrorInfo reason QUOTA_EXCEEDED, and a message naming the
limit, its value and its flag — never a value.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .config import Settings
from .errors import ResourceExhausted
from .store.base import UsageCaps

QUOTA_EXCEEDED = "QUOTA_EXCEEDED"


class QuotaExceeded(ResourceExhausted):
    reason = QUOTA_EXCEEDED


@dataclass(frozen=True, slots=True)
class Limit:
    setting: str  # the Settings field; the flag and the environment variable derive from it
    what: str  # the limit, as a message names it
    reached: str  # why this write is refused ({who}: the identity, or the room's connectors)
    advice: str

    @property
    def flag(self) -> str:
        return "--" + self.setting.replace("_", "-")

    @property
    def env(self) -> str:
        return "ROOMSECRETS_" + self.setting.upper()


# By the name the store's caps give them (UsageCaps fields), and watch_streams.
LIMITS: dict[str, Limit] = {
    "owner_secrets": Limit(
        "max_secrets_per_identity",
        "secrets one identity may own in a room",
        "{who} owns that many in this room",
        "delete some of them first",
    ),
    "owner_bytes": Limit(
        "max_bytes_per_identity",
        "bytes of secret values one identity may own in a room",
        "this value would take {who} past it in this room",
        "delete or shrink some of its secrets first",
    ),
    "room_secrets": Limit(
        "max_secrets_per_room",
        "secrets a room may hold",
        "this room holds that many",
        "delete some secrets in this room first",
    ),
    "room_bytes": Limit(
        "max_bytes_per_room",
        "bytes of secret values a room may hold",
        "this value would take this room past it",
        "delete or shrink some secrets in this room first",
    ),
    "pending_asked": Limit(
        "max_pending_asked",
        "pending requests one identity may have asked in a room",
        "{who} has that many waiting for an answer in this room",
        "wait for answers (or cancel a request) before asking more",
    ),
    "pending_addressed": Limit(
        "max_pending_addressed",
        "pending requests one identity may be asked in a room",
        "{who} has that many to answer in this room",
        "ask again once it has answered some",
    ),
    "project_manifest_bytes": Limit(
        "max_manifest_bytes_per_project",
        "bytes of service manifests a project may hold",
        "this manifest would take the project past it",
        "delete or shrink some manifests first",
    ),
    "watch_streams": Limit(
        "max_watch_streams",
        "WatchRequests streams one identity may hold open in a room, on one server process",
        "{who} has that many open",
        "close one first",
    ),
}


class Quotas:
    def __init__(self, settings: Settings) -> None:
        self._values = {name: int(getattr(settings, limit.setting)) for name, limit in LIMITS.items()}
        self.caps = UsageCaps(
            **{f.name: self._values[f.name] for f in fields(UsageCaps) if f.name in self._values},
            refusal=self.refusal,
        )

    def refusal(self, name: str, room: str, identity: str) -> QuotaExceeded:
        """The error a write refused by limit `name` fails with; `identity` is whose counter it
        is (`room`, a store key, is not shown: the caller knows its room)."""
        limit, value = LIMITS[name], self._values[name]
        amount = f"{value} bytes ({_size(value)})" if "bytes" in limit.what else str(value)
        who = f"identity {identity!r}" if identity else "the room's OAuth connectors"
        if name == "project_manifest_bytes":
            who = f"project {identity!r}"
        return QuotaExceeded(
            f"quota exceeded: at most {amount} {limit.what} (serve flag {limit.flag}, env {limit.env}), "
            f"and {limit.reached.format(who=who)}; {limit.advice}"
        )

    def check_manifest_bytes(self, project: str, total: int) -> None:
        """Before a manifest is stored, with `total` the bytes of the project's manifests then."""
        if total > self._values["project_manifest_bytes"]:
            raise self.refusal("project_manifest_bytes", "", project)

    def check_watch_streams(self, room: str, identity: str, open_now: int) -> None:
        """Before a WatchRequests stream of `identity` opens, with `open_now` already open."""
        if open_now >= self._values["watch_streams"]:
            raise self.refusal("watch_streams", room, identity)


def _size(value: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.4g} {unit}"
    return f"{value} B"
