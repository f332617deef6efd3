"""Hypothesis-driven requests against the real server, on both stores: arbitrary ids, types, names,
sizes, unicode, negative and huge numbers, and arbitrary callers (token claims) of WatchRequests;
answers (ProvideSecret, RejectSecret) to real pending requests as well as to made-up ones. Every
answer is a deliberate status (never INTERNAL or UNKNOWN), INVALID_ARGUMENT names a field of the
request, no error echoes the submitted value, what was accepted reads back exactly (a provided
value reaches the asker, a rejection's reason too), and the server keeps serving. Derandomized, so
CI is repeatable; HYPOTHESIS_PROFILE=deep explores more."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import itertools
import os
import re
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import google_crc32c
import grpc
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from roomsecrets.v1 import room_secrets_pb2 as pb

from .harness import Participants, ServerThread
from .test_bad_input import violations
from .test_requests import Watcher, ask, error_reason, provider

settings.register_profile(
    "ci",
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "deep",
    max_examples=3000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DELIBERATE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

texts = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec="utf-8"), max_size=300),
    st.sampled_from(["", " ", "a b", "../x", "x\x00y", "\u202e", "é", "🔑" * 70, "x" * 5000]),
)
numbers = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, -1, 1, 2**31 - 1, -(2**31)]))
data = st.one_of(st.binary(max_size=2048), st.sampled_from([b"", b"\x00" * 10, b"v" * (1024 * 1024 + 1)]))


def call(run: object) -> tuple[grpc.StatusCode, object, grpc.RpcError | None]:
    try:
        return grpc.StatusCode.OK, run(), None  # type: ignore[operator]
    except grpc.RpcError as err:
        return err.code(), None, err


def check_error(err: grpc.RpcError | None, fields: set[str], *submitted: str | bytes) -> None:
    if err is None:
        return
    assert err.code() in DELIBERATE, (err.code(), err.details())
    message = err.details() or ""
    if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
        named = violations(err)
        assert named and set(named) <= fields, (named, message)
    for value in submitted:
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        if len(text) >= 12 and text.strip():  # long enough that a match is no coincidence
            assert text[:40] not in message, f"the error echoes a submitted value: {message[:200]!r}"


@given(secret_id=texts, type_=texts, name=texts, value=data, delegated_to=texts, etag=texts)
def test_set_secret_answers_deliberately_and_what_it_accepts_reads_back(
    room: Participants, secret_id: str, type_: str, name: str, value: bytes, delegated_to: str, etag: str
) -> None:
    md = room.auth("alice")
    request = pb.SetSecretRequest(
        secret_id=secret_id, type=type_, name=name, data=value, delegated_to=delegated_to, etag=etag
    )
    code, reply, err = call(lambda: room.stub.SetSecret(request, metadata=md, timeout=10))
    check_error(err, {"secret_id", "type", "name", "data", "delegated_to", "etag", "request"}, value)
    if code == grpc.StatusCode.OK:
        assert isinstance(reply, pb.SetSecretResponse)
        got = room.stub.GetSecret(
            pb.GetSecretRequest(secret_id=reply.secret.id, delegated_to=delegated_to), metadata=md, timeout=10
        )
        assert got.data == value and got.secret.etag == reply.secret.etag


@given(secret_id=texts, type_=texts, name=texts, delegated_to=texts, delegated_by=texts)
# Found by the deep profile: a NUL in an etag reached PostgreSQL (which refuses NUL in text) as
# INTERNAL; etags are now validated like every other text field.
@example(secret_id="0", type_="", name="\x00", delegated_to="", delegated_by="")
def test_reads_answer_deliberately(
    room: Participants, secret_id: str, type_: str, name: str, delegated_to: str, delegated_by: str
) -> None:
    md = room.auth("alice")
    fields = {"secret_id", "type", "name", "delegated_to", "delegated_by", "for_identity", "etag"}
    get = pb.GetSecretRequest(
        secret_id=secret_id, type=type_, name=name, delegated_to=delegated_to, delegated_by=delegated_by
    )
    check_error(call(lambda: room.stub.GetSecret(get, metadata=md, timeout=10))[2], fields)
    exists = pb.ExistsRequest(secret_id=secret_id, delegated_to=delegated_to, for_identity=delegated_by)
    check_error(call(lambda: room.stub.Exists(exists, metadata=md, timeout=10))[2], fields)
    delete = pb.DeleteSecretRequest(secret_id=secret_id, delegated_to=delegated_to, etag=name)
    check_error(call(lambda: room.stub.DeleteSecret(delete, metadata=md, timeout=10))[2], fields)


@given(page_size=numbers, page_token=texts)
def test_listing_with_any_page_size_and_token_answers_deliberately(
    room: Participants, page_size: int, page_token: str
) -> None:
    request = pb.ListSecretsRequest(page_size=page_size, page_token=page_token)
    code, reply, err = call(lambda: room.stub.ListSecrets(request, metadata=room.auth("alice"), timeout=10))
    check_error(err, {"page_size", "page_token"})
    if code == grpc.StatusCode.OK:
        assert isinstance(reply, pb.ListSecretsResponse)
        assert len(reply.secrets) <= max(page_size, 1000)


@settings(max_examples=40)
@given(target=texts, url=texts, type_=texts, timeout=numbers, delegate_to=texts)
def test_requests_with_any_fields_answer_deliberately(
    room: Participants, target: str, url: str, type_: str, timeout: int, delegate_to: str
) -> None:
    request = pb.RequestSecretRequest(
        from_participant_id=target, url=url, type=type_, timeout=timeout, delegate_to=delegate_to
    )
    # Nobody listens: a well-formed request fails after the short test grace (FAILED_PRECONDITION).
    _, _, err = call(lambda: room.stub.RequestSecret(request, metadata=room.auth("alice"), timeout=10))
    assert err is not None
    check_error(err, {"from_participant_id", "url", "type", "timeout", "delegate_to"})


@pytest.fixture(autouse=True)
def still_serving(room: Participants) -> object:
    yield None
    room.stub.SetSecret(pb.SetSecretRequest(secret_id="alive", data=b"yes"), metadata=room.auth("alice"))
    got = room.stub.GetSecret(pb.GetSecretRequest(secret_id="alive"), metadata=room.auth("alice"))
    assert got.data == b"yes"


# -- the answering side: ProvideSecret, RejectSecret, DeleteRequestedSecret, WatchRequests ---------
def examples(n: int) -> int:
    """Modest in CI, 20x with HYPOTHESIS_PROFILE=deep."""
    return n * 20 if os.environ.get("HYPOTHESIS_PROFILE") == "deep" else n


# The RoomSecrets RPCs this file fuzzes; tests/test_fuzz_services.py's registry (COVERED) holds the
# OAuth ones, and test_every_room_secrets_rpc_is_fuzzed asserts that together they are all.
FUZZED_HERE = frozenset(
    {
        "SetSecret",
        "GetSecret",
        "Exists",
        "DeleteSecret",
        "ListSecrets",
        "RequestSecret",
        "ProvideSecret",
        "RejectSecret",
        "DeleteRequestedSecret",
        "WatchRequests",
    }
)

Code = grpc.StatusCode
Metadata = tuple[tuple[str, str], ...]
DEFAULT_TYPE = "application/octet-stream"
RESERVED_PREFIX = "application/vnd.roomsecrets."  # types of rows the server writes (OAuth tokens)
OAUTH_TOKEN_TYPE = RESERVED_PREFIX + "oauth-token+json"
# The server's rules, restated so the oracle does not borrow the code it checks (validate.py).
_ID = re.compile(r"[A-Za-z0-9._~:@/+=%-]{1,256}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
CONTROL = "".join(map(chr, [*range(0x20), 0x7F]))


def bad_text(value: str, limit: int, *, required: bool = False) -> bool:
    return (required and not value) or len(value) > limit or bool(_CONTROL.search(value))


def bad_identity(value: str) -> bool:
    return len(value) > 256 or bool(_CONTROL.search(value)) or value != value.strip()


def clean(max_size: int, min_size: int = 0) -> st.SearchStrategy[str]:
    """Unicode without ASCII control characters (what every free-text field accepts)."""
    alphabet = st.characters(codec="utf-8", exclude_characters=CONTROL)
    return st.text(alphabet, min_size=min_size, max_size=max_size)


request_ids = st.one_of(
    texts,
    st.from_regex(r"[A-Za-z0-9._~:@/+=%-]{1,40}", fullmatch=True),
    st.sampled_from(["i" * 256, "i" * 257, "0" * 32, "a b", "ü", "%00"]),
)
values = st.one_of(st.binary(max_size=300), st.binary(max_size=300), data, st.just(b"v" * (1024 * 1024)))
# The CRC32C to send: none, the right one, the right one plus 2**32 (same low 32 bits), or any int64.
RIGHT, WRAPPED = "right", "right + 2**32"
crcs = st.one_of(
    st.sampled_from([None, RIGHT]),
    st.sampled_from([None, RIGHT]),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([WRAPPED, 0, -1, 2**32 - 1, 2**32, 2**63 - 1, -(2**63)]),
)
reasons = st.one_of(
    texts,
    clean(100),
    clean(100),
    st.sampled_from(["", "r" * 1024, "r" * 1025, "é" * 1024, "\U0001f511" * 1024, "line\nbreak", "tab\t"]),
)
# What alice asks bob for, when a pending request is needed: (url, type, delegate_to), all valid.
asks = st.tuples(
    st.one_of(
        st.sampled_from(["https://git.example/repo.git", "ssh://git@h.example:22/r", "é ü \U0001f511"]),
        clean(60, 1),
        st.just("https://h.example/" + "p" * 2000),
    ),
    st.one_of(
        st.sampled_from(["", "git", "text/plain; charset=utf-8", "t" * 255, OAUTH_TOKEN_TYPE]), clean(40)
    ),
    st.sampled_from(["", "alice", "alice", "carol", "é"]),
)
# Who calls: the participant asked (bob), the asker, a bystander, bob in another room of the
# project, and bob with a token that has no secrets grant.
CALLERS: dict[str, dict[str, Any]] = {
    "bob": {"identity": "bob"},
    "alice": {"identity": "alice"},
    "carol": {"identity": "carol"},
    "bob in room-2": {"identity": "bob", "room": "room-2"},
    "bob without the secrets grant": {"identity": "bob", "secrets_grant": False},
    "alice without the secrets grant": {"identity": "alice", "secrets_grant": False},
}
answerers = st.sampled_from(["bob", "bob", "bob", *CALLERS])


def not_in(request_id: str, *values: str | bytes) -> list[str | bytes]:
    """The submitted values an error must not echo: those that are not part of the request id
    (which an error may name), as hypothesis likes to draw the same text twice."""
    return [
        v for v in values if (v.decode(errors="replace") if isinstance(v, bytes) else v) not in request_id
    ]


def caller(room: Participants, who: str) -> Metadata:
    kwargs = dict(CALLERS[who])
    return room.auth(kwargs.pop("identity"), **kwargs)


def answer_outcome(who: str, which: str, invalid: set[str]) -> grpc.StatusCode:
    """What ProvideSecret / RejectSecret must answer: the grant, then the fields, then the request
    (found in the caller's room, addressed to the caller, of the right kind, still pending)."""
    if not CALLERS[who].get("secrets_grant", True):
        return Code.PERMISSION_DENIED
    if invalid:
        return Code.INVALID_ARGUMENT
    if which == "made up" or "room" in CALLERS[who]:
        return Code.NOT_FOUND
    if CALLERS[who]["identity"] != "bob":
        return Code.PERMISSION_DENIED
    return Code.OK if which == "pending" else Code.FAILED_PRECONDITION  # answered, or an OAuth one


class Pending:
    """alice's RequestSecret to bob (test_requests' `ask`, on a thread), pending until answered."""

    numbers = itertools.count()

    def __init__(
        self, room: Participants, bob: Watcher, pool: ThreadPoolExecutor, shape: tuple[str, str, str]
    ):
        url, self.type, self.delegate_to = shape
        self.url = f"{url}#{next(Pending.numbers)}"  # unique: never answered from storage, never joined
        self.future = pool.submit(
            ask, room, url=self.url, type=self.type, delegate_to=self.delegate_to, timeout=60
        )
        deadline = time.monotonic() + 10
        while not (
            found := [
                e
                for e in list(bob.events)
                if e.HasField("secret_request") and e.secret_request.url == self.url
            ]
        ):
            if self.future.done():
                reply = self.future.result()  # raises the refusal
                raise AssertionError(f"answered without asking bob: {reply!r:.200}")
            assert time.monotonic() < deadline, "the request never reached bob"
            time.sleep(0.005)
        inbound = found[0]
        self.request_id = inbound.secret_request.request_id
        assert (inbound.secret_request.type, inbound.secret_request.delegate_to) == (
            self.type or DEFAULT_TYPE,
            self.delegate_to,
        )
        assert inbound.secret_request.requested_by == "alice"


class Answering:
    """bob watches (answering nothing by himself). An example that answers a pending request gets
    a new one, opened for it (so it replays alike); the ids of answered requests and of one
    pending OAuth request are kept across examples."""

    def __init__(self, room: Participants) -> None:
        self.room = room
        self.bob = Watcher(room, "bob")
        self.pool = ThreadPoolExecutor(2)
        self.pending: Pending | None = None
        self.answered: list[str] = []
        self.oauth: tuple[str, grpc.Future[pb.RequestOAuthTokenResponse]] | None = None

    def request_id(self, which: str, made_up: str, shape: tuple[str, str, str]) -> str:
        self.discard()  # what an example that failed left
        if which == "pending":
            self.pending = self.open(shape)
            return self.pending.request_id
        if which == "answered":
            if not self.answered:
                self.reject(self.open(shape), "closing it")
            return self.answered[0]
        if which == "oauth":
            return self.oauth_request_id()
        return made_up

    def open(self, shape: tuple[str, str, str]) -> Pending:
        try:
            return Pending(self.room, self.bob, self.pool, shape)
        except grpc.RpcError as err:
            # SetSecret refuses the types the server keeps for itself; RequestSecret may refuse
            # them too (naming the type). If it accepts one, bob's answer must be stored readably.
            assert shape[1].startswith(RESERVED_PREFIX), (err.code(), err.details())
            assert (err.code(), violations(err)) == (Code.INVALID_ARGUMENT, ["type"]), err.details()
            return Pending(self.room, self.bob, self.pool, (shape[0], "", shape[2]))

    def withdraw(self) -> None:
        """bob rejects the request a refused answer left: it must still be pending (the asker
        still waits, bob heard no close, and RejectSecret succeeds)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        assert not pending.future.done(), "a refused answer closed the request"
        closed = {e.request_closed.request_id for e in list(self.bob.events) if e.HasField("request_closed")}
        assert pending.request_id not in closed, "bob was told a request closed that a refused answer left"
        self.reject(pending, "withdrawn")

    def discard(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            reject = pb.RejectSecretRequest(request_id=pending.request_id, error="discarded")
            call(lambda: self.room.stub.RejectSecret(reject, metadata=self.room.auth("bob"), timeout=10))
            call(lambda: pending.future.result(timeout=10))

    def reject(self, pending: Pending, reason: str) -> None:
        request = pb.RejectSecretRequest(request_id=pending.request_id, error=reason)
        self.room.stub.RejectSecret(request, metadata=self.room.auth("bob"), timeout=10)
        with pytest.raises(grpc.RpcError):
            pending.future.result(timeout=10)
        self.answered.append(pending.request_id)
        if pending is self.pending:
            self.pending = None

    def oauth_request_id(self) -> str:
        if self.oauth is None:
            config = pb.OAuthClientConfig(
                client_id="app",
                authorization_endpoint="https://auth.example/authorize",
                token_endpoint="https://auth.example/token",
            )
            request = pb.RequestOAuthTokenRequest(
                oauth=config, from_participant_id="bob", redirect_uri="https://app.example/cb", timeout=3600
            )  # pending for as long as the test runs (HYPOTHESIS_PROFILE=deep included)
            future = self.room.stub.RequestOAuthToken.future(
                request, metadata=self.room.auth("alice"), timeout=3600
            )
            event = self.bob.wait_for(lambda e: e.HasField("oauth_request"))
            self.oauth = (event.oauth_request.request_id, future)
        return self.oauth[0]

    def close(self) -> None:
        self.discard()
        if self.oauth is not None:
            request_id, future = self.oauth
            reject = pb.RejectOAuthAuthorizationRequest(request_id=request_id, error="the test is over")
            self.room.stub.RejectOAuthAuthorization(reject, metadata=self.room.auth("bob"), timeout=10)
            assert call(lambda: future.result(timeout=10))[0] == Code.PERMISSION_DENIED
        self.bob.cancel()
        self.pool.shutdown()


@pytest.fixture
def answering(room: Participants) -> Iterator[Answering]:
    flow = Answering(room)
    yield flow
    flow.close()


async def _server_tasks() -> tuple[int, list[str]]:
    """How many asyncio tasks the server has, and which of its background loops run."""
    tasks = asyncio.all_tasks()
    names = (getattr(t.get_coro(), "__qualname__", "") for t in tasks)
    return len(tasks), sorted(name for name in names if name.endswith("_forever"))


@pytest.fixture
def settled(server: ServerThread) -> Iterator[None]:
    """Afterwards every call, request and stream the test opened is over in the server (its
    asyncio task count is back to where it started; streams closed wait out the listener grace),
    and its background loops (sweeper, PostgreSQL LISTEN / NOTIFY / heartbeat) still run."""
    before, loops = server.call(_server_tasks())
    yield
    deadline = time.monotonic() + 10
    while (now := server.call(_server_tasks()))[0] > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert now[1] == loops, f"background loops that stopped: {sorted(set(loops) - set(now[1]))}"
    assert now[0] <= before, f"{now[0] - before} server tasks left behind"


@settings(max_examples=examples(120))
@given(
    which=st.sampled_from(["pending", "pending", "pending", "answered", "oauth", "made up"]),
    request_id=request_ids,
    value=values,
    crc=crcs,
    who=answerers,
    shape=asks,
)
@example(
    which="pending",
    request_id="",
    value=b"v" * (1024 * 1024),
    crc=RIGHT,
    who="bob",
    shape=("https://git.example/repo.git", "", "alice"),
)
# The type of the rows that hold OAuth token sets, which SetSecret refuses to write and GetSecret
# to read: RequestSecret accepts it, and bob's answer is then stored where GetSecret will not read
# it (FAILED_PRECONDITION "kept by the server"). The same gap lets RequestSecret answer a stored
# token set (refresh token included) from storage to its delegate.
@example(
    which="pending", request_id="", value=b"x", crc=None, who="bob", shape=("u", OAUTH_TOKEN_TYPE, "alice")
)
def test_provide_secret_answers_deliberately_and_the_value_reaches_the_asker(
    room: Participants,
    settled: None,
    answering: Answering,
    which: str,
    request_id: str,
    value: bytes,
    crc: str | int | None,
    who: str,
    shape: tuple[str, str, str],
) -> None:
    request_id = answering.request_id(which, request_id, shape)
    pending = answering.pending if which == "pending" else None
    request = pb.ProvideSecretRequest(request_id=request_id, data=value)
    checksum = google_crc32c.value(value)
    if crc is not None:
        request.data_crc32c = checksum if crc == RIGHT else checksum + 2**32 if crc == WRAPPED else int(crc)
    invalid = {
        *(["request_id"] if not _ID.fullmatch(request_id) else []),
        *(["data"] if len(value) > room.server.settings.max_value_bytes else []),
        *(["data_crc32c"] if request.HasField("data_crc32c") and request.data_crc32c != checksum else []),
    }
    code, _, err = call(lambda: room.stub.ProvideSecret(request, metadata=caller(room, who), timeout=15))
    event(f"ProvideSecret, {which} request: {code.name}")
    check_error(err, invalid, *not_in(request_id, value))
    assert code == answer_outcome(who, which, invalid), (code, err and err.details())
    if code != Code.OK:
        answering.withdraw()
        return
    assert pending is not None
    answering.pending = None
    answering.answered.append(request_id)
    # The asker gets exactly the value; bob's stream hears the request was provided.
    reply = pending.future.result(timeout=10)
    assert (reply.data, reply.data_crc32c, reply.request_id) == (value, checksum, request_id)
    closed = answering.bob.closed(request_id)
    assert (closed.state, closed.reason) == (pb.REQUEST_STATE_PROVIDED, "")
    # Stored as bob's secret keyed by (url, type), delegated to delegate_to (README, "Asking another
    # participant"); the delegate reads it as delegated by bob.
    stored_type = pending.type or DEFAULT_TYPE
    lookup = pb.GetSecretRequest(type=stored_type, name=pending.url, delegated_to=pending.delegate_to)
    got = room.stub.GetSecret(lookup, metadata=room.auth("bob"), timeout=10)
    assert (got.data, got.data_crc32c) == (value, checksum)
    assert (got.secret.type, got.secret.name, got.secret.delegated_to) == (
        stored_type,
        pending.url,
        pending.delegate_to,
    )
    if pending.delegate_to:
        lookup = pb.GetSecretRequest(type=stored_type, name=pending.url, delegated_by="bob")
        got = room.stub.GetSecret(lookup, metadata=room.auth(pending.delegate_to), timeout=10)
        assert got.data == value and got.secret.delegated_by == "bob"


@settings(max_examples=examples(100))
@given(
    which=st.sampled_from(["pending", "pending", "pending", "answered", "oauth", "made up"]),
    request_id=request_ids,
    reason=reasons,
    who=answerers,
    shape=asks,
)
def test_reject_secret_answers_deliberately_and_the_reason_reaches_the_asker(
    room: Participants,
    settled: None,
    answering: Answering,
    which: str,
    request_id: str,
    reason: str,
    who: str,
    shape: tuple[str, str, str],
) -> None:
    request_id = answering.request_id(which, request_id, shape)
    pending = answering.pending if which == "pending" else None
    request = pb.RejectSecretRequest(request_id=request_id, error=reason)
    invalid = {
        *(["request_id"] if not _ID.fullmatch(request_id) else []),
        *(["error"] if bad_text(reason, 1024) else []),
    }
    code, _, err = call(lambda: room.stub.RejectSecret(request, metadata=caller(room, who), timeout=15))
    event(f"RejectSecret, {which} request: {code.name}")
    check_error(err, invalid, *not_in(request_id, reason))
    assert code == answer_outcome(who, which, invalid), (code, err and err.details())
    if code != Code.OK:
        answering.withdraw()
        return
    assert pending is not None
    answering.pending = None
    answering.answered.append(request_id)
    # The asker is refused with bob's reason (cut short past the size a status may carry); bob's
    # stream hears the request was rejected, with the whole reason.
    told_code, _, asked = call(lambda: pending.future.result(timeout=10))
    assert told_code == Code.PERMISSION_DENIED and asked is not None, told_code
    assert error_reason(asked) == "REQUEST_REJECTED"
    given_reason = reason or "rejected"
    told = (asked.details() or "").partition(f"request {request_id}: ")[2]
    assert told == given_reason or (told.endswith("…") and given_reason.startswith(told[:-1])), told
    closed = answering.bob.closed(request_id)
    assert (closed.state, closed.reason) == (pb.REQUEST_STATE_REJECTED, given_reason)


REQUESTED_VALUE = b"requested-value-0b9d7e41"


@dataclasses.dataclass
class Provided:
    bob: Watcher
    # (url, type, delegated_to) of the secrets bob provided that are still stored.
    stored: set[tuple[str, str, str]] = dataclasses.field(default_factory=set)


@pytest.fixture
def providing(room: Participants) -> Iterator[Provided]:
    """bob watches and provides REQUESTED_VALUE to every request."""
    bob = Watcher(room, "bob", provider(room, "bob", REQUESTED_VALUE))
    yield Provided(bob)
    bob.cancel()


@settings(max_examples=examples(100))
@given(
    url=st.one_of(
        clean(60, 1),
        clean(60, 1),
        st.sampled_from(["https://git.example/repo.git", "é ü \U0001f511", "u" * 2048]),
        st.one_of(texts, st.sampled_from(["", "u" * 2049, "line\nbreak"])),
    ),
    type_=st.one_of(
        st.sampled_from(["", "", "git", DEFAULT_TYPE, "t" * 255]),
        st.one_of(texts, st.just("t" * 256)),
    ),
    delegated_to=st.one_of(
        st.sampled_from(["", "alice", "alice", "alice", "carol", "bob", "é", "a" * 256]),
        st.one_of(texts, st.sampled_from([" alice", "alice\n", "a" * 257])),
    ),
    who=st.sampled_from(["alice", "alice", "alice", "bob", "carol", "alice without the secrets grant"]),
    seed=st.booleans(),
)
def test_delete_requested_secret_answers_deliberately_and_deletes_what_was_provided(
    room: Participants,
    settled: None,
    providing: Provided,
    url: str,
    type_: str,
    delegated_to: str,
    who: str,
    seed: bool,
) -> None:
    invalid = {
        *(["url"] if bad_text(url, 2048, required=True) else []),
        *(["type"] if bad_text(type_, 255) else []),
        *(["delegated_to"] if bad_identity(delegated_to) else []),
    }
    key = (url, type_ or DEFAULT_TYPE, delegated_to)
    if seed and not invalid:
        # alice asks bob for (url, type), delegated to `delegated_to`; bob provides. Asked again
        # with delegate_to=alice while it is stored, it is answered from storage, without a prompt.
        prompts = len(providing.bob.requests())
        reply = ask(room, url=url, type=type_, delegate_to=delegated_to, timeout=10)
        assert reply.data == REQUESTED_VALUE
        from_storage = key in providing.stored and delegated_to == "alice"
        assert len(providing.bob.requests()) == prompts + (not from_storage)
        providing.stored.add(key)
    request = pb.DeleteRequestedSecretRequest(url=url, type=type_, delegated_to=delegated_to)
    code, _, err = call(
        lambda: room.stub.DeleteRequestedSecret(request, metadata=caller(room, who), timeout=10)
    )
    event(f"DeleteRequestedSecret{' (seeded)' if seed else ''}: {code.name}")
    check_error(err, invalid)
    # Deleted by its owner (bob) or its delegate; anyone else finds nothing to delete.
    if not CALLERS[who].get("secrets_grant", True):
        expected = Code.PERMISSION_DENIED
    elif invalid:
        expected = Code.INVALID_ARGUMENT
    elif key in providing.stored and CALLERS[who]["identity"] in ("bob", delegated_to):
        expected = Code.OK
    else:
        expected = Code.NOT_FOUND
    assert code == expected, (code, err and err.details())
    if code == Code.OK:
        providing.stored.discard(key)
    if not invalid:  # bob's secret for (url, type, delegated_to) is there exactly when not deleted
        lookup = pb.GetSecretRequest(type=key[1], name=url, delegated_to=delegated_to)
        found, got, _ = call(lambda: room.stub.GetSecret(lookup, metadata=room.auth("bob"), timeout=10))
        assert found == (Code.OK if key in providing.stored else Code.NOT_FOUND)
        assert not isinstance(got, pb.GetSecretResponse) or got.data == REQUESTED_VALUE


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


_field_no = st.integers(1, 2**29 - 1)
# Well-formed fields a request message does not declare (a newer client's), of every wire type.
unknown_fields = st.lists(
    st.one_of(
        st.tuples(_field_no, st.integers(0, 2**64 - 1)).map(lambda t: _varint(t[0] << 3) + _varint(t[1])),
        st.tuples(_field_no, st.binary(max_size=64)).map(
            lambda t: _varint(t[0] << 3 | 2) + _varint(len(t[1])) + t[1]
        ),
        st.tuples(_field_no, st.binary(min_size=4, max_size=4)).map(lambda t: _varint(t[0] << 3 | 5) + t[1]),
        st.tuples(_field_no, st.binary(min_size=8, max_size=8)).map(lambda t: _varint(t[0] << 3 | 1) + t[1]),
    ),
    max_size=4,
).map(b"".join)
# The caller is the input of WatchRequests: a token's name, room and role, with or without grants.
# A token is JSON, so its claims may hold what protobuf strings cannot: lone surrogates.
surrogates = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3)
watch_identities = st.one_of(
    st.sampled_from(["bob", "carol", "é", "\U0001f511", " bob", "b\x00b", "b\nb", "b" * 256, "b" * 257, ""]),
    clean(40, 1),
    texts,
    surrogates,
)
room_names = st.one_of(
    st.just("room-1"), st.just("room-1"), st.sampled_from(["", "r\x00", "é", "r" * 300]), texts
)
ROLES = ("user", "agent", "tool")


PLAIN_CALLER: dict[str, Any] = {
    "room_name": "room-1",
    "role": "user",
    "project": "dev-project",
    "secrets_grant": True,
    "admin": False,
    "raw": b"",
    "probe": False,
}


def unusual(value: str) -> bool:
    """Not a plain name: the server may refuse a token carrying it (UNAUTHENTICATED)."""
    return bad_identity(value) or any("\ud800" <= c <= "\udfff" for c in value)


def next_event(stream: Iterable[pb.WatchRequestsResponse]) -> pb.WatchRequestsResponse | None:
    return next(iter(stream), None)  # the call is its own iterator: this reads on


@settings(max_examples=examples(60))
@given(
    identity=watch_identities,
    room_name=room_names,
    role=st.sampled_from([*ROLES, "", "admin"]),
    project=st.one_of(
        st.just("dev-project"), st.just("dev-project"), st.sampled_from(["", "p/q", "/" * 2700]), texts
    ),
    secrets_grant=st.sampled_from([True, True, True, False]),
    admin=st.booleans(),
    raw=unknown_fields,
    probe=st.booleans(),
)
# Token claims the server does not check reach the store. A lone surrogate (JSON may escape one) in
# `name` or in the `room` grant cannot be encoded for SQLite or PostgreSQL: INTERNAL on both stores.
@example(identity="b\ud800", **PLAIN_CALLER)
# A NUL in `name` or `room`: PostgreSQL refuses it in text, INTERNAL.
@example(identity="bob", **{**PLAIN_CALLER, "room_name": "r\x00"})
# A `sub` (project) of 2700 slashes percent-encodes to 8100 bytes of room scope: on PostgreSQL the
# replica's NOTIFY payload passes PostgreSQL's 8000-byte limit and the NOTIFY loop dies (`settled`
# sees it gone), so no event from this replica reaches the others any more.
@example(identity="bob", **{**PLAIN_CALLER, "project": "/" * 2700})
def test_watch_requests_answers_any_caller_deliberately(
    room: Participants,
    settled: None,
    identity: str,
    room_name: str,
    role: str,
    project: str,
    secrets_grant: bool,
    admin: bool,
    raw: bytes,
    probe: bool,
) -> None:
    """Open the stream as a fuzzed caller and read its first event (or its error), briefly; with
    `probe`, alice then asks the caller, the request reaches its stream, and it rejects it."""
    md = room.auth(
        identity, room=room_name, role=role, project=project, secrets_grant=secrets_grant, admin=admin
    )
    stream = room.stub.WatchRequests(pb.WatchRequestsRequest.FromString(raw), metadata=md)
    with ThreadPoolExecutor(2) as pool:
        try:
            try:
                code, first, err = call(lambda: pool.submit(next_event, stream).result(timeout=5))
            except TimeoutError:
                raise AssertionError("neither an event nor an error within 5 s") from None
            event(f"WatchRequests: {code.name}")
            # RESOURCE_EXHAUSTED: gRPC's 8 KiB limit on metadata refused a token that large.
            too_large = {Code.RESOURCE_EXHAUSTED} if len(md[0][1]) > 7000 else set()
            if err is not None:
                assert err.code() in {Code.UNAUTHENTICATED, Code.PERMISSION_DENIED, *too_large}, (
                    err.code(),
                    err.details(),
                )
            if code in too_large:
                return
            if not identity or not room_name or not project or role not in (*ROLES, ""):
                assert code == Code.UNAUTHENTICATED, code  # a token names its project (`sub`)
            elif unusual(identity) or unusual(room_name) or unusual(project):
                # Name-like claims are checked at the door (auth/principal.py _claim_text).
                assert code == Code.UNAUTHENTICATED, (code, err and err.details())
            elif not secrets_grant:
                assert code == Code.PERMISSION_DENIED, code
            else:
                assert code == Code.OK, (code, err and err.details())
            if code != Code.OK:
                return
            # Nothing is pending for the caller: the replay is empty, then `ready`.
            assert isinstance(first, pb.WatchRequestsResponse), "the stream ended without an event"
            assert first.WhichOneof("event") == "ready" and first.ready.pending == 0, first
            if not (
                probe and (room_name, project) == ("room-1", "dev-project") and not bad_identity(identity)
            ):
                return
            asked = pool.submit(ask, room, "alice", identity, url="probe", timeout=10)
            pushed = pool.submit(next_event, stream).result(timeout=10)
            assert isinstance(pushed, pb.WatchRequestsResponse) and pushed.HasField("secret_request"), pushed
            inbound = pushed.secret_request
            assert (inbound.url, inbound.requested_by) == ("probe", "alice")
            reject = pb.RejectSecretRequest(request_id=inbound.request_id, error="probed")
            room.stub.RejectSecret(reject, metadata=md, timeout=10)
            told, _, refused = call(lambda: asked.result(timeout=10))
            assert told == Code.PERMISSION_DENIED and refused is not None, told
            assert (refused.details() or "").endswith(": probed")
        finally:
            stream.cancel()  # type: ignore[no-untyped-call]


def test_every_room_secrets_rpc_is_fuzzed() -> None:
    """What this file fuzzes (FUZZED_HERE) and what tests/test_fuzz_services.py's registry holds
    are, together, every RPC of roomsecrets.v1.RoomSecrets; and each listed here is called here."""
    services = importlib.import_module(".test_fuzz_services", __package__)  # it imports this module

    declared = set(pb.DESCRIPTOR.services_by_name["RoomSecrets"].methods_by_name)
    elsewhere: set[str] = services.COVERED.get("RoomSecrets", set())
    assert declared >= FUZZED_HERE, f"not RoomSecrets RPCs: {sorted(FUZZED_HERE - declared)}"
    assert FUZZED_HERE | elsewhere == declared, f"not fuzzed: {sorted(declared - FUZZED_HERE - elsewhere)}"
    source = Path(__file__).read_text()
    assert not [rpc for rpc in FUZZED_HERE if f"stub.{rpc}(" not in source]
