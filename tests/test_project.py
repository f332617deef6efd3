"""Project secrets through the real server: Secret Keys, Image Pull Secrets, Service and
ServiceTemplate manifests, ResolveService, and who may do what."""

from __future__ import annotations

import base64
import json
import logging
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import jwt
import pytest
from roomsecrets.errors import NotFoundError, PermissionDeniedError, SecretsError
from roomsecrets.project import AsyncProjectSecretsClient, ProjectSecretsClient
from roomsecrets.v1 import project_secrets_pb2 as pb
from roomsecrets.v1 import project_secrets_pb2_grpc as pb_grpc
from roomsecrets.v1 import room_secrets_pb2 as rpb

from .harness import Participants

OPENAI = "sk-openai-5f4e3d2c1b"
DB = "postgres://app:pw-8d7c6b@db/app"
REGISTRY_PASSWORD = "registry-pw-0a9b8c7d"
ROOM_SECRET = "ghp-room-secret-1234"
MANIFEST = textwrap.dedent(
    """
    version: v1
    kind: Service
    metadata: {name: api, description: The API}
    container:
      image: registry.example/api:1.2
      secrets: [openai, db]
      pull_secret: regcred
      environment:
        - {name: LOG_LEVEL, value: debug}
        - name: ROOM_TOKEN
          token: {identity: api-bot, api: [secrets], role: agent}
        - name: GITHUB_TOKEN
          secret: {identity: alice, id: gh}
    """
)
TEMPLATE = textwrap.dedent(
    """
    version: v1
    kind: ServiceTemplate
    metadata: {name: chat}
    variables:
      - {name: api_key, title: API key, obscure: true}
      - {name: model, enum: [small, large], optional: true}
    container:
      image: registry.example/chat:1
      environment:
        - {name: API_KEY, value: "{{ api_key }}"}
        - {name: MODEL, value: "model-{{ model }}"}
    """
)
SMALL_MANIFEST = textwrap.dedent(
    """
    version: v1
    kind: Service
    metadata: {name: api}
    container:
      image: registry.example/api:1.2
      secrets: [openai]
      environment:
        - {name: LOG_LEVEL, value: debug}
    """
)
VALUES = (OPENAI, DB, REGISTRY_PASSWORD, ROOM_SECRET)


@pytest.fixture
def clients(room: Participants) -> Iterator[Callable[..., ProjectSecretsClient]]:
    made: list[ProjectSecretsClient] = []

    def make(identity: str = "ops", **token: object) -> ProjectSecretsClient:
        client = ProjectSecretsClient(room.server.address, room.token(identity, **token))
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def admin(clients: Callable[..., ProjectSecretsClient]) -> ProjectSecretsClient:
    # Room admin too: MANIFEST mints a token for another identity (api-bot), which only an author
    # who may act for other identities can put in a manifest.
    return clients("ops", project_role="admin", admin=True)


@pytest.fixture
def seeded(admin: ProjectSecretsClient, room: Participants) -> ProjectSecretsClient:
    admin.create_secret_key("OpenAI", {"OPENAI_API_KEY": OPENAI}, id="openai")
    admin.create_secret_key("Database", {"DATABASE_URL": DB}, id="db")
    admin.create_pull_secret(
        "Registry", id="regcred", server="registry.example", username="puller", password=REGISTRY_PASSWORD
    )
    # alice lets the manifest's author use her secret: a manifest names only what its author may read.
    room.stub.SetSecret(
        rpb.SetSecretRequest(secret_id="gh", data=ROOM_SECRET.encode(), delegated_to="ops"),
        metadata=room.auth("alice"),
    )
    admin.apply_service(MANIFEST)
    return admin


def test_resolve_gives_the_environment_and_pull_credentials(
    seeded: ProjectSecretsClient, room: Participants
) -> None:
    resolved = seeded.resolve_service("api")
    env = dict(resolved.environment)
    token = env.pop("ROOM_TOKEN")
    assert env == {
        "OPENAI_API_KEY": OPENAI,
        "DATABASE_URL": DB,
        "LOG_LEVEL": "debug",
        "GITHUB_TOKEN": ROOM_SECRET,
    }
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["name"] == "api-bot" and {"name": "room", "scope": room.room} in claims["grants"]
    # The minted token works against the server.
    room.stub.ListSecrets(rpb.ListSecretsRequest(), metadata=(("authorization", f"Bearer {token}"),))
    assert resolved.image == "registry.example/api:1.2"
    doc = json.loads(resolved.docker_config_json)
    entry = doc["auths"]["registry.example"]
    assert base64.b64decode(entry["auth"]).decode() == f"puller:{REGISTRY_PASSWORD}"
    assert entry["email"] == "none@example.com"
    assert REGISTRY_PASSWORD not in env.values()  # pull credentials are never environment
    assert OPENAI not in repr(resolved)


def test_rotated_key_is_seen_by_the_next_resolve(seeded: ProjectSecretsClient) -> None:
    before = seeded.get_secret_key("openai")
    assert before is not None
    seeded.update_secret_key(
        "openai", set={"OPENAI_API_KEY": "sk-rotated", "OPENAI_ORG": "org-1"}, etag=before.etag
    )
    env = seeded.resolve_service("api").environment
    assert env["OPENAI_API_KEY"] == "sk-rotated" and env["OPENAI_ORG"] == "org-1"
    with pytest.raises(Exception) as stale:
        seeded.update_secret_key("openai", remove=["OPENAI_ORG"], etag=before.etag)
    assert "ABORTED" in str(stale.value)
    seeded.update_secret_key("openai", remove=["OPENAI_ORG"])
    assert "OPENAI_ORG" not in seeded.resolve_service("api").environment


def test_creating_what_exists_is_already_exists_in_project_terms(seeded: ProjectSecretsClient) -> None:
    cases: list[tuple[Callable[[], object], str]] = [
        (
            lambda: seeded.create_secret_key("Other", {"K": "v"}, id="openai"),
            "secret key 'openai' already exists",
        ),
        (
            lambda: seeded.create_secret_key("OpenAI", {"K": "v"}),
            "another secret key is already named 'OpenAI'",
        ),
        (
            lambda: seeded.create_pull_secret(
                "Other", id="regcred", server="r.example", username="u", password="p"
            ),
            "pull secret 'regcred' already exists",
        ),
    ]
    for create, message in cases:
        with pytest.raises(SecretsError) as exists:
            create()
        assert exists.value.code == grpc.StatusCode.ALREADY_EXISTS, exists.value
        assert exists.value.message == message
    assert seeded.get_secret_key("openai").name == "OpenAI"  # type: ignore[union-attr]  # unchanged


def test_permission_matrix(
    seeded: ProjectSecretsClient, clients: Callable[..., ProjectSecretsClient]
) -> None:
    callers = {
        "admin": seeded,
        "developer": clients("dev", project_role="developer"),
        "service api": clients("api", project_role="service", service="api"),
        "service other": clients("other", project_role="service", service="other"),
        "participant": clients("alice"),
    }
    operations: dict[str, Callable[[ProjectSecretsClient], object]] = {
        "resolve api": lambda c: c.resolve_service("api"),
        "read key values": lambda c: dict((c.get_secret_key("openai") or pytest.fail("gone")).data),
        "list keys": lambda c: c.list_secret_keys(),
        "create key": lambda c: c.create_secret_key("x", {"X": "1"}),
        "list pull secrets": lambda c: c.list_pull_secrets(),
        "apply manifest": lambda c: c.apply_service(MANIFEST),
        "get service": lambda c: c.get_service("api"),
    }
    expected = {
        "admin": "ok ok ok ok ok ok ok",
        "developer": "denied no-values ok denied ok denied ok",  # MANIFEST holds keys: not a developer's
        "service api": "ok ok denied denied denied denied ok",
        "service other": "denied denied denied denied denied denied denied",
        "participant": "denied denied denied denied denied denied denied",
    }
    table: dict[str, str] = {}
    for who, client in callers.items():
        row = []
        for op, call in operations.items():
            try:
                result = call(client)
            except PermissionDeniedError:
                row.append("denied")
                continue
            if op == "read key values" and not result:
                row.append("no-values")
            else:
                row.append("ok")
            if op == "read key values" and result:
                assert result == {"OPENAI_API_KEY": OPENAI}
        table[who] = " ".join(row)
    print("\n" + "\n".join(f"{who:14} {row}" for who, row in table.items()))
    assert table == expected


def test_missing_key_is_an_error_naming_it(seeded: ProjectSecretsClient) -> None:
    seeded.delete_secret_key("db")
    with pytest.raises(Exception) as err:
        seeded.resolve_service("api")
    assert "FAILED_PRECONDITION" in str(err.value) and "'db'" in str(err.value)


def test_invalid_manifest_is_refused_whole(seeded: ProjectSecretsClient) -> None:
    broken = MANIFEST.replace("name: LOG_LEVEL", "name: 9LOG")
    with pytest.raises(Exception) as err:
        seeded.apply_service(broken)
    message = str(err.value)
    assert (
        "INVALID_ARGUMENT" in message and "container.environment[0].name" in message and "line 10" in message
    )
    stored = seeded.get_service("api")
    assert stored is not None and stored.manifest == MANIFEST  # the old one is untouched
    with pytest.raises(Exception, match="Service only"):
        seeded.apply_service(
            TEMPLATE.replace("  image: registry.example/chat:1", "  image: x\n  secrets: [db]")
        )


def test_template_obscure_variable_is_stored_as_a_room_secret(
    admin: ProjectSecretsClient, room: Participants
) -> None:
    admin.apply_service(TEMPLATE)
    with pytest.raises(Exception, match=r"variables\.api_key"):
        admin.resolve_service("chat")
    env = admin.resolve_service("chat", {"api_key": "k-obscure-77", "model": "large"}).environment
    assert env == {"API_KEY": "k-obscure-77", "MODEL": "model-large"}
    # Stored as the service identity's room secret, and used when not supplied again.
    chat = room.auth("chat", project_role="service", service="chat")  # the service's own token
    stored = room.stub.GetSecret(rpb.GetSecretRequest(secret_id="chat.api_key"), metadata=chat)
    assert stored.data == b"k-obscure-77"
    # A participant that merely holds the identity `chat` does not read it (test_authority.py).
    with pytest.raises(grpc.RpcError) as refused:
        room.stub.GetSecret(rpb.GetSecretRequest(secret_id="chat.api_key"), metadata=room.auth("chat"))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert admin.resolve_service("chat").environment["API_KEY"] == "k-obscure-77"
    with pytest.raises(Exception, match=r"variables\.model"):
        admin.resolve_service("chat", {"model": "huge"})
    assert "k-obscure-77" not in (admin.get_service("chat") or pytest.fail("gone")).manifest


def test_values_never_in_metadata_replies_logs_or_audit(
    seeded: ProjectSecretsClient,
    clients: Callable[..., ProjectSecretsClient],
    room: Participants,
    data_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    stub = pb_grpc.ProjectSecretsStub(room.channel)
    md = room.auth("dev", project_role="developer")
    replies = [
        stub.ListSecretKeys(pb.ListSecretKeysRequest(), metadata=md),
        stub.GetSecretKey(pb.GetSecretKeyRequest(id="openai"), metadata=md),
        stub.ListPullSecrets(pb.ListPullSecretsRequest(), metadata=md),
        stub.ListServices(pb.ListServicesRequest(), metadata=md),
        stub.GetService(pb.GetServiceRequest(name="api"), metadata=md),
    ]
    for reply in replies:
        wire = reply.SerializeToString()
        assert not [v for v in VALUES if v.encode() in wire], type(reply).__name__
    seeded.resolve_service("api")
    errors = []
    for call in (
        lambda: clients("other", project_role="service", service="other").resolve_service("api"),
        lambda: seeded.create_secret_key("bad", {"9BAD": OPENAI}),
        lambda: seeded.create_pull_secret(
            "p", server="s", username="u", password=REGISTRY_PASSWORD, flavor="quay"
        ),
    ):
        with pytest.raises(Exception) as err:
            call()
        errors.append(str(err.value))
    room.server.stop()
    audit = (data_dir / "audit.log").read_text()
    assert "resolve_service" in audit and "create_secret_key" in audit
    for where, text in {"log": caplog.text, "audit": audit, "errors": "\n".join(errors)}.items():
        assert not [v[:6] for v in VALUES if v in text], where
    for path in data_dir.rglob("*"):
        if path.is_file():
            assert not [v for v in VALUES if v.encode() in path.read_bytes()], path.name


def test_gar_and_acr_flavours(admin: ProjectSecretsClient) -> None:
    gar = admin.create_pull_secret(
        "GAR", server="europe-docker.pkg.dev", password='{"type": "service_account"}', flavor="gar"
    )
    acr = admin.create_pull_secret("ACR", server="x.azurecr.io", username="x", password="p", flavor="acr")
    assert (gar.username, gar.email, gar.flavor) == ("_json_key", "none@google.com", "gar")
    assert (acr.email, acr.flavor) == ("none@microsoft.com", "acr")
    assert {s.id for s in admin.list_pull_secrets()} == {gar.id, acr.id}
    admin.delete_pull_secret(gar.id)
    assert [s.id for s in admin.list_pull_secrets()] == [acr.id]


def test_delete_and_not_found(seeded: ProjectSecretsClient) -> None:
    seeded.delete_service("api")
    assert seeded.get_service("api") is None
    with pytest.raises(NotFoundError):
        seeded.resolve_service("api")
    assert seeded.get_secret_key("nope") is None


def test_bad_input_names_the_field(admin: ProjectSecretsClient, room: Participants) -> None:
    stub = pb_grpc.ProjectSecretsStub(room.channel)
    md = room.auth("ops", project_role="admin")
    cases: list[tuple[object, Callable[..., object], str]] = [
        (pb.CreateSecretKeyRequest(name="n", data={"BAD-NAME": "x"}), stub.CreateSecretKey, "data"),
        (pb.CreatePullSecretRequest(name="n", server="s", username="u"), stub.CreatePullSecret, "password"),
        (pb.ResolveServiceRequest(name="Not_A_Name"), stub.ResolveService, "name"),
        (pb.ApplyServiceRequest(manifest="kind: [unclosed"), stub.ApplyService, "manifest"),
    ]
    for request, method, field in cases:
        with pytest.raises(grpc.RpcError) as err:
            method(request, metadata=md)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert field in str(err.value.details())


async def test_async_client(room: Participants) -> None:
    async with AsyncProjectSecretsClient(
        room.server.address, room.token("ops", project_role="admin")
    ) as admin:
        await admin.create_secret_key("OpenAI", {"OPENAI_API_KEY": OPENAI}, id="openai")
        await admin.apply_service(SMALL_MANIFEST)
        assert [k.id for k in await admin.list_secret_keys()] == ["openai"]
        assert [s.name for s in await admin.list_services()] == ["api"]
        resolved = await admin.resolve_service("api")
        assert dict(resolved.environment) == {"OPENAI_API_KEY": OPENAI, "LOG_LEVEL": "debug"}
        assert resolved.docker_config_json == b""
        assert await admin.get_secret_key("missing") is None
    async with AsyncProjectSecretsClient(
        room.server.address, room.token("x", project_role="service", service="x")
    ) as other:
        with pytest.raises(PermissionDeniedError):
            await other.resolve_service("api")
