"""The one authority rule (SECURITY.md "Authority"): a value leaves the server, and the server acts
for someone, only on the authority of a principal entitled to it. Every kind of release asks here.

A principal's authority is what its token grants (`Principal`): held live by a caller, or recorded
when it configured something another principal uses, such as a manifest's author. Configuring
never amplifies: what a configuration releases is checked against its author's authority when it
is applied, and again when it is used, wherever the store can tell (the ownership and delegation
of a room secret are read from the store at use; grants are the author's as recorded).

The rules:
- a room secret is readable by its owner and by the one identity it is delegated to, in its room;
- acting for another identity (storing for it, minting a token naming it) needs room admin;
- a minted token carries no grant its minter lacks: `secrets` (with the minter's OAuth
  restriction), `admin`, in the minter's own room and project;
- project secret values (key values, registry passwords) are readable by project admins only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .. import validate
from ..errors import PermissionDenied
from .principal import Principal, principal_from_claims

# Grants a minted participant token may carry (manifest `token: {api: [...]}`).
MINTABLE_APIS = ("secrets", "admin")


# -- room secrets -------------------------------------------------------------------------------------
def readable_scope(p: Principal, delegated_to: str, delegated_by: str) -> tuple[str, str]:
    """(owner, delegated_to) of the secrets `p` may read when it names them this way: its own
    (with any delegation), or one that `delegated_by` delegated to it."""
    delegated_to = validate.identity(delegated_to, "delegated_to")
    delegated_by = validate.identity(delegated_by, "delegated_by")
    if not delegated_by or delegated_by == p.identity:
        return p.identity, delegated_to
    if delegated_to and delegated_to != p.identity:
        raise PermissionDenied("a delegated secret is readable only by its owner and its delegate")
    return delegated_by, p.identity


def reads_as(p: Principal, owner: str, delegated_to: str, *, template_variable: bool = False) -> str:
    """On which footing `p` reads a secret of `owner` delegated to `delegated_to` in its own room:
    "owner" or "delegate". Raises PermissionDenied for anyone else, and for a `p` without the
    `secrets` grant (a manifest's author, say, whose token had none).

    A ServiceTemplate's variable is stored under the identity the template's name gives, which
    its author chose: a participant who happens to hold that identity (or a developer who named a
    template after itself) must not read what an installer typed in. It is the service's: only a
    token of that service (project role `service`, service = the owner) reads it."""
    if p.secrets is None:
        raise PermissionDenied(f"{p.identity!r} has no 'secrets' API grant, which reading room secrets needs")
    if template_variable and not is_service(p, owner):
        raise PermissionDenied(
            f"this secret of {owner!r} holds a ServiceTemplate variable: only a token of service "
            f"{owner!r} itself (project role service) reads it"
        )
    if owner == p.identity:
        return "owner"
    if delegated_to and delegated_to == p.identity:
        return "delegate"
    raise PermissionDenied(
        f"{p.identity!r} may not read secrets of {owner!r}"
        + (f" delegated to {delegated_to!r}" if delegated_to else "")
        + " (only the owner and the one delegate may)"
    )


def is_service(p: Principal, identity: str) -> bool:
    """Whether `p` is the token of service `identity` itself (project role service, that name),
    the only reader of the ServiceTemplate variables stored under its identity. Listings hide
    those rows from anyone else: even a value's size and CRC32C tell a short value."""
    return p.project_role == "service" and p.service == identity == p.identity


def acts_for(p: Principal, identity: str, what: str) -> str:
    """On which footing `p` acts for `identity`: "self", or "room admin" (required for anyone
    else). Raises PermissionDenied naming `what`."""
    if not identity or identity == p.identity:
        return "self"
    if not p.admin:
        raise PermissionDenied(
            f"{what} names identity {identity!r}: acting for another identity needs the room "
            f"'admin' API grant, which {p.identity!r} lacks"
        )
    return "room admin"


# -- minted tokens ------------------------------------------------------------------------------------
def check_mints(p: Principal, identity: str, api: tuple[str, ...], what: str) -> None:
    """A token for `identity` with API grants `api` is within what `p` could hold or use itself."""
    acts_for(p, identity, what)
    unknown = [grant for grant in api if grant not in MINTABLE_APIS]
    if unknown:
        raise PermissionDenied(f"{what} asks for unknown API grant {unknown[0]!r}")
    if "secrets" in api and p.secrets is None:
        raise PermissionDenied(f"{what} asks for the 'secrets' API grant, which {p.identity!r} lacks")
    if "admin" in api and not p.admin:
        raise PermissionDenied(f"{what} asks for the room 'admin' API grant, which {p.identity!r} lacks")


def minted_oauth_restriction(p: Principal) -> list[dict[str, Any]] | None:
    """The `secrets.request_oauth_token` claim a token minted on `p`'s authority carries: `p`'s
    own restriction (None: none), so a minted token reaches no OAuth client `p` could not."""
    if p.secrets is None or p.secrets.request_oauth_token is None:
        return None
    return [_claim(dataclasses.asdict(entry)) for entry in p.secrets.request_oauth_token]


# -- project secrets ----------------------------------------------------------------------------------
def check_reads_project_values(p: Principal, what: str) -> None:
    if p.project_role != "admin":
        have = f"project role {p.project_role!r}" if p.project_role else "no project role"
        raise PermissionDenied(
            f"{what}: the values of project secret keys and pull secrets are readable by project "
            f"admins only, and {p.identity!r} has {have}"
        )


# -- recorded authority -------------------------------------------------------------------------------
def record_of(p: Principal) -> dict[str, Any]:
    """`p`'s authority as token claims, to keep with what it configures (sealed with it)."""
    api: dict[str, Any] = {}
    if p.secrets is not None:
        restriction = minted_oauth_restriction(p)
        api["secrets"] = {} if restriction is None else {"request_oauth_token": restriction}
    if p.admin:
        api["admin"] = {}
    grants: list[dict[str, Any]] = [
        {"name": "room", "scope": p.room_name},
        {"name": "role", "scope": p.role},
        {"name": "api", "scope": api},
    ]
    if p.project_role:
        project = {"role": p.project_role, **({"service": p.service} if p.service else {})}
        grants.append({"name": "project", "scope": project})
    return {"name": p.identity, "sub": p.project, "grants": grants}


def principal_of(record: Mapping[str, Any]) -> Principal:
    """The authority `record_of` kept, parsed by the same code as a token's claims."""
    return principal_from_claims({**record, "exp": 0})


def _claim(fields: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value}
