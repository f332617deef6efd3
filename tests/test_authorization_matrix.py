"""The authorization matrix, printed: every RPC of every service by every kind of credential, and
the room-secret operations by every kind of caller, on both stores. Whatever a caller may not
have, no reply or error of theirs ever carries it."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from roomsecrets.v1 import (
    oauth_connectors_pb2,
    oauth_connectors_pb2_grpc,
    project_secrets_pb2,
    project_secrets_pb2_grpc,
    room_secrets_pb2,
    room_secrets_pb2_grpc,
)
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets_server.auth.dev_key import ensure_dev_key

from .harness import Participants, ServerThread, test_settings

VALUE = b"matrix-value-3e8a1c"
Metadata = tuple[tuple[str, str], ...]

SERVICES = [
    (room_secrets_pb2, "RoomSecrets", room_secrets_pb2_grpc.RoomSecretsStub),
    (oauth_connectors_pb2, "OAuthConnectors", oauth_connectors_pb2_grpc.OAuthConnectorsStub),
    (project_secrets_pb2, "ProjectSecrets", project_secrets_pb2_grpc.ProjectSecretsStub),
]


def every_rpc(channel: grpc.Channel) -> Iterator[tuple[str, Callable[[Metadata], object]]]:
    """(Service/Method, call with metadata) for every RPC in the contract, with an empty request:
    credentials are checked before anything in the request is looked at."""
    pool = descriptor_pool.Default()
    for module, name, stub_class in SERVICES:
        service = module.DESCRIPTOR.services_by_name[name]
        stub = stub_class(channel)
        for method in service.methods:
            request: Message = GetMessageClass(pool.FindMessageTypeByName(method.input_type.full_name))()
            rpc = getattr(stub, method.name)
            if method.server_streaming:

                def call(md: Metadata, rpc: Any = rpc, request: Message = request) -> object:
                    return next(iter(rpc(request, metadata=md, timeout=10)))
            else:

                def call(md: Metadata, rpc: Any = rpc, request: Message = request) -> object:
                    return rpc(request, metadata=md, timeout=10)

            yield f"{name}/{method.name}", call


def outcome(call: Callable[[], object]) -> tuple[str, str]:
    """("OK" or the status name, everything the caller saw, for the leak check)."""
    try:
        reply = call()
    except grpc.RpcError as err:
        return err.code().name, f"{err.details()} {err.trailing_metadata()}"
    seen = reply.SerializeToString() if isinstance(reply, Message) else repr(reply).encode()
    return "OK", seen.decode(errors="replace")


def forged(room: Participants, **changes: Any) -> str:
    """A dev-key token for alice in room-1 with claims changed (or, with key=..., another key)."""
    kid, key = ensure_dev_key(room.server.settings.data_dir)
    claims = jwt.decode(room.token("alice"), options={"verify_signature": False})
    signing_key = changes.pop("key", key)
    claims.update(changes)
    return jwt.encode(claims, signing_key, algorithm="HS256", headers={"kid": kid})


def every_rpc_unauthenticated(
    channel: grpc.Channel, credentials: dict[str, Metadata], *, leak: str
) -> dict[str, list[str]]:
    """Calls every RPC with every credential; each must be UNAUTHENTICATED and never show `leak`.
    Prints the table (RPC x credential) and returns it."""
    table: dict[str, list[str]] = {}
    for rpc, call in every_rpc(channel):
        table[rpc] = []
        for kind, md in credentials.items():
            status, seen = outcome(functools.partial(call, md))
            table[rpc].append(status)
            assert status == "UNAUTHENTICATED", (rpc, kind, status)
            assert leak not in seen
    header = " | ".join(credentials)
    print(f"\n{'RPC':45} {header}\n" + "\n".join(f"{rpc:45} {' '.join(row)}" for rpc, row in table.items()))
    return table


def test_every_rpc_refuses_every_bad_credential(room: Participants) -> None:
    now = int(time.time())
    credentials: dict[str, Metadata] = {
        "no token": (),
        "malformed": (("authorization", "Bearer not.a.jwt"),),
        "other scheme": (("authorization", f"Basic {room.token('alice')}"),),
        "expired": (("authorization", f"Bearer {forged(room, iat=now - 7200, exp=now - 3600)}"),),
        "not yet valid": (("authorization", f"Bearer {forged(room, nbf=now + 3600)}"),),
        "bad signature": (("authorization", f"Bearer {forged(room, key=b'k' * 32)}"),),
        "no identity": (("authorization", f"Bearer {forged(room, name='')}"),),
        # Meant for another service: refused even though this server pins no audience.
        "other audience": (("authorization", f"Bearer {forged(room, aud='https://other.example')}"),),
    }
    table = every_rpc_unauthenticated(room.channel, credentials, leak="matrix")
    assert len(table) >= 14 + 4 + 14  # RoomSecrets, OAuthConnectors, ProjectSecrets


def test_every_rpc_refuses_a_valid_token_without_the_grant_it_needs(room: Participants) -> None:
    """No `secrets` API grant: every room and connector RPC is PERMISSION_DENIED. No `project`
    grant: every project RPC is PERMISSION_DENIED. Never a value."""
    room.stub.SetSecret(pb.SetSecretRequest(secret_id="s", data=VALUE), metadata=room.auth("alice"))
    no_secrets = room.auth("alice", secrets_grant=False)
    participant = room.auth("alice")  # secrets grant, no project grant
    table: dict[str, str] = {}
    for rpc, call in every_rpc(room.channel):
        md = participant if rpc.startswith("ProjectSecrets/") else no_secrets
        status, seen = outcome(functools.partial(call, md))
        table[rpc] = status
        assert status == "PERMISSION_DENIED", (rpc, status, seen)
        assert VALUE.decode() not in seen
    print("\n" + "\n".join(f"{rpc:45} {status}" for rpc, status in table.items()))


# -- room secrets x callers ---------------------------------------------------------------------------
# Each caller reaches for alice's secret `s` in room-1, delegated to bob, the strongest way its
# token allows: reads as owner, as delegate (delegated_by=alice) or for alice (for_identity, which
# needs room admin); writes as owner or for alice. Tokens of room-2 address room-2 only, where the
# same names are their own (a write there is fine and must not touch room-1).
FOR_ALICE = {"for_identity": "alice"}
CALLERS: dict[str, tuple[str, dict[str, Any], dict[str, str], dict[str, str]]] = {
    #                 identity  token                 read as                     write as
    "owner": ("alice", {}, {}, {}),
    "delegate": ("bob", {}, {"delegated_by": "alice"}, {"for_identity": "alice"}),
    "non-delegate": ("carol", {}, {"delegated_by": "alice"}, {"for_identity": "alice"}),
    "other room": ("alice", {"room": "room-2"}, {}, {}),
    "room admin": ("dave", {"admin": True}, FOR_ALICE, FOR_ALICE),
    "other room admin": ("dave", {"admin": True, "room": "room-2"}, FOR_ALICE, FOR_ALICE),
}  # fmt: skip

# ok | absent (NOT_FOUND, exists=false, not listed) | denied (PERMISSION_DENIED). From outside,
# a secret one may not see does not exist; acting for someone else without admin is denied.
# What the contract allows shapes the rows: the delegate reads through GetSecret(delegated_by) and
# ListSecrets, but Exists and DeleteSecret only address the caller's own secrets; a room admin
# acts for alice only where a request has for_identity (Exists, SetSecret), so even an admin
# cannot read alice's value. Tokens of room-2 write in room-2 (ok) and never touch room-1.
EXPECTED = {
    #                   get     exists  list    set     delete
    "owner":            "ok     ok      ok      ok      ok",
    "delegate":         "ok     absent  ok      denied  absent",
    "non-delegate":     "absent absent  absent  denied  absent",
    "other room":       "absent absent  absent  ok      ok",
    "room admin":       "absent ok      absent  ok      absent",
    "other room admin": "absent absent  absent  ok      absent",
}  # fmt: skip

NAMES = {"OK": "ok", "NOT_FOUND": "absent", "PERMISSION_DENIED": "denied"}


def only_fields(message: type[Message], args: dict[str, str]) -> dict[str, str]:
    """The arguments the request message has (GetSecret has delegated_by but no for_identity,
    DeleteSecret neither): a caller can only ask what the contract lets it ask."""
    return {k: v for k, v in args.items() if k in message.DESCRIPTOR.fields_by_name}


def attempt(room: Participants, caller: str, operation: str) -> tuple[str, str]:
    identity, token_args, read_as, write_as = CALLERS[caller]
    message = {
        "get": pb.GetSecretRequest,
        "exists": pb.ExistsRequest,
        "list": pb.ListSecretsRequest,
        "set": pb.SetSecretRequest,
        "delete": pb.DeleteSecretRequest,
    }[operation]
    read_as = only_fields(message, read_as)
    write_as = only_fields(message, write_as)
    md = room.auth(identity, **token_args)
    # The owner and the delegate address the row by its delegation; others have only alice's name.
    key: dict[str, str] = {"secret_id": "s"}
    if caller in ("owner", "room admin", "other room", "other room admin"):
        key["delegated_to"] = "bob"
    if operation == "get":
        status, seen = outcome(
            lambda: room.stub.GetSecret(pb.GetSecretRequest(**key, **read_as), metadata=md)
        )
        return NAMES.get(status, status), seen
    if operation == "exists":
        status, seen = outcome(lambda: room.stub.Exists(pb.ExistsRequest(**key, **read_as), metadata=md))
        if status == "OK":
            found = room.stub.Exists(pb.ExistsRequest(**key, **read_as), metadata=md).exists
            return ("ok" if found else "absent"), seen
        return NAMES.get(status, status), seen
    if operation == "list":
        status, seen = outcome(lambda: room.stub.ListSecrets(pb.ListSecretsRequest(), metadata=md))
        if status == "OK":
            listed = room.stub.ListSecrets(pb.ListSecretsRequest(), metadata=md).secrets
            return ("ok" if any(i.id == "s" and i.delegated_to == "bob" for i in listed) else "absent"), seen
        return NAMES.get(status, status), seen
    if operation == "set":
        request = pb.SetSecretRequest(data=b"overwritten", **key, **write_as)  # type: ignore[arg-type]
        status, seen = outcome(lambda: room.stub.SetSecret(request, metadata=md))
        return NAMES.get(status, status), seen
    request_d = pb.DeleteSecretRequest(**key, **write_as)
    status, seen = outcome(lambda: room.stub.DeleteSecret(request_d, metadata=md))
    return NAMES.get(status, status), seen


@pytest.mark.parametrize("caller", list(CALLERS))
def test_room_secret_access_by_caller(room: Participants, caller: str) -> None:
    alice = room.auth("alice")
    row: list[str] = []
    for operation in ("get", "exists", "list", "set", "delete"):
        room.stub.SetSecret(
            pb.SetSecretRequest(secret_id="s", delegated_to="bob", data=VALUE), metadata=alice
        )
        result, seen = attempt(room, caller, operation)
        row.append(result)
        may_read = caller in ("owner", "delegate")
        if not may_read:
            assert VALUE.decode() not in seen, (caller, operation)
        if operation in ("set", "delete") and caller not in ("owner", "room admin"):
            got = room.stub.GetSecret(pb.GetSecretRequest(secret_id="s", delegated_to="bob"), metadata=alice)
            assert got.data == VALUE, f"{caller}'s {operation} changed alice's secret"
    print(f"\n{caller:18} {' '.join(f'{r:7}' for r in row)}")
    assert row == EXPECTED[caller].split(), (caller, row)


ISSUER, AUDIENCE = "https://issuer.roomsecrets.test", "roomsecrets-matrix"


@pytest.fixture
def pinned(data_dir: Path, database_url: str) -> Iterator[Participants]:
    """A server that trusts one issuer and is one audience (--token-issuer, --token-audience)."""
    server = ServerThread(
        test_settings(data_dir, database_url=database_url, token_issuer=ISSUER, token_audience=AUDIENCE)
    ).start()
    room = Participants(server)
    yield room
    room.close()
    server.stop()


def test_every_rpc_refuses_a_wrong_or_missing_issuer_or_audience(pinned: Participants) -> None:
    room = pinned
    room.stub.SetSecret(pb.SetSecretRequest(secret_id="s", data=VALUE), metadata=room.auth("alice"))
    credentials: dict[str, Metadata] = {
        "no iss": (("authorization", f"Bearer {room.token('alice', issuer='')}"),),
        "other iss": (("authorization", f"Bearer {room.token('alice', issuer='https://evil.example')}"),),
        "no aud": (("authorization", f"Bearer {room.token('alice', audience='')}"),),
        "other aud": (("authorization", f"Bearer {room.token('alice', audience='another-service')}"),),
    }
    every_rpc_unauthenticated(room.channel, credentials, leak=VALUE.decode())
    # The same token with the right iss and aud reads the value: the refusals above are about them.
    got = room.stub.GetSecret(pb.GetSecretRequest(secret_id="s"), metadata=room.auth("alice"))
    assert got.data == VALUE


@pytest.mark.parametrize(
    ("claims", "message"),
    [({"issuer": "https://evil.example"}, "issuer (iss)"), ({"audience": "another"}, "audience (aud)")],
)
def test_the_refusal_names_the_claim(pinned: Participants, claims: dict[str, str], message: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        pinned.stub.ListSecrets(pb.ListSecretsRequest(), metadata=pinned.auth("alice", **claims))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert message in (refused.value.details() or "")
