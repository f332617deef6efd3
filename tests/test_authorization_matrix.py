"""The authorization matrix, printed: every RPC of the three services by every kind of caller, on
both stores. Each call aims at a real seeded object (a room secret, a requested secret, an OAuth
token set, a connector, pending requests, a project secret key, a pull secret, a service), so a
caller wrongly let through would get data or change it; each cell is checked against a table
written here, and whatever a caller may not have, no reply, error or trailer of theirs carries.

Read `test_every_rpc_by_every_caller` first: it prints the matrix and its legend."""

from __future__ import annotations

import base64
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
from roomsecrets.v1 import oauth_connectors_pb2 as cpb
from roomsecrets.v1 import project_secrets_pb2 as ppb
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets_server.auth.dev_key import ensure_dev_key
from roomsecrets_server.auth.principal import room_scope
from roomsecrets_server.oauth.connectors import CONNECTOR_OWNER
from roomsecrets_server.project.service import PROJECT_ROOM
from roomsecrets_server.rpc.convert import client_config
from roomsecrets_server.store import SecretKey, SecretKind

from .harness import Participants, ServerThread, test_settings
from .oauth_provider import OAuthProvider
from .test_requests import Watcher

Metadata = tuple[tuple[str, str], ...]
Inbound = Literal["secret_request", "oauth_request"]

SERVICES = [
    (room_secrets_pb2, "RoomSecrets", room_secrets_pb2_grpc.RoomSecretsStub),
    (oauth_connectors_pb2, "OAuthConnectors", oauth_connectors_pb2_grpc.OAuthConnectorsStub),
    (project_secrets_pb2, "ProjectSecrets", project_secrets_pb2_grpc.ProjectSecretsStub),
]


def contract() -> dict[str, bool]:
    """Every RPC of the contract as "Service/Method", in declaration order -> server-streaming."""
    return {
        f"{name}/{method.name}": method.server_streaming
        for module, name, _ in SERVICES
        for method in module.DESCRIPTOR.services_by_name[name].methods
    }


@dataclass(frozen=True)
class Seen:
    """What a caller got: "OK" or the status name, the reply (None on error), and everything it
    saw as text (reply bytes, or error details and trailing metadata), for the leak checks."""

    status: str
    reply: Message | None
    text: str


def outcome(call: Callable[[], Message | list[Message]]) -> Seen:
    try:
        reply = call()
    except grpc.RpcError as err:
        return Seen(err.code().name, None, f"{err.details()} {err.trailing_metadata()}")
    replies = reply if isinstance(reply, list) else [reply]
    text = b"".join(r.SerializeToString() for r in replies).decode(errors="replace")
    return Seen("OK", replies[0] if replies else None, text)


def every_rpc(channel: grpc.Channel) -> Iterator[tuple[str, Callable[[Metadata], Seen]]]:
    """(Service/Method, call with metadata) for every RPC in the contract, with an empty request:
    credentials are checked before anything in the request is looked at."""
    pool = descriptor_pool.Default()
    for module, name, stub_class in SERVICES:
        stub = stub_class(channel)
        for method in module.DESCRIPTOR.services_by_name[name].methods:
            request: Message = GetMessageClass(pool.FindMessageTypeByName(method.input_type.full_name))()
            rpc = getattr(stub, method.name)
            if method.server_streaming:

                def call(md: Metadata, rpc: Any = rpc, request: Message = request) -> Seen:
                    return outcome(lambda: [next(iter(rpc(request, metadata=md, timeout=10)))])
            else:

                def call(md: Metadata, rpc: Any = rpc, request: Message = request) -> Seen:
                    return outcome(lambda: rpc(request, metadata=md, timeout=10))

            yield f"{name}/{method.name}", call


def forge(room: Participants, token: str, **changes: Any) -> str:
    """`token` re-signed with the server's dev key, claims changed (or, with key=..., another key)."""
    kid, key = ensure_dev_key(room.server.settings.data_dir)
    claims = jwt.decode(token, options={"verify_signature": False})
    signing_key = changes.pop("key", key)
    claims.update(changes)
    return jwt.encode(claims, signing_key, algorithm="HS256", headers={"kid": kid})


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


# -- the seeded world -----------------------------------------------------------------------------
# Project A is the dev key's default project, room-1 its room. Everything below is seeded there,
# with values that are searched for in everything every caller sees.
ROOM_NAME, PROJECT = "room-1", "dev-project"
ROOM = room_scope(PROJECT, ROOM_NAME)  # where the room's rows live
ROOM_VALUE = "matrix-room-value-3e8a1c"  # alice's `matrix-s`, delegated to bob
# alice's `matrix-own`, delegated to the project admin who applies the manifest naming it (a
# manifest names only what its author may read)
OWN_VALUE = "matrix-own-value-9b2d57"
REQUESTED_VALUE = "matrix-requested-value-4c7e"  # alice's answer to bob's earlier request (url, type)
KEY_VALUE = "sk-matrix-key-value-6f1a90"  # project secret key `matrix-openai`
REGISTRY_PASSWORD = "matrix-registry-pw-8e3b21"  # pull secret `matrix-regcred`
CLIENT_ID, CLIENT_SECRET = "matrix-client", "matrix-client-secret-5d1f"  # connector `matrix-gh`
NEW_CLIENT_SECRET = "matrix-client-secret-new-77aa"  # what SetConnector sends
REDIRECT = "https://app.example/oauth/callback"
REQUESTED_URL, REQUESTED_TYPE = "https://git.example/matrix.git", "text/plain"
ELSEWHERE = "https://elsewhere.example/token"  # the only token endpoint of the `oaux` OAuth grant
MANIFEST = textwrap.dedent(
    """
    version: v1
    kind: Service
    metadata: {name: matrix-api}
    container:
      image: registry.example/matrix:1
      secrets: [matrix-openai]
      pull_secret: matrix-regcred
      environment:
        - {name: LOG_LEVEL, value: debug}
        - name: GITHUB_TOKEN
          secret: {identity: alice, id: matrix-own}
    """
)


@dataclass(frozen=True)
class Caller:
    identity: str
    token: Mapping[str, Any] = field(default_factory=dict)  # mint_token arguments


ALICE = Caller("alice")  # owns the room secrets and the OAuth token; pending requests ask her
BOB = Caller("bob")  # alice's delegate; asked for the pending requests' answers
DAVE = Caller("dave", {"admin": True})  # room admin
OPS = Caller("ops", {"project_role": "admin"})  # project admin
DEV = Caller("dev", {"project_role": "developer"})
SERVICE = Caller("matrix-api", {"project_role": "service", "service": "matrix-api"})
OTHER_SERVICE = Caller("other", {"project_role": "service", "service": "other"})


class World:
    """The seeded objects, the pending requests that ask alice, and the means to see whether a
    call changed any of them (a white-box read of the store) and to put them back."""

    def __init__(self, room: Participants, provider: OAuthProvider) -> None:
        self.room = room
        self.provider = provider
        self.stubs: dict[str, Any] = {
            "RoomSecrets": room.stub,
            "OAuthConnectors": oauth_connectors_pb2_grpc.OAuthConnectorsStub(room.channel),
            "ProjectSecrets": project_secrets_pb2_grpc.ProjectSecretsStub(room.channel),
        }
        self.streaming = contract()
        self.waiting: list[grpc.Future] = []  # type: ignore[type-arg]  # requesters of pending requests
        self.secret_request = self.oauth_request = self.oauth_url = ""
        self.reseeds = 0
        self.alice = Watcher(room, "alice")  # she answers the pending requests
        token_id = client_config(self.client(CLIENT_SECRET)).token_secret_id
        self.keys = {
            "room secret": SecretKey(ROOM, "alice", "bob", "matrix-s"),
            "own secret": SecretKey(ROOM, "alice", "ops", "matrix-own"),
            "requested secret": SecretKey(ROOM, "alice", "bob", ""),  # its id: seed_answer
            "connector": SecretKey(ROOM, CONNECTOR_OWNER, "", "connector:matrix-gh"),
            "OAuth token": SecretKey(ROOM, "alice", "bob", token_id),
            "secret key": SecretKey(PROJECT_ROOM, PROJECT, "", "key:matrix-openai"),
            "new secret key": SecretKey(PROJECT_ROOM, PROJECT, "", "key:matrix-new"),
            "pull secret": SecretKey(PROJECT_ROOM, PROJECT, "", "pull:matrix-regcred"),
            "new pull secret": SecretKey(PROJECT_ROOM, PROJECT, "", "pull:matrix-new"),
            "service": SecretKey(PROJECT_ROOM, PROJECT, "", "service:matrix-api"),
        }
        # In dependency order (the OAuth flows need the connector).
        self.seeders: dict[str, Callable[[], object]] = {
            "room secret": lambda: self.set_secret("matrix-s", ROOM_VALUE, delegated_to="bob"),
            "own secret": lambda: self.set_secret("matrix-own", OWN_VALUE, delegated_to="ops"),
            "requested secret": self.seed_answer,
            "connector": lambda: self.call(
                "OAuthConnectors/SetConnector",
                DAVE,
                cpb.SetConnectorRequest(name="matrix-gh", client=self.client(CLIENT_SECRET)),
            ),
            "OAuth token": self.seed_oauth_token,
            "secret key": lambda: self.replace(
                "SecretKey",
                ppb.CreateSecretKeyRequest(
                    id="matrix-openai", name="OpenAI", data={"OPENAI_API_KEY": KEY_VALUE}
                ),
            ),
            "new secret key": lambda: self.remove("SecretKey", "matrix-new"),
            "pull secret": lambda: self.replace(
                "PullSecret",
                ppb.CreatePullSecretRequest(
                    id="matrix-regcred",
                    name="Registry",
                    flavor=ppb.REGISTRY_FLAVOR_DOCKER,
                    server="registry.example",
                    username="puller",
                    password=REGISTRY_PASSWORD,
                ),
            ),
            "new pull secret": lambda: self.remove("PullSecret", "matrix-new"),
            "service": lambda: self.call(
                "ProjectSecrets/ApplyService", OPS, ppb.ApplyServiceRequest(manifest=MANIFEST)
            ),
            "pending secret request": self.seed_secret_request,
            "pending OAuth request": self.seed_oauth_request,
        }
        for seed in self.seeders.values():
            seed()
        self.canonical = self.snapshot()

    # -- calls --------------------------------------------------------------------------------
    def auth(self, caller: Caller, **changes: Any) -> Metadata:
        return self.room.auth(caller.identity, **{**caller.token, **changes})

    def token(self, caller: Caller) -> str:
        return self.room.token(caller.identity, **caller.token)

    def invoke(self, rpc: str, md: Metadata, request: Message, deadline: float = 10) -> Seen:
        service, method = rpc.split("/")
        multicallable = getattr(self.stubs[service], method)
        if not self.streaming[rpc]:
            return outcome(lambda: multicallable(request, metadata=md, timeout=deadline))

        def until_ready() -> list[Message]:
            """The replay of a WatchRequests stream: pending requests up to `ready`."""
            stream = multicallable(request, metadata=md, timeout=deadline)
            try:
                events: list[Message] = []
                for event in stream:
                    events.append(event)
                    if event.HasField("ready"):
                        break
                return events
            finally:
                stream.cancel()

        return outcome(until_ready)

    def call(self, rpc: str, caller: Caller, request: Message) -> Message:
        """A seeding call, which must succeed."""
        seen = self.invoke(rpc, self.auth(caller), request)
        assert seen.status == "OK" and seen.reply is not None, (rpc, seen.status, seen.text)
        return seen.reply

    def set_secret(self, secret_id: str, value: str, **fields: str) -> None:
        request = pb.SetSecretRequest(secret_id=secret_id, data=value.encode(), **fields)  # type: ignore[arg-type]
        self.call("RoomSecrets/SetSecret", ALICE, request)

    def remove(self, kind: str, id_: str) -> None:
        request = getattr(ppb, f"Delete{kind}Request")(id=id_)
        status = self.invoke(f"ProjectSecrets/Delete{kind}", self.auth(OPS), request).status
        assert status in ("OK", "NOT_FOUND"), status

    def replace(self, kind: str, create: Message) -> None:
        self.remove(kind, create.id)  # type: ignore[attr-defined]
        self.call(f"ProjectSecrets/Create{kind}", OPS, create)

    def client(self, secret: str, client_id: str = CLIENT_ID) -> pb.OAuthClientConfig:
        """The connector's client; SetConnector sends another id, so its reply tells nothing."""
        return pb.OAuthClientConfig(
            client_id=client_id,
            client_secret=secret,
            authorization_endpoint=self.provider.authorization_endpoint,
            token_endpoint=self.provider.token_endpoint,
            scopes=["read"],
        )

    def ask_alice(self, rpc: str, request: Message, event: Inbound, match: Callable[[Any], bool]) -> Any:
        """Bob asks alice (the call waits in the background); her stream's new request."""
        known = {getattr(e, event).request_id for e in self.alice.events if e.HasField(event)}
        rpc_method = getattr(self.stubs["RoomSecrets"], rpc)
        self.waiting.append(rpc_method.future(request, metadata=self.auth(BOB), timeout=300))
        got = self.alice.wait_for(
            lambda e: (
                e.HasField(event) and getattr(e, event).request_id not in known and match(getattr(e, event))
            ),
            timeout=10,
        )
        return getattr(got, event)

    def seed_answer(self) -> None:
        """A real answer: bob asks alice for REQUESTED_URL, delegated to him; she provides it."""
        request = pb.RequestSecretRequest(
            from_participant_id="alice", url=REQUESTED_URL, type=REQUESTED_TYPE, delegate_to="bob", timeout=60
        )
        asked = self.ask_alice("RequestSecret", request, "secret_request", lambda r: r.url == REQUESTED_URL)
        answer = pb.ProvideSecretRequest(request_id=asked.request_id, data=REQUESTED_VALUE.encode())
        self.call("RoomSecrets/ProvideSecret", ALICE, answer)
        assert self.waiting.pop().result(timeout=10).data == REQUESTED_VALUE.encode()
        assert self.room.server.server is not None
        store = self.room.server.server.store
        found = self.room.server.call(
            store.find_secrets(ROOM, "alice", "bob", SecretKind.ANSWER, REQUESTED_TYPE, REQUESTED_URL)
        )
        self.keys["requested secret"] = found[0].key

    def seed_secret_request(self) -> None:
        url = f"{REQUESTED_URL}#pending-{self.reseeds}"  # a fresh question: never answered from storage
        request = pb.RequestSecretRequest(
            from_participant_id="alice", url=url, type=REQUESTED_TYPE, delegate_to="bob", timeout=300
        )
        self.secret_request = self.ask_alice(
            "RequestSecret", request, "secret_request", lambda r: r.url == url
        ).request_id

    def seed_oauth_request(self) -> None:
        # Not delegated (bob has no stored token for that), so it prompts alice.
        request = pb.RequestOAuthTokenRequest(
            connector=pb.ConnectorRef(name="matrix-gh"),
            from_participant_id="alice",
            redirect_uri=REDIRECT,
            timeout=300,
        )
        prompt = self.ask_alice("RequestOAuthToken", request, "oauth_request", lambda r: not r.delegate_to)
        self.oauth_request, self.oauth_url = prompt.request_id, prompt.authorization_url

    def seed_oauth_token(self) -> None:
        """A real authorization-code flow: bob asks alice for a token delegated to him; the user
        agent consents at the provider; alice hands the code over; the server stores the set."""
        self.invoke(
            "RoomSecrets/DeleteSecret",
            self.auth(ALICE),
            pb.DeleteSecretRequest(secret_id=self.keys["OAuth token"].secret_id, delegated_to="bob"),
        )
        request = pb.RequestOAuthTokenRequest(
            connector=pb.ConnectorRef(name="matrix-gh"),
            from_participant_id="alice",
            redirect_uri=REDIRECT,
            delegate_to="bob",
            timeout=60,
        )
        prompt = self.ask_alice(
            "RequestOAuthToken", request, "oauth_request", lambda r: r.delegate_to == "bob"
        )
        code, state = self.provider.authorize(prompt.authorization_url)
        self.call(
            "RoomSecrets/ProvideOAuthAuthorization",
            ALICE,
            pb.ProvideOAuthAuthorizationRequest(request_id=prompt.request_id, code=code, state=state),
        )
        assert self.waiting.pop().result(timeout=10).access_token

    def oauth_answer(self) -> pb.ProvideOAuthAuthorizationRequest:
        """An answer to the pending OAuth request, with a new code from the provider."""
        code, state = self.provider.authorize(self.oauth_url)
        return pb.ProvideOAuthAuthorizationRequest(request_id=self.oauth_request, code=code, state=state)

    # -- the state of what was seeded ---------------------------------------------------------
    def snapshot(self) -> dict[str, str | None]:
        """Etag of every seeded row (None: absent) and state of each pending request."""
        assert self.room.server.server is not None
        store = self.room.server.server.store

        async def read() -> dict[str, str | None]:
            seen: dict[str, str | None] = {}
            for name, key in self.keys.items():
                record = await store.get_secret(key)
                seen[name] = record.etag if record else None
            for name, request_id in (
                ("pending secret request", self.secret_request),
                ("pending OAuth request", self.oauth_request),
            ):
                pending = await store.get_request(request_id)
                seen[name] = pending.state.value if pending else None
            return seen

        result: dict[str, str | None] = self.room.server.call(read())
        return result

    def restore(self, now: dict[str, str | None]) -> None:
        """Seed again whatever differs from the canonical state."""
        self.reseeds += 1
        for name, seed in self.seeders.items():
            if now[name] != self.canonical[name]:
                seed()
        self.canonical = self.snapshot()

    def markers(self) -> list[str]:
        """Strings that only a reply about a seeded object carries: etags, request ids, the
        connector's client id, and the values."""
        ids = [v for k, v in self.canonical.items() if v and not k.startswith("pending")]
        values = [v for group in self.values().values() for v in group]
        return [*ids, self.secret_request, self.oauth_request, CLIENT_ID, *values]

    def values(self) -> dict[str, set[str]]:
        """Every secret the world holds, by what it is. "never": no reply may carry these."""
        tokens = self.provider.issued_tokens
        access = {t["access_token"] for t in tokens}
        registry_auth = base64.b64encode(f"puller:{REGISTRY_PASSWORD}".encode()).decode()
        return {
            "room secret": {ROOM_VALUE},
            "own secret": {OWN_VALUE},
            "requested secret": {REQUESTED_VALUE},
            "secret key": {KEY_VALUE},
            "registry password": {REGISTRY_PASSWORD, registry_auth},
            "access token": access,
            # Refresh tokens, authorization codes and client secrets.
            "never": {*self.provider.issued_secrets(), CLIENT_SECRET, NEW_CLIENT_SECRET} - access,
        }

    def close(self) -> None:
        for waiting in self.waiting:
            waiting.cancel()
        self.alice.cancel()


@pytest.fixture
def provider() -> Iterator[OAuthProvider]:
    with OAuthProvider(access_token_lifetime=3600) as running:
        running.register_client(CLIENT_ID, CLIENT_SECRET, [REDIRECT], scope="read")
        yield running


@pytest.fixture
def server(data_dir: Path, database_url: str, provider: OAuthProvider) -> Iterator[ServerThread]:
    """The egress policy lets the server reach the test provider's loopback port, no other."""
    allowed = (provider.base_url.removeprefix("http://"),)
    running = ServerThread(test_settings(data_dir, database_url=database_url, egress_allow=allowed)).start()
    yield running
    running.stop()


@pytest.fixture
def world(room: Participants, provider: OAuthProvider) -> Iterator[World]:
    seeded = World(room, provider)
    yield seeded
    seeded.close()


# -- the rows: one request per RPC, aimed at a seeded object --------------------------------------
@dataclass(frozen=True)
class Row:
    # The caller for whom this request is right: the credential and scope columns send the same
    # request with this caller's token spoiled or moved.
    rightful: Caller
    request: Callable[[World], Message]
    # What a reply may carry, to a caller whose cell is OK (secure expectation) and no other.
    reveals: tuple[str, ...] = ()
    # RequestSecret and RequestOAuthToken wait for an answer that never comes (DEADLINE_EXCEEDED)
    # unless served from storage: their cells run at once, with a short deadline.
    deadline: float = 10
    parallel: bool = False


CONNECTOR = pb.ConnectorRef(name="matrix-gh")
ROWS: dict[str, Row] = {
    "RoomSecrets/ListSecrets": Row(ALICE, lambda w: pb.ListSecretsRequest()),
    "RoomSecrets/Exists": Row(
        ALICE, lambda w: pb.ExistsRequest(secret_id="matrix-s", delegated_to="bob", for_identity="alice")
    ),
    "RoomSecrets/SetSecret": Row(
        ALICE,
        lambda w: pb.SetSecretRequest(
            secret_id="matrix-s", delegated_to="bob", for_identity="alice", data=b"overwritten"
        ),
    ),
    "RoomSecrets/GetSecret": Row(
        ALICE,
        lambda w: pb.GetSecretRequest(secret_id="matrix-s", delegated_to="bob", delegated_by="alice"),
        reveals=("room secret",),
    ),
    "RoomSecrets/DeleteSecret": Row(
        ALICE, lambda w: pb.DeleteSecretRequest(secret_id="matrix-s", delegated_to="bob")
    ),
    "RoomSecrets/DeleteRequestedSecret": Row(
        ALICE,
        lambda w: pb.DeleteRequestedSecretRequest(url=REQUESTED_URL, type=REQUESTED_TYPE, delegated_to="bob"),
    ),
    "RoomSecrets/RequestSecret": Row(
        BOB,
        lambda w: pb.RequestSecretRequest(
            from_participant_id="alice", url=REQUESTED_URL, type=REQUESTED_TYPE, delegate_to="bob"
        ),
        reveals=("requested secret",),
        deadline=2,
        parallel=True,
    ),
    "RoomSecrets/ProvideSecret": Row(
        ALICE, lambda w: pb.ProvideSecretRequest(request_id=w.secret_request, data=b"provided")
    ),
    "RoomSecrets/RejectSecret": Row(
        ALICE, lambda w: pb.RejectSecretRequest(request_id=w.secret_request, error="no")
    ),
    "RoomSecrets/RequestOAuthToken": Row(
        BOB,
        lambda w: pb.RequestOAuthTokenRequest(
            connector=CONNECTOR, from_participant_id="alice", redirect_uri=REDIRECT, delegate_to="bob"
        ),
        reveals=("access token",),
        deadline=2,
        parallel=True,
    ),
    "RoomSecrets/ProvideOAuthAuthorization": Row(ALICE, lambda w: w.oauth_answer()),
    "RoomSecrets/RejectOAuthAuthorization": Row(
        ALICE, lambda w: pb.RejectOAuthAuthorizationRequest(request_id=w.oauth_request, error="no")
    ),
    "RoomSecrets/GetOfflineOAuthToken": Row(
        BOB,
        lambda w: pb.GetOfflineOAuthTokenRequest(
            connector=CONNECTOR, delegated_to="bob", delegated_by="alice"
        ),
        reveals=("access token",),
    ),
    "RoomSecrets/WatchRequests": Row(ALICE, lambda w: pb.WatchRequestsRequest()),
    "OAuthConnectors/SetConnector": Row(
        DAVE,
        lambda w: cpb.SetConnectorRequest(name="matrix-gh", client=w.client(NEW_CLIENT_SECRET, "matrix-set")),
    ),
    "OAuthConnectors/GetConnector": Row(DAVE, lambda w: cpb.GetConnectorRequest(name="matrix-gh")),
    "OAuthConnectors/ListConnectors": Row(DAVE, lambda w: cpb.ListConnectorsRequest()),
    "OAuthConnectors/DeleteConnector": Row(DAVE, lambda w: cpb.DeleteConnectorRequest(name="matrix-gh")),
    "ProjectSecrets/CreateSecretKey": Row(
        OPS, lambda w: ppb.CreateSecretKeyRequest(id="matrix-new", name="New", data={"NEW_VAR": "new"})
    ),
    "ProjectSecrets/GetSecretKey": Row(
        OPS, lambda w: ppb.GetSecretKeyRequest(id="matrix-openai"), reveals=("secret key",)
    ),
    "ProjectSecrets/ListSecretKeys": Row(OPS, lambda w: ppb.ListSecretKeysRequest()),
    "ProjectSecrets/UpdateSecretKey": Row(
        OPS, lambda w: ppb.UpdateSecretKeyRequest(id="matrix-openai", set={"OPENAI_API_KEY": "sk-rotated"})
    ),
    "ProjectSecrets/DeleteSecretKey": Row(OPS, lambda w: ppb.DeleteSecretKeyRequest(id="matrix-openai")),
    "ProjectSecrets/CreatePullSecret": Row(
        OPS,
        lambda w: ppb.CreatePullSecretRequest(
            id="matrix-new", name="New", server="registry.example", username="u", password="p-new"
        ),
    ),
    "ProjectSecrets/UpdatePullSecret": Row(
        OPS, lambda w: ppb.UpdatePullSecretRequest(id="matrix-regcred", password="pw-rotated")
    ),
    "ProjectSecrets/ListPullSecrets": Row(OPS, lambda w: ppb.ListPullSecretsRequest()),
    "ProjectSecrets/DeletePullSecret": Row(OPS, lambda w: ppb.DeletePullSecretRequest(id="matrix-regcred")),
    "ProjectSecrets/ApplyService": Row(OPS, lambda w: ppb.ApplyServiceRequest(manifest=MANIFEST)),
    "ProjectSecrets/GetService": Row(OPS, lambda w: ppb.GetServiceRequest(name="matrix-api")),
    "ProjectSecrets/ListServices": Row(OPS, lambda w: ppb.ListServicesRequest()),
    "ProjectSecrets/DeleteService": Row(OPS, lambda w: ppb.DeleteServiceRequest(name="matrix-api")),
    "ProjectSecrets/ResolveService": Row(
        OPS,
        lambda w: ppb.ResolveServiceRequest(name="matrix-api"),
        reveals=("secret key", "registry password", "own secret"),
    ),
}


# -- the columns: kinds of caller -----------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    abbr: str
    name: str
    # The metadata to send, given the world, the row's rightful caller and the row's index (which
    # makes "another room" and "another project" fresh for every row).
    metadata: Callable[[World, Caller, int], Metadata]


def spoiled(**changes: Any) -> Callable[[World, Caller, int], Metadata]:
    """The rightful caller's token, re-signed with claims changed; callables get the time."""

    def make(w: World, rightful: Caller, _: int) -> Metadata:
        now = int(time.time())
        claims = {k: v(now) if callable(v) else v for k, v in changes.items()}
        return bearer(forge(w.room, w.token(rightful), **claims))

    return make


def fixed(caller: Caller) -> Callable[[World, Caller, int], Metadata]:
    return lambda w, _, __: w.auth(caller)


def other_token_endpoint(w: World) -> list[dict[str, str]]:
    """The `oaux` OAuth grant: the connector's authorization endpoint and client, but another
    token endpoint (not the connector's, where the server would send the code and the secret)."""
    return [
        {"endpoint": w.provider.authorization_endpoint, "client_id": CLIENT_ID, "token_endpoint": ELSEWHERE}
    ]


CREDENTIALS = [
    Column("none", "no authorization metadata", lambda w, c, i: ()),
    Column("malf", "malformed token", lambda w, c, i: bearer("not.a.jwt")),
    Column("schm", "valid token, Basic scheme", lambda w, c, i: (("authorization", "Basic " + w.token(c)),)),
    Column("exp", "expired an hour ago", spoiled(iat=lambda now: now - 7200, exp=lambda now: now - 3600)),
    Column("nbf", "not valid for another hour", spoiled(nbf=lambda now: now + 3600)),
    Column("sig", "signed with another key", spoiled(key=b"k" * 32)),
    Column("noid", "no identity (empty name)", spoiled(name="")),
    Column("aud", "meant for another audience", spoiled(aud="https://other.example")),
]  # fmt: skip
OTHER_SCOPES = [
    Column("room", "same, in another room of the project (+ room admin)",
           lambda w, c, i: w.auth(c, room=f"room-2-{i}", admin=True)),
    Column("proj", "same, in a room of the same name of another project (+ room admin)",
           lambda w, c, i: w.auth(c, project=f"project-b-{i}", admin=True)),
    Column("nosg", "same, without the secrets API grant", lambda w, c, i: w.auth(c, secrets_grant=False)),
    Column("oaux", "same, with an OAuth grant for another token endpoint only",
           lambda w, c, i: w.auth(c, request_oauth_token=other_token_endpoint(w))),
]  # fmt: skip
ROLES = [
    Column("part", "participant alice (owner; asked by the pending requests)", fixed(ALICE)),
    Column("dlgt", "bob, alice's delegate", fixed(BOB)),
    Column("ndlg", "carol, not a delegate", fixed(Caller("carol"))),
    Column("radm", "dave, room admin", fixed(DAVE)),
    Column("padm", "project admin", fixed(OPS)),
    Column("dev", "project developer", fixed(DEV)),
    Column("svc", "service matrix-api (the manifest's)", fixed(SERVICE)),
    Column("osvc", "another service", fixed(OTHER_SERVICE)),
]  # fmt: skip
COLUMNS = CREDENTIALS + OTHER_SCOPES + ROLES

CODES = {
    "UNAUTHENTICATED": "UA",
    "PERMISSION_DENIED": "PD",
    "NOT_FOUND": "NF",
    "FAILED_PRECONDITION": "FP",
    "DEADLINE_EXCEEDED": "DE",
    "INVALID_ARGUMENT": "IA",
    "ALREADY_EXISTS": "AE",
    "ABORTED": "AB",
}
LEGEND = """\
OK  allowed, and the call reached the seeded object: showed it or changed it
ok- allowed, but showed and changed nothing seeded (the caller's own, empty scope)
UA  UNAUTHENTICATED   PD PERMISSION_DENIED   NF NOT_FOUND   FP FAILED_PRECONDITION
DE  DEADLINE_EXCEEDED (allowed to ask; nobody answers)
!   not what the server must answer (the test then fails)"""

# Every credential column is UNAUTHENTICATED, for every RPC.
# The other columns, as the server must answer. Why the cells are what they are:
# - room: room-scoped objects of another room do not exist (NF, or an empty ok-); a write lands in
#   that room (ok-). Project objects are project-wide, so the project admin reaches them from any
#   room; the manifest resolves on its author's authority in the author's room (OK), but applying
#   it from another room is refused: alice delegated `matrix-own` to ops in room-1 only (PD).
# - proj: nothing of project A exists for another project: addressed objects are NF, listings and
#   creations happen in the caller's own project (ok-). RequestSecret: alice is not listening
#   there (FP).
# - nosg: the room APIs need the secrets grant (PD); ProjectSecrets needs only the project role.
# - oaux: only RequestOAuthToken and GetOfflineOAuthToken check the OAuth grant (PD), which covers
#   the token endpoint as well as the authorization endpoint; answering an OAuth request is the
#   asked participant's consent, not a token request.
# - a secret request may be sent by anyone in the room (DE: nobody answers; served from storage,
#   without a prompt, only to the delegate). Exists and SetSecret for alice need room admin;
#   DeleteSecret addresses the caller's own secrets only (NF); DeleteRequestedSecret also those
#   delegated to the caller, so the requester (bob) can force a new prompt after a wrong value.
# - connectors: any participant with the secrets grant reads them (never the client secret);
#   only room admins write them.
# - project roles: as tests/test_project.py::test_permission_matrix, here for every RPC; the
#   developer reads key metadata but no value (METADATA_ONLY).
# - no amplification (SECURITY.md "Authority"): the manifest names keys, a pull secret and alice's
#   `matrix-own` (delegated to ops), so only a project admin who may read that secret applies it:
#   not the developer, not ops without the secrets grant or in another room or project (PD).
#   Because alice delegated it to ops, ops lists it (ListSecrets padm: OK, metadata only).
EXPECTED = {
    #                                        room proj nosg oaux part dlgt ndlg radm padm dev  svc  osvc
    "RoomSecrets/ListSecrets":               "ok- ok-  PD   OK   OK   OK   ok-  ok-  OK   ok-  ok-  ok-",
    "RoomSecrets/Exists":                    "ok- ok-  PD   OK   OK   PD   PD   OK   PD   PD   PD   PD",
    "RoomSecrets/SetSecret":                 "ok- ok-  PD   OK   OK   PD   PD   OK   PD   PD   PD   PD",
    "RoomSecrets/GetSecret":                 "NF  NF   PD   OK   OK   OK   PD   PD   PD   PD   PD   PD",
    "RoomSecrets/DeleteSecret":              "NF  NF   PD   OK   OK   NF   NF   NF   NF   NF   NF   NF",
    "RoomSecrets/DeleteRequestedSecret":     "NF  NF   PD   OK   OK   OK   NF   NF   NF   NF   NF   NF",
    "RoomSecrets/RequestSecret":             "FP  FP   PD   OK   DE   OK   DE   DE   DE   DE   DE   DE",
    "RoomSecrets/ProvideSecret":             "NF  NF   PD   OK   OK   PD   PD   PD   PD   PD   PD   PD",
    "RoomSecrets/RejectSecret":              "NF  NF   PD   OK   OK   PD   PD   PD   PD   PD   PD   PD",
    "RoomSecrets/RequestOAuthToken":         "NF  NF   PD   PD   OK   OK   DE   DE   DE   DE   DE   DE",
    "RoomSecrets/ProvideOAuthAuthorization": "NF  NF   PD   OK   OK   PD   PD   PD   PD   PD   PD   PD",
    "RoomSecrets/RejectOAuthAuthorization":  "NF  NF   PD   OK   OK   PD   PD   PD   PD   PD   PD   PD",
    "RoomSecrets/GetOfflineOAuthToken":      "NF  NF   PD   PD   OK   OK   PD   PD   PD   PD   PD   PD",
    "RoomSecrets/WatchRequests":             "ok- ok-  PD   OK   OK   ok-  ok-  ok-  ok-  ok-  ok-  ok-",
    "OAuthConnectors/SetConnector":          "ok- ok-  PD   OK   PD   PD   PD   OK   PD   PD   PD   PD",
    "OAuthConnectors/GetConnector":          "NF  NF   PD   OK   OK   OK   OK   OK   OK   OK   OK   OK",
    "OAuthConnectors/ListConnectors":        "ok- ok-  PD   OK   OK   OK   OK   OK   OK   OK   OK   OK",
    "OAuthConnectors/DeleteConnector":       "NF  NF   PD   OK   PD   PD   PD   OK   PD   PD   PD   PD",
    "ProjectSecrets/CreateSecretKey":        "OK  ok-  OK   OK   PD   PD   PD   PD   OK   PD   PD   PD",
    "ProjectSecrets/GetSecretKey":           "OK  NF   OK   OK   PD   PD   PD   PD   OK   OK   OK   PD",
    "ProjectSecrets/ListSecretKeys":         "OK  ok-  OK   OK   PD   PD   PD   PD   OK   OK   PD   PD",
    "ProjectSecrets/UpdateSecretKey":        "OK  NF   OK   OK   PD   PD   PD   PD   OK   PD   PD   PD",
    "ProjectSecrets/DeleteSecretKey":        "OK  NF   OK   OK   PD   PD   PD   PD   OK   PD   PD   PD",
    "ProjectSecrets/CreatePullSecret":       "OK  ok-  OK   OK   PD   PD   PD   PD   OK   PD   PD   PD",
    "ProjectSecrets/UpdatePullSecret":       "OK  NF   OK   OK   PD   PD   PD   PD   OK   PD   PD   PD",
    "ProjectSecrets/ListPullSecrets":        "OK  ok-  OK   OK   PD   PD   PD   PD   OK   OK   PD   PD",
    "ProjectSecrets/DeletePullSecret":       "OK  NF   OK   OK   PD   PD   PD   PD   OK   PD   PD   PD",
    "ProjectSecrets/ApplyService":           "PD  PD   PD   OK   PD   PD   PD   PD   OK   PD   PD   PD",
    "ProjectSecrets/GetService":             "OK  NF   OK   OK   PD   PD   PD   PD   OK   OK   OK   PD",
    "ProjectSecrets/ListServices":           "OK  ok-  OK   OK   PD   PD   PD   PD   OK   OK   PD   PD",
    "ProjectSecrets/DeleteService":          "OK  NF   OK   OK   PD   PD   PD   PD   OK   OK   PD   PD",
    "ProjectSecrets/ResolveService":         "OK  NF   OK   OK   PD   PD   PD   PD   OK   PD   OK   PD",
}  # fmt: skip
METADATA_ONLY = {("ProjectSecrets/GetSecretKey", "dev")}


@dataclass
class Cell:
    code: str
    secure: str  # what the server must answer
    leaks: list[str]  # what the caller saw but may not have

    def show(self) -> str:
        return self.code + ("!" if self.code != self.secure else "")


def run_cell(w: World, rpc: str, row: Row, column: Column, index: int, secure: str) -> Cell:
    seen = w.invoke(rpc, column.metadata(w, row.rightful, index), row.request(w), row.deadline)
    if seen.status != "OK":
        code = CODES.get(seen.status, seen.status)
    else:
        exists = isinstance(seen.reply, pb.ExistsResponse) and seen.reply.exists
        code = "OK" if exists or any(m in seen.text for m in w.markers()) else "ok-"
    may_see = row.reveals if secure == "OK" and (rpc, column.abbr) not in METADATA_ONLY else ()
    leaks = [
        group for group, found in w.values().items() if group not in may_see for v in found if v in seen.text
    ]
    return Cell(code, secure, sorted(set(leaks)))


def run_row(w: World, rpc: str, index: int, columns: list[Column], secure: list[str]) -> list[Cell]:
    row = ROWS[rpc]
    if row.parallel:  # nothing here may change what was seeded: checked after the row
        with ThreadPoolExecutor(len(columns)) as pool:
            cells = list(pool.map(lambda c, e: run_cell(w, rpc, row, c, index, e), columns, secure))
        after = w.snapshot()
        assert after == w.canonical, f"{rpc} changed {[k for k in after if after[k] != w.canonical[k]]}"
        return cells
    cells = []
    for column, want in zip(columns, secure, strict=True):
        cell = run_cell(w, rpc, row, column, index, want)
        after = w.snapshot()
        if after != w.canonical:
            changed = [k for k in after if after[k] != w.canonical[k]]
            if cell.code in ("OK", "ok-"):
                cell.code = "OK"  # a write that reached the seeded state
            else:
                cell.code += f"+changed {changed}"  # refused, yet something changed: never expected
            w.restore(after)
        cells.append(cell)
    return cells


def print_matrix(title: str, columns: list[Column], table: dict[str, list[Cell]]) -> None:
    lines = [f"\n{title}", *(f"  {c.abbr:5} {c.name}" for c in columns), textwrap.indent(LEGEND, "  ")]
    lines.append(f"{'RPC':38}" + "".join(f"{c.abbr:5}" for c in columns))
    lines += [f"{rpc:38}" + "".join(f"{cell.show():5}" for cell in cells) for rpc, cells in table.items()]
    print("\n".join(line.rstrip() for line in lines))


def test_every_rpc_by_every_caller(world: World, store_kind: str) -> None:
    started = time.monotonic()
    assert list(ROWS) == list(contract()), "every RPC of the contract has a row, in contract order"
    assert list(EXPECTED) == list(ROWS)
    table: dict[str, list[Cell]] = {}
    for index, rpc in enumerate(ROWS):
        table[rpc] = run_row(world, rpc, index, COLUMNS, ["UA"] * len(CREDENTIALS) + EXPECTED[rpc].split())
    print_matrix(
        f"Authorization matrix ({store_kind}): {len(ROWS)} RPCs x {len(COLUMNS)} callers, "
        f"{world.reseeds} reseeds, {time.monotonic() - started:.1f}s",
        COLUMNS,
        table,
    )
    wrong = [
        f"{rpc} / {column.name}: {cell.code}, expected {cell.secure}"
        for rpc, cells in table.items()
        for column, cell in zip(COLUMNS, cells, strict=True)
        if cell.code != cell.secure
    ]
    leaked = [
        f"{rpc} / {column.name} saw: {', '.join(cell.leaks)}"
        for rpc, cells in table.items()
        for column, cell in zip(COLUMNS, cells, strict=True)
        if cell.leaks
    ]
    assert not wrong, "\n".join(wrong)
    assert not leaked, "\n".join(leaked)


def test_another_project_reaches_no_project_secret(world: World) -> None:
    """A developer and a service of another project, calling every ProjectSecrets RPC on project
    A's objects: nothing of A exists for them (NF), what they list or create is their project's
    own (ok-), and their roles refuse the rest (PD); nothing of A changes, no value shows."""
    columns = [
        Column("xdev", "developer of another project", lambda w, c, i: w.auth(DEV, project=f"project-c-{i}")),
        Column("xsvc", "service matrix-api of another project",
               lambda w, c, i: w.auth(SERVICE, project=f"project-d-{i}")),
    ]  # fmt: skip
    expected = {
        #                                  xdev xsvc
        "ProjectSecrets/CreateSecretKey":  "PD   PD",
        "ProjectSecrets/GetSecretKey":     "NF   PD",  # a service reads only keys its manifest names
        "ProjectSecrets/ListSecretKeys":   "ok-  PD",
        "ProjectSecrets/UpdateSecretKey":  "PD   PD",
        "ProjectSecrets/DeleteSecretKey":  "PD   PD",
        "ProjectSecrets/CreatePullSecret": "PD   PD",
        "ProjectSecrets/UpdatePullSecret": "PD   PD",
        "ProjectSecrets/ListPullSecrets":  "ok-  PD",
        "ProjectSecrets/DeletePullSecret": "PD   PD",
        "ProjectSecrets/ApplyService":     "PD   PD",  # keys: not a developer's to give
        "ProjectSecrets/GetService":       "NF   NF",
        "ProjectSecrets/ListServices":     "ok-  PD",
        "ProjectSecrets/DeleteService":    "NF   PD",
        "ProjectSecrets/ResolveService":   "PD   NF",
    }  # fmt: skip
    assert list(expected) == [rpc for rpc in ROWS if rpc.startswith("ProjectSecrets/")]
    table = {
        rpc: run_row(world, rpc, index, columns, want.split())
        for index, (rpc, want) in enumerate(expected.items())
    }
    print_matrix("ProjectSecrets by roles of another project", columns, table)
    assert {rpc: " ".join(c.code for c in cells) for rpc, cells in table.items()} == {
        rpc: " ".join(want.split()) for rpc, want in expected.items()
    }
    assert not [(rpc, c.leaks) for rpc, cells in table.items() for c in cells if c.leaks]
    assert world.reseeds == 0, "nothing of project A changed"


# Regression tests for a bug the matrix found: room-scoped rows were keyed by the room name alone.
def test_a_room_of_another_project_is_another_room(room: Participants) -> None:
    """Rooms belong to projects (SPEC §1): room-1 of project B is not room-1 of project A. A
    token of project B with alice's identity (and room admin) must find nothing of A's room-1."""
    room.stub.SetSecret(
        pb.SetSecretRequest(secret_id="s", data=b"project-a-value"), metadata=room.auth("alice")
    )
    alice_b = room.auth("alice", project="project-b", admin=True)
    with pytest.raises(grpc.RpcError) as missing:
        room.stub.GetSecret(pb.GetSecretRequest(secret_id="s"), metadata=alice_b)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert not room.stub.ListSecrets(pb.ListSecretsRequest(), metadata=alice_b).secrets
    assert not room.stub.Exists(pb.ExistsRequest(secret_id="s"), metadata=alice_b).exists


def test_a_manifest_of_another_project_names_no_room_secret_of_this_one(room: Participants) -> None:
    """The same through ProjectSecrets: an admin of project B whose token names room-1 must not
    read a room secret of project A's room-1 through a manifest that names it: it is not the
    admin's to name (refused when applied), and even delegated to ops in project A it would be
    looked up in project B's room-1, where it does not exist."""
    room.stub.SetSecret(
        pb.SetSecretRequest(secret_id="s", data=b"project-a-value"), metadata=room.auth("alice")
    )
    admin_b = room.auth("ops", project="project-b", project_role="admin")
    project_b = project_secrets_pb2_grpc.ProjectSecretsStub(room.channel)
    manifest = textwrap.dedent(
        """
        version: v1
        kind: Service
        metadata: {name: thief}
        container:
          image: registry.example/thief:1
          environment:
            - name: STOLEN
              secret: {identity: alice, id: s}
        """
    )
    with pytest.raises(grpc.RpcError) as refused:
        project_b.ApplyService(ppb.ApplyServiceRequest(manifest=manifest), metadata=admin_b)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    room.stub.SetSecret(
        pb.SetSecretRequest(secret_id="s", data=b"project-a-value", delegated_to="ops"),
        metadata=room.auth("alice"),
    )
    with pytest.raises(grpc.RpcError) as still_refused:  # delegated in project A, not in B
        project_b.ApplyService(ppb.ApplyServiceRequest(manifest=manifest), metadata=admin_b)
    assert still_refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "project-a-value" not in f"{refused.value.details()} {still_refused.value.details()}"


# -- a server pinned to one issuer and audience: the issuer cases of the credential columns -------
ISSUER, AUDIENCE = "https://issuer.roomsecrets.test", "roomsecrets-matrix"
VALUE = b"matrix-value-3e8a1c"


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
        "no iss": bearer(room.token("alice", issuer="")),
        "other iss": bearer(room.token("alice", issuer="https://evil.example")),
        "no aud": bearer(room.token("alice", audience="")),
        "other aud": bearer(room.token("alice", audience="another-service")),
    }
    table: dict[str, list[str]] = {}
    for rpc, call in every_rpc(room.channel):
        table[rpc] = []
        for kind, md in credentials.items():
            seen = call(md)
            table[rpc].append(seen.status)
            assert seen.status == "UNAUTHENTICATED", (rpc, kind, seen.status)
            assert VALUE.decode() not in seen.text
    header = " | ".join(credentials)
    print(f"\n{'RPC':45} {header}\n" + "\n".join(f"{rpc:45} {' '.join(row)}" for rpc, row in table.items()))
    assert list(table) == list(contract())
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
