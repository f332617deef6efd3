"""Bad input (SPEC §5): INVALID_ARGUMENT naming the field in google.rpc.BadRequest, messages that
never echo the submitted value, size limits, integrity checks, and a server that keeps serving."""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from collections.abc import Callable, Iterator

import google_crc32c
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from roomsecrets.v1 import oauth_connectors_pb2, project_secrets_pb2
from roomsecrets.v1 import room_secrets_pb2 as pb

from .harness import Participants

MIB = 1024 * 1024


def marker(length: int = 40) -> str:
    """A recognizable, valid-looking value of exactly `length` characters."""
    base = f"MARK{secrets.token_hex(16)}"
    return (base * (length // len(base) + 1))[:length]


def fails(call: Callable[[], object], code: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    err = caught.value
    assert err.code() == code, f"expected {code}, got {err.code()}: {(err.details() or '')[:300]}"
    return err


def violations(err: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "INVALID_ARGUMENT carries no google.rpc.Status details"
    fields: list[str] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields.extend(v.field for v in bad.field_violations)
            for v in bad.field_violations:
                assert v.description, "a field violation without a description"
    return fields


def invalid(call: Callable[[], object], field: str, *submitted: str | bytes) -> grpc.RpcError:
    """Asserts INVALID_ARGUMENT naming `field` (message and BadRequest), never echoing `submitted`."""
    err = fails(call, grpc.StatusCode.INVALID_ARGUMENT)
    message = err.details() or ""
    assert field in violations(err), f"BadRequest does not name {field!r}: {violations(err)}"
    assert field in message, f"message does not name {field!r}: {message!r}"
    for value in submitted:
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        probe = text[:20] if len(text) > 20 else text
        if probe.strip():
            assert probe not in message, f"message echoes the submitted value: {message[:200]!r}"
    return err


def set_req(room: Participants, md: tuple[tuple[str, str], ...], **fields: object) -> Callable[[], object]:
    return lambda: room.stub.SetSecret(pb.SetSecretRequest(**fields), metadata=md)  # type: ignore[arg-type]


def get_req(room: Participants, md: tuple[tuple[str, str], ...], **fields: str) -> Callable[[], object]:
    return lambda: room.stub.GetSecret(pb.GetSecretRequest(**fields), metadata=md)


def exists(room: Participants, md: tuple[tuple[str, str], ...], secret_id: str) -> bool:
    return bool(room.stub.Exists(pb.ExistsRequest(secret_id=secret_id), metadata=md).exists)


def still_serves(room: Participants) -> None:
    md = room.auth("healthy")
    value = secrets.token_bytes(32)
    room.stub.SetSecret(pb.SetSecretRequest(secret_id="after-bad-input", data=value), metadata=md)
    got = room.stub.GetSecret(pb.GetSecretRequest(secret_id="after-bad-input"), metadata=md)
    assert got.data == value


@pytest.fixture
def api(room: Participants) -> Iterator[Participants]:
    """The room, checked after the test to still serve a normal SetSecret/GetSecret."""
    yield room
    still_serves(room)


# -- secret ids ---------------------------------------------------------------------------------------
def test_set_without_id_or_name_names_secret_id(api: Participants) -> None:
    md = api.auth("alice")
    value = marker().encode()
    invalid(set_req(api, md, data=value), "secret_id", value)
    invalid(set_req(api, md, type="git", data=value), "secret_id", value)
    assert list(api.stub.ListSecrets(pb.ListSecretsRequest(), metadata=md).secrets) == []


def test_get_exists_delete_without_id_name_secret_id(api: Participants) -> None:
    md = api.auth("alice")
    invalid(get_req(api, md), "secret_id")
    invalid(get_req(api, md, type="git"), "secret_id")
    invalid(lambda: api.stub.Exists(pb.ExistsRequest(), metadata=md), "secret_id")
    invalid(lambda: api.stub.DeleteSecret(pb.DeleteSecretRequest(), metadata=md), "secret_id")


BAD_IDS: dict[str, Callable[[], str]] = {
    "too-long": lambda: marker(257),
    "space": lambda: f"{marker(20)} x",
    "leading-space": lambda: f" {marker(20)}",
    "newline": lambda: f"{marker(20)}\nx",
    "nul": lambda: f"{marker(20)}\x00x",
    "tab": lambda: f"{marker(20)}\tx",
    "del": lambda: f"{marker(20)}\x7fx",
    "escape": lambda: f"{marker(20)}\x1b[31m",
    "non-ascii": lambda: f"{marker(20)}é",
    "quote": lambda: f"{marker(20)}'x",
}


@pytest.mark.parametrize("kind", list(BAD_IDS))
def test_bad_secret_id_is_invalid_argument_on_every_rpc(api: Participants, kind: str) -> None:
    md = api.auth("alice")
    bad = BAD_IDS[kind]()
    value = marker().encode()
    invalid(set_req(api, md, secret_id=bad, data=value), "secret_id", bad, value)
    invalid(get_req(api, md, secret_id=bad), "secret_id", bad)
    invalid(lambda: api.stub.Exists(pb.ExistsRequest(secret_id=bad), metadata=md), "secret_id", bad)
    invalid(
        lambda: api.stub.DeleteSecret(pb.DeleteSecretRequest(secret_id=bad), metadata=md), "secret_id", bad
    )
    assert list(api.stub.ListSecrets(pb.ListSecretsRequest(), metadata=md).secrets) == []


def test_longest_allowed_id_works(api: Participants) -> None:
    md = api.auth("alice")
    longest = marker(256)
    api.stub.SetSecret(pb.SetSecretRequest(secret_id=longest, data=b"v"), metadata=md)
    assert api.stub.GetSecret(pb.GetSecretRequest(secret_id=longest), metadata=md).data == b"v"


# -- values -------------------------------------------------------------------------------------------
def test_value_over_the_limit_names_data_and_never_echoes_it(api: Participants) -> None:
    md = api.auth("alice")
    mark = marker().encode()
    value = (mark * (MIB // len(mark) + 2))[: MIB + 1]
    err = invalid(set_req(api, md, secret_id="big", data=value), "data", mark)
    assert len(err.details() or "") < 1000
    assert not exists(api, md, "big")


def test_value_at_the_limit_is_accepted(api: Participants) -> None:
    md = api.auth("alice")
    value = secrets.token_bytes(MIB)
    api.stub.SetSecret(pb.SetSecretRequest(secret_id="max", data=value), metadata=md)
    got = api.stub.GetSecret(pb.GetSecretRequest(secret_id="max"), metadata=md)
    assert got.data == value
    assert got.data_crc32c == google_crc32c.value(value)


def test_over_limit_value_does_not_replace_the_stored_one(api: Participants) -> None:
    md = api.auth("alice")
    api.stub.SetSecret(pb.SetSecretRequest(secret_id="keep", data=b"original"), metadata=md)
    invalid(set_req(api, md, secret_id="keep", data=b"x" * (MIB + 1)), "data")
    assert api.stub.GetSecret(pb.GetSecretRequest(secret_id="keep"), metadata=md).data == b"original"


def test_message_over_the_max_message_size_is_resource_exhausted(api: Participants) -> None:
    md = api.auth("alice")
    mark = marker().encode()
    value = (mark * (2 * MIB // len(mark) + 1))[: 2 * MIB]
    err = fails(set_req(api, md, secret_id="huge", data=value), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert mark.decode() not in (err.details() or "")
    assert not exists(api, md, "huge")
    # Again, and on another RPC: still refused cleanly.
    fails(
        lambda: api.stub.ProvideSecret(pb.ProvideSecretRequest(request_id="r", data=value), metadata=md),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    still_serves(api)


def test_wrong_crc32c_names_data_crc32c_and_stores_nothing(api: Participants) -> None:
    md = api.auth("alice")
    value = marker().encode()
    right = int(google_crc32c.value(value))
    for wrong in ((right + 1) % 2**32, 0 if right else 1, -1, 2**32 + right, -right):
        invalid(set_req(api, md, secret_id="crc", data=value, data_crc32c=wrong), "data_crc32c", value)
    assert not exists(api, md, "crc")
    # By (type, name) too.
    invalid(set_req(api, md, type="git", name="crc-named", data=value, data_crc32c=right ^ 1), "data_crc32c")
    assert list(api.stub.ListSecrets(pb.ListSecretsRequest(), metadata=md).secrets) == []


def test_wrong_crc32c_leaves_the_previous_value(api: Participants) -> None:
    md = api.auth("alice")
    api.stub.SetSecret(pb.SetSecretRequest(secret_id="crc", data=b"previous"), metadata=md)
    before = api.stub.GetSecret(pb.GetSecretRequest(secret_id="crc"), metadata=md)
    invalid(set_req(api, md, secret_id="crc", data=b"next", data_crc32c=12345), "data_crc32c")
    after = api.stub.GetSecret(pb.GetSecretRequest(secret_id="crc"), metadata=md)
    assert after.data == b"previous"
    assert after.secret.etag == before.secret.etag


def test_stale_etag_is_aborted_and_nothing_changes(api: Participants) -> None:
    md = api.auth("alice")
    first = api.stub.SetSecret(pb.SetSecretRequest(secret_id="cas", data=b"v1"), metadata=md).secret
    second = api.stub.SetSecret(pb.SetSecretRequest(secret_id="cas", data=b"v2"), metadata=md).secret
    value = marker().encode()
    err = fails(set_req(api, md, secret_id="cas", data=value, etag=first.etag), grpc.StatusCode.ABORTED)
    assert value.decode() not in (err.details() or "")
    fails(set_req(api, md, secret_id="cas", data=value, etag="not-an-etag"), grpc.StatusCode.ABORTED)
    fails(
        lambda: api.stub.DeleteSecret(pb.DeleteSecretRequest(secret_id="cas", etag=first.etag), metadata=md),
        grpc.StatusCode.ABORTED,
    )
    got = api.stub.GetSecret(pb.GetSecretRequest(secret_id="cas"), metadata=md)
    assert got.data == b"v2"
    assert got.secret.etag == second.etag


# -- other fields -------------------------------------------------------------------------------------
def test_over_long_identities_name_the_field(api: Participants) -> None:
    md = api.auth("alice")
    admin = api.auth("root", admin=True)
    long_identity = marker(257)
    value = marker().encode()
    invalid(
        set_req(api, md, secret_id="s", data=value, delegated_to=long_identity), "delegated_to", long_identity
    )
    invalid(
        set_req(api, admin, secret_id="s", data=value, for_identity=long_identity),
        "for_identity",
        long_identity,
    )
    invalid(
        set_req(api, md, secret_id="s", data=value, for_identity=long_identity), "for_identity", long_identity
    )
    invalid(get_req(api, md, secret_id="s", delegated_to=long_identity), "delegated_to", long_identity)
    invalid(get_req(api, md, secret_id="s", delegated_by=long_identity), "delegated_by", long_identity)
    invalid(
        lambda: api.stub.Exists(pb.ExistsRequest(secret_id="s", delegated_to=long_identity), metadata=md),
        "delegated_to",
        long_identity,
    )
    invalid(
        lambda: api.stub.Exists(pb.ExistsRequest(secret_id="s", for_identity=long_identity), metadata=admin),
        "for_identity",
        long_identity,
    )
    invalid(
        lambda: api.stub.DeleteSecret(
            pb.DeleteSecretRequest(secret_id="s", delegated_to=long_identity), metadata=md
        ),
        "delegated_to",
        long_identity,
    )
    assert not exists(api, md, "s")


@pytest.mark.parametrize("bad", ["\x00", "\n", " padded", "padded ", "\x1b"])
def test_identities_with_control_chars_or_padding_name_the_field(api: Participants, bad: str) -> None:
    md = api.auth("alice")
    admin = api.auth("root", admin=True)
    ident = marker(20)
    odd = bad.replace("padded", ident) if "padded" in bad else ident + bad
    invalid(set_req(api, md, secret_id="s", data=b"v", delegated_to=odd), "delegated_to", ident)
    invalid(set_req(api, admin, secret_id="s", data=b"v", for_identity=odd), "for_identity", ident)
    invalid(get_req(api, md, secret_id="s", delegated_by=odd), "delegated_by", ident)


def test_over_long_name_and_type_name_the_field(api: Participants) -> None:
    md = api.auth("alice")
    value = marker().encode()
    long_name = marker(2049)
    long_type = marker(256)
    invalid(set_req(api, md, secret_id="s", name=long_name, data=value), "name", long_name, value)
    invalid(set_req(api, md, name=long_name, data=value), "name", long_name, value)
    invalid(set_req(api, md, secret_id="s", type=long_type, data=value), "type", long_type, value)
    invalid(set_req(api, md, type=long_type, name="n", data=value), "type", long_type, value)
    invalid(get_req(api, md, name=long_name), "name", long_name)
    invalid(get_req(api, md, type=long_type, name="n"), "type", long_type)
    assert list(api.stub.ListSecrets(pb.ListSecretsRequest(), metadata=md).secrets) == []
    # The longest allowed ones work.
    api.stub.SetSecret(
        pb.SetSecretRequest(secret_id="s", name=marker(2048), type=marker(255), data=b"v"), metadata=md
    )


def test_control_chars_in_name_and_type_name_the_field(api: Participants) -> None:
    md = api.auth("alice")
    mark = marker(20)
    invalid(set_req(api, md, secret_id="s", name=f"{mark}\x00", data=b"v"), "name", mark)
    invalid(set_req(api, md, secret_id="s", type=f"{mark}\n", data=b"v"), "type", mark)
    assert not exists(api, md, "s")


# -- ListSecrets --------------------------------------------------------------------------------------
def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


GARBAGE_TOKENS: dict[str, Callable[[], str]] = {
    "not-base64": lambda: "garbage!",
    "odd-length": lambda: "abc",
    "base64-of-junk": lambda: _b64(secrets.token_bytes(24)),
    "not-utf8": lambda: _b64(b"\xff\xfe\xfa" * 8),
    "json-number": lambda: _b64(b"123"),
    "json-object": lambda: _b64(json.dumps({"after": "x"}).encode()),
    "wrong-version": lambda: _b64(json.dumps(["v0", "a", "b", "c"]).encode()),
    "wrong-types": lambda: _b64(json.dumps(["v1", 1, 2, 3]).encode()),
    "too-short": lambda: _b64(json.dumps(["v1", "a"]).encode()),
    "deeply-nested": lambda: _b64(b"[" * 100_000 + b"]" * 100_000),
    "control-chars": lambda: "\x00\x01\x02",
}


@pytest.mark.parametrize("kind", list(GARBAGE_TOKENS))
def test_garbage_page_token_names_page_token(api: Participants, kind: str) -> None:
    md = api.auth("alice")
    api.stub.ListSecrets(pb.ListSecretsRequest(), metadata=md)
    token = GARBAGE_TOKENS[kind]()
    invalid(lambda: api.stub.ListSecrets(pb.ListSecretsRequest(page_token=token), metadata=md), "page_token")


def test_negative_page_size_names_page_size(api: Participants) -> None:
    md = api.auth("alice")

    def listing(size: int) -> Callable[[], object]:
        return lambda: api.stub.ListSecrets(pb.ListSecretsRequest(page_size=size), metadata=md)

    for size in (-1, -(2**31)):
        invalid(listing(size), "page_size")
    # A huge page size is capped, not refused.
    api.stub.ListSecrets(pb.ListSecretsRequest(page_size=2**31 - 1), metadata=md)


# -- request flows ------------------------------------------------------------------------------------
def test_request_secret_bad_fields_name_the_field(api: Participants) -> None:
    md = api.auth("alice")

    def request(**fields: object) -> Callable[[], object]:
        return lambda: api.stub.RequestSecret(pb.RequestSecretRequest(**fields), metadata=md, timeout=10)  # type: ignore[arg-type]

    url = f"https://example.com/{marker(20)}"
    invalid(request(url=url), "from_participant_id", url)
    invalid(request(from_participant_id="bob", url=""), "url")
    invalid(request(from_participant_id="bob"), "url")
    invalid(request(from_participant_id="bob", url=url, timeout=-1), "timeout", url)
    invalid(request(from_participant_id="bob", url=url, timeout=-(2**31)), "timeout", url)
    invalid(request(from_participant_id="bob", url=url, timeout=10**9), "timeout", url)
    long_url = "https://example.com/" + marker(2100)
    invalid(request(from_participant_id="bob", url=long_url), "url", long_url)
    long_id = marker(257)
    invalid(request(from_participant_id=long_id, url=url), "from_participant_id", long_id)
    invalid(request(from_participant_id="bob", url=url, delegate_to=long_id), "delegate_to", long_id)
    invalid(request(from_participant_id="bob", url=url, type=marker(256)), "type")


def test_provide_and_reject_unknown_request_are_not_found(api: Participants) -> None:
    md = api.auth("bob")
    unknown = uuid.uuid4().hex
    value = marker().encode()
    err = fails(
        lambda: api.stub.ProvideSecret(pb.ProvideSecretRequest(request_id=unknown, data=value), metadata=md),
        grpc.StatusCode.NOT_FOUND,
    )
    assert value.decode() not in (err.details() or "")
    fails(
        lambda: api.stub.RejectSecret(pb.RejectSecretRequest(request_id=unknown, error="no"), metadata=md),
        grpc.StatusCode.NOT_FOUND,
    )
    # Nothing was stored for the unknown request.
    assert list(api.stub.ListSecrets(pb.ListSecretsRequest(), metadata=md).secrets) == []


def test_provide_and_reject_bad_fields_name_the_field(api: Participants) -> None:
    md = api.auth("bob")
    unknown = uuid.uuid4().hex
    value = marker().encode()
    invalid(
        lambda: api.stub.ProvideSecret(pb.ProvideSecretRequest(data=value), metadata=md), "request_id", value
    )
    invalid(lambda: api.stub.RejectSecret(pb.RejectSecretRequest(error="no"), metadata=md), "request_id")
    bad_id = f"{marker(20)} x"
    invalid(
        lambda: api.stub.ProvideSecret(pb.ProvideSecretRequest(request_id=bad_id, data=value), metadata=md),
        "request_id",
        bad_id,
        value,
    )
    invalid(
        lambda: api.stub.ProvideSecret(
            pb.ProvideSecretRequest(request_id=unknown, data=value, data_crc32c=1), metadata=md
        ),
        "data_crc32c",
        value,
    )
    big = (value * (MIB // len(value) + 2))[: MIB + 1]
    invalid(
        lambda: api.stub.ProvideSecret(pb.ProvideSecretRequest(request_id=unknown, data=big), metadata=md),
        "data",
        value,
    )
    invalid(
        lambda: api.stub.RejectSecret(
            pb.RejectSecretRequest(request_id=unknown, error="e" * 1025), metadata=md
        ),
        "error",
    )


def test_delete_requested_secret_bad_fields_name_the_field(api: Participants) -> None:
    md = api.auth("alice")
    invalid(lambda: api.stub.DeleteRequestedSecret(pb.DeleteRequestedSecretRequest(), metadata=md), "url")
    long_url = marker(2049)
    invalid(
        lambda: api.stub.DeleteRequestedSecret(pb.DeleteRequestedSecretRequest(url=long_url), metadata=md),
        "url",
        long_url,
    )
    invalid(
        lambda: api.stub.DeleteRequestedSecret(
            pb.DeleteRequestedSecretRequest(url="u", delegated_to=marker(257)), metadata=md
        ),
        "delegated_to",
    )


def test_many_bad_inputs_in_a_row_leave_stored_data_intact(api: Participants) -> None:
    md = api.auth("alice")
    stored = {f"k{i}": secrets.token_bytes(16) for i in range(5)}
    for secret_id, value in stored.items():
        api.stub.SetSecret(pb.SetSecretRequest(secret_id=secret_id, data=value), metadata=md)
    for secret_id in stored:
        for call in (
            set_req(api, md, secret_id=secret_id, data=b"x", data_crc32c=7),
            set_req(api, md, secret_id=secret_id, data=b"x" * (MIB + 1)),
            set_req(api, md, secret_id=secret_id, data=b"x", delegated_to=marker(300)),
            set_req(api, md, secret_id=secret_id, data=b"x", type=marker(300)),
            set_req(api, md, secret_id=secret_id, data=b"x", name=marker(3000)),
        ):
            fails(call, grpc.StatusCode.INVALID_ARGUMENT)
    for secret_id, value in stored.items():
        assert api.stub.GetSecret(pb.GetSecretRequest(secret_id=secret_id), metadata=md).data == value


# -- bytes that are not a request message ------------------------------------------------------------
NOT_A_MESSAGE = {
    "invalid wire type": b"\xff\xff\xff",
    "truncated field": b"\x0a\x05ab",
    "overlong varint": b"\x08" + b"\xff" * 11,
}


@pytest.mark.parametrize("payload", NOT_A_MESSAGE.values(), ids=list(NOT_A_MESSAGE))
def test_bytes_that_are_no_request_message_are_invalid_argument_on_every_rpc(
    room: Participants, payload: bytes
) -> None:
    """grpcio answers such bytes UNKNOWN ("Unexpected DecodeError") by itself; every method is
    registered to answer INVALID_ARGUMENT naming the request instead (rpc/registry.py)."""
    md = room.auth("alice", admin=True)
    seen: dict[str, str] = {}
    for module in (pb, oauth_connectors_pb2, project_secrets_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                if method.server_streaming:
                    call = room.channel.unary_stream(path, None, None)
                    with pytest.raises(grpc.RpcError) as refused:
                        next(iter(call(payload, metadata=md, timeout=10)))
                else:
                    with pytest.raises(grpc.RpcError) as refused:
                        room.channel.unary_unary(path, None, None)(payload, metadata=md, timeout=10)
                err = refused.value
                seen[path] = err.code().name
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, err.code(), err.details())
                assert f"request: is not a valid {method.input_type.full_name} message" in (
                    err.details() or ""
                )
    assert len(seen) == 32
    # And the server goes on serving.
    room.stub.SetSecret(pb.SetSecretRequest(secret_id="after", data=b"x"), metadata=room.auth("alice"))


def test_types_the_server_keeps_cannot_be_requested_or_deleted_as_requested_secrets(
    room: Participants,
) -> None:
    """An OAuth token set is stored as a secret of a reserved type, named after its endpoint and
    delegated to the requester: answered "from storage", RequestSecret used to hand over the
    whole set, refresh token included. Reserved types are refused wherever a caller names one."""
    reserved, url = "application/vnd.roomsecrets.oauth-token+json", "app at https://idp.example/token"
    calls: dict[str, Callable[[], object]] = {
        "RequestSecret": lambda: room.stub.RequestSecret(
            pb.RequestSecretRequest(
                from_participant_id="bob",
                url="app at https://idp.example/token",
                type=reserved,
                delegate_to="alice",
            ),
            metadata=room.auth("alice"),
            timeout=10,
        ),
        "DeleteRequestedSecret": lambda: room.stub.DeleteRequestedSecret(
            pb.DeleteRequestedSecretRequest(url=url, type=reserved),
            metadata=room.auth("alice"),
        ),
        "SetSecret": lambda: room.stub.SetSecret(
            pb.SetSecretRequest(secret_id="x", type=reserved, data=b"v"), metadata=room.auth("alice")
        ),
    }
    for rpc, call in calls.items():
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (rpc, refused.value.details())
        assert "type: types starting with 'application/vnd.roomsecrets.' are kept by the server" in (
            refused.value.details() or ""
        ), rpc
