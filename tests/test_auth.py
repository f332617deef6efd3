"""Authentication and grants (SPEC §4) through the real server: bearer tokens, signatures, keys,
algorithm confusion, room scoping, the secrets grant, room admin and delegation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets_server.auth.dev_key import ensure_dev_key

from .harness import Participants, ServerThread, test_settings

Metadata = tuple[tuple[str, str], ...]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def fails(call: Callable[[], object], code: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    err = caught.value
    assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
    return err


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def claims(
    identity: str = "alice",
    *,
    room: str = "room-1",
    kid: str = "",
    ttl: int = 3600,
    secrets_grant: bool = True,
    admin: bool = False,
) -> dict[str, Any]:
    """Claims shaped like roomsecrets_server.auth.dev_key.mint_token's."""
    api: dict[str, Any] = {}
    if secrets_grant:
        api["secrets"] = {}
    if admin:
        api["admin"] = {"config": True}
    now = int(time.time())
    out: dict[str, Any] = {
        "name": identity,
        "sub": "dev-project",
        "iat": now,
        "exp": now + ttl,
        "version": "1.0",
        "grants": [
            {"name": "room", "scope": room},
            {"name": "role", "scope": "user"},
            {"name": "api", "scope": api},
        ],
    }
    if kid:
        out["kid"] = kid
    return out


def hand_made(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """A JWT built by hand (PyJWT refuses some of the forgeries tested here)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = b""
    if hmac_key is not None:
        signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def check_unauthenticated(room: Participants, md: Metadata) -> None:
    """Every kind of RPC refuses the metadata with UNAUTHENTICATED."""
    calls: list[Callable[[], object]] = [
        lambda: room.stub.GetSecret(pb.GetSecretRequest(secret_id="s"), metadata=md),
        lambda: room.stub.SetSecret(pb.SetSecretRequest(secret_id="written", data=b"v"), metadata=md),
        lambda: room.stub.ListSecrets(pb.ListSecretsRequest(), metadata=md),
        lambda: room.stub.Exists(pb.ExistsRequest(secret_id="s"), metadata=md),
        lambda: room.stub.DeleteSecret(pb.DeleteSecretRequest(secret_id="s"), metadata=md),
    ]
    for call in calls:
        fails(call, grpc.StatusCode.UNAUTHENTICATED)


def check_stream_unauthenticated(room: Participants, md: Metadata) -> None:
    stream = room.stub.WatchRequests(pb.WatchRequestsRequest(), metadata=md, timeout=5)
    fails(lambda: next(iter(stream)), grpc.StatusCode.UNAUTHENTICATED)


@pytest.fixture
def stored(room: Participants) -> bytes:
    """alice's secret `s` in room-1, which none of the refused callers may touch."""
    value = f"value-{secrets.token_hex(8)}".encode()
    room.stub.SetSecret(pb.SetSecretRequest(secret_id="s", data=value), metadata=room.auth("alice"))
    return value


def assert_untouched(room: Participants, value: bytes) -> None:
    md = room.auth("alice")
    assert room.stub.GetSecret(pb.GetSecretRequest(secret_id="s"), metadata=md).data == value
    assert not room.stub.Exists(pb.ExistsRequest(secret_id="written"), metadata=md).exists


# -- malformed and missing credentials ----------------------------------------------------------------
def test_no_token_is_unauthenticated(room: Participants, stored: bytes) -> None:
    check_unauthenticated(room, ())
    check_stream_unauthenticated(room, ())
    assert_untouched(room, stored)


@pytest.mark.parametrize(
    "value",
    [
        "Bearer garbage",
        "Bearer a.b.c",
        "Basic dXNlcjpwYXNz",
        "Basic x",
        "Bearer ",
        "Bearer",
        "garbage",
        "Token x",
    ],
)
def test_malformed_authorization_is_unauthenticated(room: Participants, stored: bytes, value: str) -> None:
    check_unauthenticated(room, (("authorization", value),))
    assert_untouched(room, stored)


def test_a_valid_token_under_another_scheme_is_unauthenticated(room: Participants, stored: bytes) -> None:
    check_unauthenticated(room, (("authorization", f"Basic {room.token('alice')}"),))


def test_valid_token_is_accepted_and_scheme_is_case_insensitive(room: Participants, stored: bytes) -> None:
    token = room.token("alice")
    for md in (bearer(token), (("authorization", f"bearer {token}"),)):
        got = room.stub.GetSecret(pb.GetSecretRequest(secret_id="s"), metadata=md)
        assert got.data == stored


def test_expired_token_is_unauthenticated(room: Participants, stored: bytes) -> None:
    md = room.auth("alice", ttl=-60)
    check_unauthenticated(room, md)
    err = fails(
        lambda: room.stub.GetSecret(pb.GetSecretRequest(secret_id="s"), metadata=md),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert "expired" in (err.details() or "").lower()
    check_stream_unauthenticated(room, md)


def test_expired_token_stays_refused_after_a_valid_one_was_cached(room: Participants, stored: bytes) -> None:
    # The verified-token cache must not let a different, expired token through.
    valid = room.auth("alice")
    room.stub.GetSecret(pb.GetSecretRequest(secret_id="s"), metadata=valid)
    check_unauthenticated(room, room.auth("alice", ttl=-60))


# -- forged tokens ------------------------------------------------------------------------------------
def test_token_signed_with_another_key_but_the_same_kid_is_unauthenticated(
    room: Participants, server: ServerThread, stored: bytes
) -> None:
    kid, _ = ensure_dev_key(server.settings.data_dir)
    forged = jwt.encode(
        claims("alice", kid=kid), secrets.token_bytes(32), algorithm="HS256", headers={"kid": kid}
    )
    check_unauthenticated(room, bearer(forged))
    check_stream_unauthenticated(room, bearer(forged))
    assert_untouched(room, stored)


@pytest.mark.parametrize("change", ["identity", "admin", "room", "exp"])
def test_token_with_altered_payload_is_unauthenticated(
    room: Participants, stored: bytes, change: str
) -> None:
    header, payload, signature = room.token("mallory", room="room-2").split(".")
    doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    if change == "identity":
        doc["name"] = "alice"
    elif change == "admin":
        doc["grants"][2]["scope"]["admin"] = {"config": True}
    elif change == "room":
        doc["grants"][0]["scope"] = "room-1"
    else:
        doc["exp"] += 10_000
    tampered = f"{header}.{b64url(json.dumps(doc).encode())}.{signature}"
    check_unauthenticated(room, bearer(tampered))
    assert_untouched(room, stored)


def test_token_with_altered_signature_is_unauthenticated(room: Participants, stored: bytes) -> None:
    header, payload, signature = room.token("alice").split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[0] ^= 0x01
    check_unauthenticated(room, bearer(f"{header}.{payload}.{b64url(bytes(raw))}"))


def test_unknown_kid_is_unauthenticated(room: Participants, server: ServerThread, stored: bytes) -> None:
    _, key = ensure_dev_key(server.settings.data_dir)
    # Signed with the real key, but naming a key id the server does not have.
    token = jwt.encode(
        claims("alice", kid="no-such-kid"), key, algorithm="HS256", headers={"kid": "no-such-kid"}
    )
    err = fails(
        lambda: room.stub.GetSecret(pb.GetSecretRequest(secret_id="s"), metadata=bearer(token)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert "kid" in (err.details() or "")
    check_unauthenticated(room, bearer(token))
    # No kid at all.
    no_kid = jwt.encode(claims("alice"), key, algorithm="HS256")
    check_unauthenticated(room, bearer(no_kid))


def test_alg_none_token_is_unauthenticated(room: Participants, server: ServerThread, stored: bytes) -> None:
    kid, _ = ensure_dev_key(server.settings.data_dir)
    for alg in ("none", "None", "NONE"):
        token = hand_made({"alg": alg, "typ": "JWT", "kid": kid}, claims("alice", kid=kid), None)
        check_unauthenticated(room, bearer(token))
        check_unauthenticated(room, bearer(token.rstrip(".")))
    assert_untouched(room, stored)


def test_token_without_identity_or_room_is_unauthenticated(
    room: Participants, server: ServerThread, stored: bytes
) -> None:
    kid, key = ensure_dev_key(server.settings.data_dir)
    no_name = claims("alice", kid=kid)
    del no_name["name"]
    no_room = claims("alice", kid=kid)
    no_room["grants"] = [g for g in no_room["grants"] if g["name"] != "room"]
    no_exp = claims("alice", kid=kid)
    del no_exp["exp"]
    bad_grants = claims("alice", kid=kid)
    bad_grants["grants"] = "room-1"
    for doc in (no_name, no_room, no_exp, bad_grants):
        token = jwt.encode(doc, key, algorithm="HS256", headers={"kid": kid})
        check_unauthenticated(room, bearer(token))
    assert_untouched(room, stored)


# -- room scoping and grants --------------------------------------------------------------------------
def test_token_for_another_room_cannot_see_room_1_secrets(room: Participants, stored: bytes) -> None:
    other = room.auth("alice", room="room-2")
    fails(
        lambda: room.stub.GetSecret(pb.GetSecretRequest(secret_id="s"), metadata=other),
        grpc.StatusCode.NOT_FOUND,
    )
    assert not room.stub.Exists(pb.ExistsRequest(secret_id="s"), metadata=other).exists
    page = room.stub.ListSecrets(pb.ListSecretsRequest(), metadata=other)
    assert list(page.secrets) == []
    fails(
        lambda: room.stub.DeleteSecret(pb.DeleteSecretRequest(secret_id="s"), metadata=other),
        grpc.StatusCode.NOT_FOUND,
    )
    # Writing the same id in room-2 is a separate secret; room-1's is untouched.
    room.stub.SetSecret(pb.SetSecretRequest(secret_id="s", data=b"room-2 value"), metadata=other)
    assert room.stub.GetSecret(pb.GetSecretRequest(secret_id="s"), metadata=other).data == b"room-2 value"
    assert_untouched(room, stored)


def test_token_without_secrets_grant_is_permission_denied(room: Participants, stored: bytes) -> None:
    md = room.auth("alice", secrets_grant=False)
    calls: list[Callable[[], object]] = [
        lambda: room.stub.GetSecret(pb.GetSecretRequest(secret_id="s"), metadata=md),
        lambda: room.stub.SetSecret(pb.SetSecretRequest(secret_id="written", data=b"v"), metadata=md),
        lambda: room.stub.ListSecrets(pb.ListSecretsRequest(), metadata=md),
        lambda: room.stub.Exists(pb.ExistsRequest(secret_id="s"), metadata=md),
        lambda: room.stub.DeleteSecret(pb.DeleteSecretRequest(secret_id="s"), metadata=md),
        lambda: room.stub.DeleteRequestedSecret(pb.DeleteRequestedSecretRequest(url="u"), metadata=md),
        lambda: room.stub.RejectSecret(pb.RejectSecretRequest(request_id="r1"), metadata=md),
        lambda: room.stub.ProvideSecret(pb.ProvideSecretRequest(request_id="r1", data=b"v"), metadata=md),
    ]
    for call in calls:
        err = fails(call, grpc.StatusCode.PERMISSION_DENIED)
        assert "secrets" in (err.details() or "")
    stream = room.stub.WatchRequests(pb.WatchRequestsRequest(), metadata=md, timeout=5)
    fails(lambda: next(iter(stream)), grpc.StatusCode.PERMISSION_DENIED)
    assert_untouched(room, stored)


def test_admin_without_secrets_grant_is_still_denied(room: Participants) -> None:
    md = room.auth("root", admin=True, secrets_grant=False)
    fails(
        lambda: room.stub.SetSecret(
            pb.SetSecretRequest(secret_id="x", data=b"v", for_identity="svc"), metadata=md
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )


def test_non_admin_for_identity_is_permission_denied_and_writes_nothing(room: Participants) -> None:
    md = room.auth("alice")
    err = fails(
        lambda: room.stub.SetSecret(
            pb.SetSecretRequest(secret_id="svc-key", data=b"planted", for_identity="svc"), metadata=md
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert "planted" not in (err.details() or "")
    fails(
        lambda: room.stub.SetSecret(
            pb.SetSecretRequest(type="git", name="repo", data=b"planted", for_identity="svc"), metadata=md
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    fails(
        lambda: room.stub.Exists(pb.ExistsRequest(secret_id="svc-key", for_identity="svc"), metadata=md),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    # Nothing was written, for svc or for alice.
    svc = room.auth("svc")
    assert not room.stub.Exists(pb.ExistsRequest(secret_id="svc-key"), metadata=svc).exists
    assert list(room.stub.ListSecrets(pb.ListSecretsRequest(), metadata=svc).secrets) == []
    assert list(room.stub.ListSecrets(pb.ListSecretsRequest(), metadata=md).secrets) == []


def test_non_admin_exists_for_identity_is_denied_even_when_it_exists(room: Participants) -> None:
    room.stub.SetSecret(pb.SetSecretRequest(secret_id="svc-key", data=b"v"), metadata=room.auth("svc"))
    fails(
        lambda: room.stub.Exists(
            pb.ExistsRequest(secret_id="svc-key", for_identity="svc"), metadata=room.auth("alice")
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )


def test_admin_for_identity_works(room: Participants) -> None:
    admin = room.auth("installer", admin=True)
    room.stub.SetSecret(
        pb.SetSecretRequest(secret_id="svc-key", data=b"svc value", for_identity="svc"), metadata=admin
    )
    assert room.stub.Exists(pb.ExistsRequest(secret_id="svc-key", for_identity="svc"), metadata=admin).exists
    svc = room.auth("svc")
    assert room.stub.GetSecret(pb.GetSecretRequest(secret_id="svc-key"), metadata=svc).data == b"svc value"


def test_admin_of_another_room_cannot_write_into_this_room(room: Participants) -> None:
    admin2 = room.auth("installer", admin=True, room="room-2")
    room.stub.SetSecret(
        pb.SetSecretRequest(secret_id="svc-key", data=b"v", for_identity="svc"), metadata=admin2
    )
    svc1 = room.auth("svc")
    assert not room.stub.Exists(pb.ExistsRequest(secret_id="svc-key"), metadata=svc1).exists


def test_delegate_allowed_non_delegate_denied(room: Participants) -> None:
    owner, bob, carol = room.auth("owner"), room.auth("bob"), room.auth("carol")
    value = f"dlg-{secrets.token_hex(8)}".encode()
    room.stub.SetSecret(
        pb.SetSecretRequest(secret_id="shared", data=value, delegated_to="bob"), metadata=owner
    )
    got = room.stub.GetSecret(pb.GetSecretRequest(secret_id="shared", delegated_by="owner"), metadata=bob)
    assert got.data == value
    for request in (
        pb.GetSecretRequest(secret_id="shared", delegated_by="owner"),
        pb.GetSecretRequest(secret_id="shared", delegated_by="owner", delegated_to="bob"),
        pb.GetSecretRequest(secret_id="shared", delegated_to="bob"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            room.stub.GetSecret(request, metadata=carol)
        assert caught.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)
        assert value.decode() not in (caught.value.details() or "")
    # The delegate of another room does not get it either.
    bob2 = room.auth("bob", room="room-2")
    fails(
        lambda: room.stub.GetSecret(
            pb.GetSecretRequest(secret_id="shared", delegated_by="owner"), metadata=bob2
        ),
        grpc.StatusCode.NOT_FOUND,
    )


# -- health and reflection need no token --------------------------------------------------------------
def test_health_needs_no_token(server: ServerThread) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        check = health.Check(health_pb2.HealthCheckRequest(service="roomsecrets.v1.RoomSecrets"))
        assert check.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_needs_no_token(server: ServerThread) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = list(
            stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
        )
    names = {s.name for s in responses[0].list_services_response.service}
    assert "roomsecrets.v1.RoomSecrets" in names
    assert "grpc.health.v1.Health" in names


# -- production keys: PEM public keys and JWKS --------------------------------------------------------
@dataclass
class KeySet:
    private: dict[str, tuple[PrivateKey, str]]  # kid -> (private key, algorithm)
    pem_files: dict[str, Path]  # kid -> public key PEM file (PEM keys only)
    jwks_file: Path


def _public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def keyset(tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    root = tmp_path_factory.mktemp("keys")
    private: dict[str, tuple[PrivateKey, str]] = {
        "rsa-1": (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        "ec-1": (ec.generate_private_key(ec.SECP256R1()), "ES256"),
        "ed-1": (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
        "jwks-rsa": (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        "jwks-ec": (ec.generate_private_key(ec.SECP256R1()), "ES256"),
        "jwks-ed": (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
    }
    pem_files: dict[str, Path] = {}
    for kid in ("rsa-1", "ec-1", "ed-1"):
        path = root / f"{kid}.pem"
        path.write_bytes(_public_pem(private[kid][0]))
        pem_files[kid] = path
    jwks: list[dict[str, Any]] = []
    for kid in ("jwks-rsa", "jwks-ec", "jwks-ed"):
        key = private[kid][0]
        if isinstance(key, rsa.RSAPrivateKey):
            jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
        jwk["kid"] = kid
        jwk["use"] = "sig"
        jwks.append(jwk)
    jwks_file = root / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": jwks}))
    return KeySet(private, pem_files, jwks_file)


@pytest.fixture(scope="module")
def prod_server(keyset: KeySet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    settings = test_settings(
        tmp_path_factory.mktemp("prod") / "data",
        jwt_public_keys=tuple(keyset.pem_files.values()),
        jwks_files=(keyset.jwks_file,),
        dev_signing_key=False,
    )
    running = ServerThread(settings).start()
    yield running
    running.stop()


@pytest.fixture
def prod(prod_server: ServerThread) -> Iterator[Participants]:
    participants = Participants(prod_server)
    yield participants
    participants.close()


def sign(keyset: KeySet, kid: str, identity: str, **kwargs: Any) -> str:
    key, algorithm = keyset.private[kid]
    return jwt.encode(claims(identity, kid=kid, **kwargs), key, algorithm=algorithm, headers={"kid": kid})


ALL_KIDS = ["rsa-1", "ec-1", "ed-1", "jwks-rsa", "jwks-ec", "jwks-ed"]


@pytest.mark.parametrize("kid", ALL_KIDS)
def test_production_key_tokens_are_accepted(prod: Participants, keyset: KeySet, kid: str) -> None:
    md = bearer(sign(keyset, kid, f"user-{kid}"))
    value = f"prod-{kid}".encode()
    prod.stub.SetSecret(pb.SetSecretRequest(secret_id="k", data=value), metadata=md)
    assert prod.stub.GetSecret(pb.GetSecretRequest(secret_id="k"), metadata=md).data == value


@pytest.mark.parametrize("kid", ALL_KIDS)
def test_production_key_expired_token_is_refused(prod: Participants, keyset: KeySet, kid: str) -> None:
    check_unauthenticated(prod, bearer(sign(keyset, kid, "alice", ttl=-60)))


@pytest.mark.parametrize("kid", ALL_KIDS)
def test_production_kid_signed_by_another_key_is_refused(
    prod: Participants, keyset: KeySet, kid: str
) -> None:
    # Same algorithm family, different private key, same kid.
    key, algorithm = keyset.private[kid]
    other: PrivateKey
    if isinstance(key, rsa.RSAPrivateKey):
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        other = ec.generate_private_key(ec.SECP256R1())
    else:
        other = ed25519.Ed25519PrivateKey.generate()
    token = jwt.encode(claims("alice", kid=kid), other, algorithm=algorithm, headers={"kid": kid})
    check_unauthenticated(prod, bearer(token))


@pytest.mark.parametrize("kid", ALL_KIDS)
def test_hs256_token_signed_with_the_public_key_is_refused(
    prod: Participants, keyset: KeySet, kid: str
) -> None:
    """Algorithm confusion: the public key's PEM (or JWK) bytes used as an HMAC secret."""
    key = keyset.private[kid][0]
    secrets_tried = [_public_pem(key)]
    if kid in keyset.pem_files:
        secrets_tried.append(keyset.pem_files[kid].read_bytes())
    else:
        doc = json.loads(keyset.jwks_file.read_text())
        secrets_tried.extend(json.dumps(j).encode() for j in doc["keys"] if j["kid"] == kid)
    for secret in secrets_tried:
        for alg in ("HS256", "HS384", "HS512"):
            token = hand_made({"alg": alg, "typ": "JWT", "kid": kid}, claims("alice", kid=kid), secret)
            check_unauthenticated(prod, bearer(token))


@pytest.mark.parametrize("kid", ALL_KIDS)
def test_production_alg_none_is_refused(prod: Participants, kid: str) -> None:
    token = hand_made({"alg": "none", "typ": "JWT", "kid": kid}, claims("alice", kid=kid), None)
    check_unauthenticated(prod, bearer(token))


def test_production_server_refuses_dev_key_tokens(prod: Participants) -> None:
    # The dev key is disabled: a token minted with the data dir's dev key is not accepted.
    check_unauthenticated(prod, prod.auth("alice"))


def test_production_key_tokens_keep_rooms_and_grants(prod: Participants, keyset: KeySet) -> None:
    alice = bearer(sign(keyset, "ec-1", "alice", room="prod-room"))
    prod.stub.SetSecret(pb.SetSecretRequest(secret_id="scoped", data=b"v"), metadata=alice)
    other_room = bearer(sign(keyset, "ed-1", "alice", room="elsewhere"))
    assert not prod.stub.Exists(pb.ExistsRequest(secret_id="scoped"), metadata=other_room).exists
    # Same identity and room, signed by another configured key: the same participant.
    same = bearer(sign(keyset, "jwks-rsa", "alice", room="prod-room"))
    assert prod.stub.GetSecret(pb.GetSecretRequest(secret_id="scoped"), metadata=same).data == b"v"
    no_grant = bearer(sign(keyset, "rsa-1", "alice", room="prod-room", secrets_grant=False))
    fails(
        lambda: prod.stub.GetSecret(pb.GetSecretRequest(secret_id="scoped"), metadata=no_grant),
        grpc.StatusCode.PERMISSION_DENIED,
    )


@pytest.mark.parametrize(
    ("claims", "named"),
    [
        ({"identity": "bob\x00"}, "'name' claim"),
        ({"identity": "b\ud800"}, "'name' claim"),
        ({"identity": "x" * 257}, "'name' claim"),
        ({"identity": " bob"}, "'name' claim"),
        ({"room": "room-1\n"}, "'room' grant"),
        ({"room": "r\udfff"}, "'room' grant"),
        ({"project": "/" * 2700}, "'sub' claim"),
        ({"project": "p\x7f"}, "'sub' claim"),
    ],
)
def test_name_like_claims_are_checked_at_the_door(
    room: Participants, claims: dict[str, str], named: str
) -> None:
    """They become store keys, stream channels and log fields: a NUL, a lone UTF-16 surrogate (a
    JSON \\u escape) or a megabyte name once reached the store (INTERNAL), and an oversized
    project stopped a PostgreSQL replica's notifications (the NOTIFY payload limit)."""
    rest = dict(claims)  # the parameter is shared by both stores' runs
    md = room.auth(rest.pop("identity", "alice"), **rest)
    for call in (
        lambda: room.stub.ListSecrets(pb.ListSecretsRequest(), metadata=md),
        lambda: next(iter(room.stub.WatchRequests(pb.WatchRequestsRequest(), metadata=md, timeout=10))),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert named in (refused.value.details() or "")
