"""The storage RPCs of roomsecrets.v1.RoomSecrets through the real server: success paths and errors."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import google_crc32c
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from roomsecrets.v1 import room_secrets_pb2 as pb

from .harness import Participants

Metadata = tuple[tuple[str, str], ...]


def fails(call: Callable[[], object], code: grpc.StatusCode) -> grpc.RpcError:
    """Runs `call`, asserts it fails with `code` and returns the error."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    err = caught.value
    assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
    return err


def outcome(call: Callable[[], object]) -> grpc.StatusCode:
    """The status code `call` ends with (OK when it succeeds)."""
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def violated_fields(err: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "error carries no google.rpc.Status"
    fields: list[str] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields.extend(v.field for v in bad.field_violations)
    return fields


def crc(data: bytes) -> int:
    return int(google_crc32c.value(data))


def set_secret(room: Participants, md: Metadata, **fields: object) -> pb.SecretInfo:
    response: pb.SetSecretResponse = room.stub.SetSecret(pb.SetSecretRequest(**fields), metadata=md)  # type: ignore[arg-type]
    return response.secret


def get_secret(room: Participants, md: Metadata, **fields: str) -> pb.GetSecretResponse:
    response: pb.GetSecretResponse = room.stub.GetSecret(pb.GetSecretRequest(**fields), metadata=md)
    return response


def exists(room: Participants, md: Metadata, **fields: str) -> bool:
    return bool(room.stub.Exists(pb.ExistsRequest(**fields), metadata=md).exists)


def list_all(room: Participants, md: Metadata, page_size: int = 0) -> list[pb.SecretInfo]:
    out: list[pb.SecretInfo] = []
    token = ""
    while True:
        page = room.stub.ListSecrets(
            pb.ListSecretsRequest(page_size=page_size, page_token=token), metadata=md
        )
        out.extend(page.secrets)
        token = page.next_page_token
        if not token:
            return out


# -- SetSecret / GetSecret ----------------------------------------------------------------------------
def test_set_by_id_creates_and_get_returns_value_type_name_crc(room: Participants) -> None:
    md = room.auth("alice")
    value = b"s3cr3t-" + secrets.token_bytes(16)
    info = set_secret(room, md, secret_id="db/uri", type="text/plain", name="database", data=value)
    assert info.id == "db/uri"
    assert info.type == "text/plain"
    assert info.name == "database"
    assert info.etag
    assert info.size == len(value)
    assert info.data_crc32c == crc(value)
    assert info.delegated_to == ""
    assert info.delegated_by == ""

    got = get_secret(room, md, secret_id="db/uri")
    assert got.data == value
    assert got.secret.id == "db/uri"
    assert got.secret.type == "text/plain"
    assert got.secret.name == "database"
    assert got.secret.etag == info.etag
    assert got.data_crc32c == crc(value)
    assert got.secret.data_crc32c == crc(value)
    assert got.secret.size == len(value)
    assert got.secret.update_time.seconds > 0


def test_set_by_id_defaults_type_to_octet_stream(room: Participants) -> None:
    md = room.auth("alice")
    info = set_secret(room, md, secret_id="plain", data=b"v")
    assert info.type == "application/octet-stream"
    assert get_secret(room, md, secret_id="plain").secret.type == "application/octet-stream"


def test_replace_by_id_keeps_type_and_name_when_omitted_and_updates_them_when_given(
    room: Participants,
) -> None:
    md = room.auth("alice")
    set_secret(room, md, secret_id="k", type="text/plain", name="first", data=b"one")

    kept = set_secret(room, md, secret_id="k", data=b"two")
    assert (kept.type, kept.name) == ("text/plain", "first")
    got = get_secret(room, md, secret_id="k")
    assert got.data == b"two"
    assert (got.secret.type, got.secret.name) == ("text/plain", "first")

    changed = set_secret(room, md, secret_id="k", type="git", name="second", data=b"three")
    assert (changed.type, changed.name) == ("git", "second")
    got = get_secret(room, md, secret_id="k")
    assert got.data == b"three"
    assert (got.secret.type, got.secret.name) == ("git", "second")
    # Still one secret, not two.
    assert [s.id for s in list_all(room, md)] == ["k"]


def test_set_by_type_and_name_assigns_an_id_and_a_second_set_replaces_the_same_id(
    room: Participants,
) -> None:
    md = room.auth("alice")
    first = set_secret(room, md, type="git", name="https://example.com/repo.git", data=b"v1")
    assert first.id, "the server must assign an id"
    assert first.type == "git"
    assert first.name == "https://example.com/repo.git"

    second = set_secret(room, md, type="git", name="https://example.com/repo.git", data=b"v2")
    assert second.id == first.id
    assert second.etag != first.etag
    assert get_secret(room, md, secret_id=first.id).data == b"v2"
    assert [s.id for s in list_all(room, md)] == [first.id]

    # Another type with the same name is another secret.
    other = set_secret(room, md, type="text/plain", name="https://example.com/repo.git", data=b"v3")
    assert other.id != first.id
    assert len(list_all(room, md)) == 2


def test_get_by_type_and_name_and_by_unambiguous_name(room: Participants) -> None:
    md = room.auth("alice")
    info = set_secret(room, md, secret_id="gh", type="git", name="github", data=b"token-1")
    by_both = get_secret(room, md, type="git", name="github")
    assert by_both.data == b"token-1"
    assert by_both.secret.id == info.id
    by_name = get_secret(room, md, name="github")
    assert by_name.data == b"token-1"
    assert by_name.secret.id == "gh"
    # Wrong type: nothing.
    fails(lambda: get_secret(room, md, type="text/plain", name="github"), grpc.StatusCode.NOT_FOUND)


def test_get_by_ambiguous_name_is_invalid_argument_naming_type(room: Participants) -> None:
    md = room.auth("alice")
    set_secret(room, md, secret_id="a", type="git", name="shared-name", data=b"one")
    set_secret(room, md, secret_id="b", type="text/plain", name="shared-name", data=b"two")
    err = fails(lambda: get_secret(room, md, name="shared-name"), grpc.StatusCode.INVALID_ARGUMENT)
    assert "type" in violated_fields(err)
    assert "type" in (err.details() or "")
    assert b"one" not in (err.details() or "").encode()
    # Giving the type resolves it.
    assert get_secret(room, md, type="text/plain", name="shared-name").data == b"two"
    assert get_secret(room, md, type="git", name="shared-name").data == b"one"


def test_get_missing_is_not_found(room: Participants) -> None:
    md = room.auth("alice")
    fails(lambda: get_secret(room, md, secret_id="nope"), grpc.StatusCode.NOT_FOUND)
    fails(lambda: get_secret(room, md, type="git", name="nope"), grpc.StatusCode.NOT_FOUND)


def test_secrets_are_per_identity(room: Participants) -> None:
    set_secret(room, room.auth("alice"), secret_id="mine", data=b"alice-only")
    fails(lambda: get_secret(room, room.auth("bob"), secret_id="mine"), grpc.StatusCode.NOT_FOUND)
    assert not exists(room, room.auth("bob"), secret_id="mine")
    assert list_all(room, room.auth("bob")) == []


def test_same_type_and_name_on_two_ids_is_already_exists_and_keeps_the_first(room: Participants) -> None:
    md = room.auth("alice")
    set_secret(room, md, secret_id="id-1", type="git", name="dup", data=b"first")
    code = outcome(lambda: set_secret(room, md, secret_id="id-2", type="git", name="dup", data=b"second"))
    # The write must not have touched the first secret (e.g. silently replaced it) ...
    assert exists(room, md, secret_id="id-1"), f"writing id-2 ({code}) deleted id-1"
    assert get_secret(room, md, secret_id="id-1").data == b"first"
    # ... and must have been refused as a conflict, creating nothing.
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert not exists(room, md, secret_id="id-2")


def test_renaming_onto_a_taken_type_and_name_is_already_exists(room: Participants) -> None:
    md = room.auth("alice")
    set_secret(room, md, secret_id="id-1", type="git", name="taken", data=b"first")
    set_secret(room, md, secret_id="id-2", type="git", name="free", data=b"second")
    code = outcome(lambda: set_secret(room, md, secret_id="id-2", type="git", name="taken", data=b"changed"))
    assert exists(room, md, secret_id="id-1"), f"renaming id-2 ({code}) deleted id-1"
    assert get_secret(room, md, secret_id="id-1").data == b"first"
    assert code == grpc.StatusCode.ALREADY_EXISTS
    got = get_secret(room, md, secret_id="id-2")
    assert (got.data, got.secret.name) == (b"second", "free")


# -- Exists -------------------------------------------------------------------------------------------
def test_exists_true_and_false(room: Participants) -> None:
    md = room.auth("alice")
    assert not exists(room, md, secret_id="x")
    set_secret(room, md, secret_id="x", data=b"v")
    assert exists(room, md, secret_id="x")
    # A delegated secret is addressed with its delegated_to.
    set_secret(room, md, secret_id="d", delegated_to="bob", data=b"v")
    assert exists(room, md, secret_id="d", delegated_to="bob")
    assert not exists(room, md, secret_id="d")


# -- DeleteSecret -------------------------------------------------------------------------------------
def test_delete_then_get_and_second_delete_are_not_found(room: Participants) -> None:
    md = room.auth("alice")
    set_secret(room, md, secret_id="gone", data=b"v")
    room.stub.DeleteSecret(pb.DeleteSecretRequest(secret_id="gone"), metadata=md)
    assert not exists(room, md, secret_id="gone")
    fails(lambda: get_secret(room, md, secret_id="gone"), grpc.StatusCode.NOT_FOUND)
    fails(
        lambda: room.stub.DeleteSecret(pb.DeleteSecretRequest(secret_id="gone"), metadata=md),
        grpc.StatusCode.NOT_FOUND,
    )


def test_delete_missing_is_not_found(room: Participants) -> None:
    fails(
        lambda: room.stub.DeleteSecret(pb.DeleteSecretRequest(secret_id="never"), metadata=room.auth("a")),
        grpc.StatusCode.NOT_FOUND,
    )


# -- etags --------------------------------------------------------------------------------------------
def test_etag_changes_on_every_write(room: Participants) -> None:
    md = room.auth("alice")
    etags = [set_secret(room, md, secret_id="e", data=b"same").etag for _ in range(5)]
    assert len(set(etags)) == 5
    assert get_secret(room, md, secret_id="e").secret.etag == etags[-1]


def test_set_with_current_etag_succeeds(room: Participants) -> None:
    md = room.auth("alice")
    first = set_secret(room, md, secret_id="cas", data=b"v1")
    second = set_secret(room, md, secret_id="cas", data=b"v2", etag=first.etag)
    assert second.etag != first.etag
    assert get_secret(room, md, secret_id="cas").data == b"v2"


def test_set_with_stale_etag_is_aborted_and_changes_nothing(room: Participants) -> None:
    md = room.auth("alice")
    first = set_secret(room, md, secret_id="cas", data=b"v1")
    second = set_secret(room, md, secret_id="cas", data=b"v2")
    err = fails(
        lambda: set_secret(room, md, secret_id="cas", data=b"v3-lost", etag=first.etag),
        grpc.StatusCode.ABORTED,
    )
    assert "v3-lost" not in (err.details() or "")
    got = get_secret(room, md, secret_id="cas")
    assert got.data == b"v2"
    assert got.secret.etag == second.etag


def test_set_with_etag_on_missing_secret_is_aborted_and_creates_nothing(room: Participants) -> None:
    md = room.auth("alice")
    fails(
        lambda: set_secret(room, md, secret_id="absent", data=b"v", etag="0123456789abcdef"),
        grpc.StatusCode.ABORTED,
    )
    assert not exists(room, md, secret_id="absent")


def test_delete_with_current_etag_succeeds(room: Participants) -> None:
    md = room.auth("alice")
    info = set_secret(room, md, secret_id="del-cas", data=b"v1")
    room.stub.DeleteSecret(pb.DeleteSecretRequest(secret_id="del-cas", etag=info.etag), metadata=md)
    assert not exists(room, md, secret_id="del-cas")


def test_delete_with_stale_etag_is_aborted_and_keeps_the_secret(room: Participants) -> None:
    md = room.auth("alice")
    first = set_secret(room, md, secret_id="del-cas", data=b"v1")
    set_secret(room, md, secret_id="del-cas", data=b"v2")
    fails(
        lambda: room.stub.DeleteSecret(
            pb.DeleteSecretRequest(secret_id="del-cas", etag=first.etag), metadata=md
        ),
        grpc.StatusCode.ABORTED,
    )
    assert get_secret(room, md, secret_id="del-cas").data == b"v2"


def test_delete_with_etag_on_missing_secret_is_aborted(room: Participants) -> None:
    md = room.auth("alice")
    fails(
        lambda: room.stub.DeleteSecret(
            pb.DeleteSecretRequest(secret_id="absent", etag="0123456789abcdef"), metadata=md
        ),
        grpc.StatusCode.ABORTED,
    )


# -- CRC32C -------------------------------------------------------------------------------------------
def test_get_returns_crc32c_of_the_data(room: Participants) -> None:
    md = room.auth("alice")
    for i, value in enumerate([b"", b"x", secrets.token_bytes(1000), b"\x00" * 64]):
        set_secret(room, md, secret_id=f"c{i}", data=value)
        got = get_secret(room, md, secret_id=f"c{i}")
        assert got.data == value
        assert got.data_crc32c == google_crc32c.value(value)


def test_set_with_correct_crc32c_succeeds(room: Participants) -> None:
    md = room.auth("alice")
    value = secrets.token_bytes(300)
    info = set_secret(room, md, secret_id="crc", data=value, data_crc32c=crc(value))
    assert info.data_crc32c == crc(value)
    assert get_secret(room, md, secret_id="crc").data == value


def test_set_with_wrong_crc32c_is_refused(room: Participants) -> None:
    md = room.auth("alice")
    value = b"payload"
    err = fails(
        lambda: set_secret(room, md, secret_id="crc", data=value, data_crc32c=(crc(value) + 1) % 2**32),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "data_crc32c" in violated_fields(err)
    assert not exists(room, md, secret_id="crc")


# -- ListSecrets --------------------------------------------------------------------------------------
def test_list_paginates_every_secret_exactly_once(room: Participants) -> None:
    md = room.auth("alice")
    ids = {f"item-{i:02d}" for i in range(25)}
    for secret_id in ids:
        set_secret(room, md, secret_id=secret_id, data=b"v")

    pages: list[pb.ListSecretsResponse] = []
    token = ""
    while True:
        page = room.stub.ListSecrets(pb.ListSecretsRequest(page_size=10, page_token=token), metadata=md)
        pages.append(page)
        token = page.next_page_token
        if not token:
            break
        assert len(pages) < 10, "pagination does not end"
    assert [len(p.secrets) for p in pages] == [10, 10, 5]
    seen = [s.id for p in pages for s in p.secrets]
    assert len(seen) == len(set(seen)) == 25
    assert set(seen) == ids
    assert pages[-1].next_page_token == ""


@pytest.mark.parametrize("page_size", [1, 2, 3, 7, 100])
def test_list_pages_through_owned_and_delegated_secrets_in_order(room: Participants, page_size: int) -> None:
    """Each page is two index range scans merged (what the caller owns, what others delegated to
    it): every page, whatever its size, lists exactly those secrets, in (owner, delegated_to, id)
    order, each once, and nothing of anyone else."""
    people = ["alice", "bob", "carol", "dave"]
    expected: dict[str, list[tuple[str, str, str]]] = {p: [] for p in people}
    pairs = [(owner, delegate) for owner in people for delegate in ["", *people] if delegate != owner]
    for n, (owner, delegate) in enumerate(pairs):
        for i in range(2):
            secret_id = f"s{n}-{i}"
            set_secret(room, room.auth(owner), secret_id=secret_id, data=b"v", delegated_to=delegate)
            expected[owner].append((owner, delegate, secret_id))
            if delegate:
                expected[delegate].append((owner, delegate, secret_id))
    for person in people:
        md, token, listed = room.auth(person), "", []
        while True:
            page = room.stub.ListSecrets(
                pb.ListSecretsRequest(page_size=page_size, page_token=token), metadata=md
            )
            assert len(page.secrets) <= page_size
            listed += [(s.delegated_by or person, s.delegated_to, s.id) for s in page.secrets]
            assert len(listed) <= len(expected[person]), f"{person}: pages repeat secrets"
            token = page.next_page_token
            if not token:
                break
        assert listed == sorted(expected[person]), person


def test_list_exact_multiple_of_page_size_ends(room: Participants) -> None:
    md = room.auth("alice")
    for i in range(4):
        set_secret(room, md, secret_id=f"s{i}", data=b"v")
    seen = list_all(room, md, page_size=2)
    assert sorted(s.id for s in seen) == ["s0", "s1", "s2", "s3"]


def test_list_page_size_zero_uses_the_default(room: Participants) -> None:
    md = room.auth("alice")
    for i in range(25):
        set_secret(room, md, secret_id=f"d{i}", data=b"v")
    page = room.stub.ListSecrets(pb.ListSecretsRequest(page_size=0), metadata=md)
    assert len(page.secrets) == 25  # default page (100) holds them all
    assert page.next_page_token == ""


def test_list_empty(room: Participants) -> None:
    page = room.stub.ListSecrets(pb.ListSecretsRequest(), metadata=room.auth("nobody"))
    assert list(page.secrets) == []
    assert page.next_page_token == ""


def test_list_negative_page_size_is_invalid_argument(room: Participants) -> None:
    err = fails(
        lambda: room.stub.ListSecrets(pb.ListSecretsRequest(page_size=-1), metadata=room.auth("alice")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "page_size" in violated_fields(err)


def test_list_garbage_page_token_is_invalid_argument(room: Participants) -> None:
    md = room.auth("alice")
    set_secret(room, md, secret_id="s", data=b"v")
    err = fails(
        lambda: room.stub.ListSecrets(pb.ListSecretsRequest(page_token="garbage!"), metadata=md),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "page_token" in violated_fields(err)
    assert "page_token" in (err.details() or "")


def test_list_never_contains_values(room: Participants) -> None:
    md = room.auth("alice")
    values = [f"VALUE-{secrets.token_hex(16)}".encode() for _ in range(5)]
    for i, value in enumerate(values):
        set_secret(room, md, secret_id=f"v{i}", type="text/plain", name=f"n{i}", data=value)
    set_secret(room, room.auth("owner"), secret_id="dlg", delegated_to="alice", data=values[0] + b"-dlg")
    page = room.stub.ListSecrets(pb.ListSecretsRequest(), metadata=md)
    assert len(page.secrets) == 6
    raw = page.SerializeToString()
    for value in values:
        assert value not in raw
    for info in page.secrets:
        assert info.data_crc32c  # metadata is there, only the value is not
        assert info.size > 0


# -- delegation ---------------------------------------------------------------------------------------
def test_delegation_owner_and_delegate_read_others_cannot(room: Participants) -> None:
    owner, bob, carol = room.auth("owner"), room.auth("bob"), room.auth("carol")
    value = f"delegated-{secrets.token_hex(8)}".encode()
    info = set_secret(room, owner, secret_id="api-key", type="text/plain", data=value, delegated_to="bob")
    assert info.delegated_to == "bob"

    # The owner reads it, naming the delegation.
    assert get_secret(room, owner, secret_id="api-key", delegated_to="bob").data == value

    # Bob reads it on the owner's behalf.
    got = get_secret(room, bob, secret_id="api-key", delegated_by="owner")
    assert got.data == value
    assert got.secret.delegated_by == "owner"
    assert got.secret.delegated_to == "bob"
    got_explicit = get_secret(room, bob, secret_id="api-key", delegated_by="owner", delegated_to="bob")
    assert got_explicit.data == value

    # Bob lists it, marked as delegated by the owner; the owner lists it as delegated to bob.
    bob_list = list_all(room, bob)
    assert [(s.id, s.delegated_by, s.delegated_to) for s in bob_list] == [("api-key", "owner", "bob")]
    owner_list = list_all(room, owner)
    assert [(s.id, s.delegated_by, s.delegated_to) for s in owner_list] == [("api-key", "", "bob")]

    # Bob has no secret of his own by that id.
    fails(lambda: get_secret(room, bob, secret_id="api-key"), grpc.StatusCode.NOT_FOUND)

    # Carol cannot read it by any addressing, and never sees the value.
    attempts: list[dict[str, str]] = [
        {"secret_id": "api-key", "delegated_by": "owner"},
        {"secret_id": "api-key", "delegated_by": "owner", "delegated_to": "bob"},
        {"secret_id": "api-key", "delegated_to": "bob"},
        {"secret_id": "api-key"},
    ]
    for fields in attempts:
        with pytest.raises(grpc.RpcError) as caught:
            get_secret(room, carol, **fields)
        assert caught.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED), fields
        assert value.decode() not in (caught.value.details() or "")
    assert list_all(room, carol) == []


def test_owner_deletes_a_delegated_secret_with_delegated_to(room: Participants) -> None:
    owner, bob = room.auth("owner"), room.auth("bob")
    set_secret(room, owner, secret_id="tmp", data=b"v", delegated_to="bob")
    # Without delegated_to it names another (absent) secret.
    fails(
        lambda: room.stub.DeleteSecret(pb.DeleteSecretRequest(secret_id="tmp"), metadata=owner),
        grpc.StatusCode.NOT_FOUND,
    )
    room.stub.DeleteSecret(pb.DeleteSecretRequest(secret_id="tmp", delegated_to="bob"), metadata=owner)
    fails(lambda: get_secret(room, bob, secret_id="tmp", delegated_by="owner"), grpc.StatusCode.NOT_FOUND)
    assert list_all(room, bob) == []


def test_delegate_cannot_delete_the_owners_secret(room: Participants) -> None:
    owner, bob = room.auth("owner"), room.auth("bob")
    set_secret(room, owner, secret_id="keep", data=b"v", delegated_to="bob")
    with pytest.raises(grpc.RpcError) as caught:
        room.stub.DeleteSecret(pb.DeleteSecretRequest(secret_id="keep", delegated_to="bob"), metadata=bob)
    assert caught.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)
    assert get_secret(room, owner, secret_id="keep", delegated_to="bob").data == b"v"


# -- DeleteRequestedSecret ----------------------------------------------------------------------------
def test_delete_requested_secret_missing_is_not_found(room: Participants) -> None:
    fails(
        lambda: room.stub.DeleteRequestedSecret(
            pb.DeleteRequestedSecretRequest(url="https://nowhere.example", type="git"),
            metadata=room.auth("alice"),
        ),
        grpc.StatusCode.NOT_FOUND,
    )


# -- for_identity -------------------------------------------------------------------------------------
def test_admin_stores_for_another_identity(room: Participants) -> None:
    admin = room.auth("installer", admin=True)
    value = f"svc-{secrets.token_hex(8)}".encode()
    info = set_secret(room, admin, secret_id="svc-key", data=value, for_identity="svc")
    assert info.id == "svc-key"
    assert exists(room, admin, secret_id="svc-key", for_identity="svc")
    # Stored for svc, not for the admin.
    assert not exists(room, admin, secret_id="svc-key")
    svc = room.auth("svc")
    assert get_secret(room, svc, secret_id="svc-key").data == value
    assert [s.id for s in list_all(room, svc)] == ["svc-key"]
    assert list_all(room, admin) == []


def test_for_identity_naming_oneself_needs_no_admin(room: Participants) -> None:
    md = room.auth("alice")
    set_secret(room, md, secret_id="self", data=b"v", for_identity="alice")
    assert exists(room, md, secret_id="self", for_identity="alice")
    assert get_secret(room, md, secret_id="self").data == b"v"


# -- OAuth (end to end in test_oauth.py) ---------------------------------------------------------------
def test_oauth_rpcs_refuse_bad_input_without_echoing_the_client_secret(room: Participants) -> None:
    md = room.auth("alice")
    oauth = pb.OAuthClientConfig(
        client_id="cid",
        client_secret="client-secret-value",
        authorization_endpoint="https://auth.example.com/authorize",
        token_endpoint="http://auth.example.com/token",  # plain http off loopback
        scopes=["read"],
    )
    calls: list[tuple[Callable[[], object], grpc.StatusCode, str]] = [
        (
            lambda: room.stub.RequestOAuthToken(
                pb.RequestOAuthTokenRequest(oauth=oauth, from_participant_id="app", redirect_uri="https://x"),
                metadata=md,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "oauth.token_endpoint",
        ),
        (
            lambda: room.stub.RequestOAuthToken(
                pb.RequestOAuthTokenRequest(from_participant_id="app"), metadata=md
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "oauth",
        ),
        (
            lambda: room.stub.ProvideOAuthAuthorization(
                pb.ProvideOAuthAuthorizationRequest(request_id="r1", code="", state="s"), metadata=md
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "code",
        ),
        (
            lambda: room.stub.RejectOAuthAuthorization(
                pb.RejectOAuthAuthorizationRequest(request_id="r1", error="no"), metadata=md
            ),
            grpc.StatusCode.NOT_FOUND,
            "r1",
        ),
        (
            lambda: room.stub.GetOfflineOAuthToken(pb.GetOfflineOAuthTokenRequest(oauth=oauth), metadata=md),
            grpc.StatusCode.INVALID_ARGUMENT,
            "oauth.token_endpoint",
        ),
        (
            lambda: room.stub.GetOfflineOAuthToken(
                pb.GetOfflineOAuthTokenRequest(connector=pb.ConnectorRef(server_url="https://mcp.example")),
                metadata=md,
            ),
            grpc.StatusCode.UNIMPLEMENTED,
            "server_url",
        ),
    ]
    for call, code, mentions in calls:
        err = fails(call, code)
        message = err.details() or ""
        assert mentions in message
        assert "client-secret-value" not in message
