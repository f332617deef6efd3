"""One authority rule across features (SECURITY.md "Authority"): no identity reaches another's
secrets through a chain of features — a manifest, a stored answer, a template — and every release
is audited naming owner, id and on whose authority. Each finding's test failed on the code before
the fix (an outside attacker's report); the information-flow table covers the classes."""

from __future__ import annotations

import contextlib
import json
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from roomsecrets.errors import FailedPreconditionError, PermissionDeniedError, SecretsError
from roomsecrets.project import ProjectSecretsClient
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets_server.auth.dev_key import ensure_dev_key
from roomsecrets_server.project import launch
from roomsecrets_server.project.service import SERVICE_TYPE
from roomsecrets_server.store import ANY, SecretKey

from .harness import Participants, ServerThread
from .test_requests import Watcher, ask, provider

KEY_VALUE = "sk-project-key-3e1f9a"
ALICE_VALUE = "alice-own-gh-77c2"
PULL_PASSWORD = "pull-pw-1b2c3d"


@pytest.fixture
def watchers() -> Iterator[list[Watcher]]:
    started: list[Watcher] = []
    yield started
    for watcher in started:
        watcher.cancel()


@pytest.fixture
def project(room: Participants) -> Iterator[Callable[..., ProjectSecretsClient]]:
    made: list[ProjectSecretsClient] = []

    def client(identity: str, **token: Any) -> ProjectSecretsClient:
        made.append(ProjectSecretsClient(room.server.address, room.token(identity, **token)))
        return made[-1]

    yield client
    for c in made:
        c.close()


def set_secret(room: Participants, identity: str, **fields: Any) -> pb.SecretInfo:
    reply = room.stub.SetSecret(pb.SetSecretRequest(**fields), metadata=room.auth(identity))
    return reply.secret


def get_data(room: Participants, identity: str, **fields: Any) -> bytes:
    return bytes(room.stub.GetSecret(pb.GetSecretRequest(**fields), metadata=room.auth(identity)).data)


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    except SecretsError as err:
        return err.code
    return grpc.StatusCode.OK


def audit_lines(server: ServerThread) -> list[dict[str, str]]:
    async def flush() -> None:
        assert server.server is not None
        server.server.audit.flush()

    server.call(flush())
    path = server.settings.audit_log_path
    return [json.loads(line) for line in path.read_text().splitlines()]


def service(name: str, *lines: str, kind: str = "Service") -> str:
    body = "\n".join(f"    {line}" for line in lines)
    return textwrap.dedent(
        f"""\
        version: v1
        kind: {kind}
        metadata: {{name: {name}}}
        container:
          image: registry.example/{name}:1
        """
    ) + (f"  environment:\n{body}\n" if lines else "")


# -- finding 6: a request answer overwrote an unrelated secret ------------------------------------------
def test_an_answer_never_replaces_a_secret_stored_with_set_secret(
    room: Participants, watchers: list[Watcher]
) -> None:
    own = set_secret(room, "bob", type="text/plain", name="prod-db", data=b"bob-own-password")
    watchers.append(Watcher(room, "bob", provider(room, "bob", b"answer-for-mallory")))
    # Without delegate_to the answer is bob's, undelegated: the very (type, name) of his own secret.
    got = ask(room, "mallory", "bob", url="prod-db", type="text/plain")
    assert got.data == b"answer-for-mallory"
    # bob's own secret is untouched, by id and by name; the answer is its own row.
    assert get_data(room, "bob", secret_id=own.id) == b"bob-own-password"
    assert get_data(room, "bob", type="text/plain", name="prod-db") == b"bob-own-password"
    listed = room.stub.ListSecrets(pb.ListSecretsRequest(), metadata=room.auth("bob")).secrets
    assert sorted((s.name, s.delegated_to) for s in listed) == [("prod-db", ""), ("prod-db", "")]
    # SetSecret does not replace the answer either (it is not SetSecret's to replace).
    answer = next(s for s in listed if s.id != own.id)
    refused = code_of(lambda: set_secret(room, "bob", secret_id=answer.id, data=b"x"))
    assert refused == grpc.StatusCode.FAILED_PRECONDITION
    assert get_data(room, "bob", secret_id=answer.id) == b"answer-for-mallory"


# -- finding 4: a delegate deleted its owners' secrets ----------------------------------------------------
def test_delete_requested_secret_deletes_answers_only(room: Participants, watchers: list[Watcher]) -> None:
    url = "https://git.example/repo.git"
    alice_own = set_secret(room, "alice", type="git", name=url, data=b"alice-set", delegated_to="bob")
    carol_own = set_secret(room, "carol", type="git", name=url, data=b"carol-set", delegated_to="bob")
    # Never obtained through a request: nothing for bob to delete.
    refused = code_of(
        lambda: room.stub.DeleteRequestedSecret(
            pb.DeleteRequestedSecretRequest(url=url, type="git", delegated_to="bob"),
            metadata=room.auth("bob"),
        )
    )
    assert refused == grpc.StatusCode.NOT_FOUND
    assert get_data(room, "bob", secret_id=alice_own.id, delegated_by="alice") == b"alice-set"
    assert get_data(room, "bob", secret_id=carol_own.id, delegated_by="carol") == b"carol-set"

    # A real answer: bob asks alice, who provides; bob may delete that one (delegated to him).
    watchers.append(Watcher(room, "alice", provider(room, "alice", b"alice-answer")))
    assert ask(room, "bob", "alice", url=url, type="git", delegate_to="bob").data == b"alice-answer"
    room.stub.DeleteRequestedSecret(
        pb.DeleteRequestedSecretRequest(url=url, type="git", delegated_to="bob"), metadata=room.auth("bob")
    )
    assert get_data(room, "bob", secret_id=alice_own.id, delegated_by="alice") == b"alice-set"
    assert get_data(room, "bob", secret_id=carol_own.id, delegated_by="carol") == b"carol-set"
    deleted = [line for line in audit_lines(room.server) if line["action"] == "delete_requested_secret"]
    assert [(d["owner"], d.get("authority")) for d in deleted if d["outcome"] == "ok"] == [
        ("alice", "delegate:bob")
    ]
    assert all(d.get("secret_id") for d in deleted if d["outcome"] == "ok")


def test_delete_requested_secret_by_its_owner_names_the_delegation(
    room: Participants, watchers: list[Watcher]
) -> None:
    url = "https://example.com/delegated"
    watchers.append(Watcher(room, "owner", provider(room, "owner", b"v")))
    assert ask(room, "bob", "owner", url=url, delegate_to="bob").data == b"v"  # default type
    owner = room.auth("owner")
    missing = code_of(
        lambda: room.stub.DeleteRequestedSecret(pb.DeleteRequestedSecretRequest(url=url), metadata=owner)
    )
    assert missing == grpc.StatusCode.NOT_FOUND  # the answer is delegated to bob
    room.stub.DeleteRequestedSecret(
        pb.DeleteRequestedSecretRequest(url=url, delegated_to="bob"), metadata=owner
    )
    assert list(room.stub.ListSecrets(pb.ListSecretsRequest(), metadata=owner).secrets) == []


# -- finding 1: manifest escalation ----------------------------------------------------------------------
def test_a_developer_manifest_yields_nothing_beyond_the_developer(
    room: Participants, project: Callable[..., ProjectSecretsClient]
) -> None:
    admin = project("ops", project_role="admin", admin=True)
    admin.create_secret_key("OpenAI", {"OPENAI_API_KEY": KEY_VALUE}, id="openai")
    set_secret(room, "alice", secret_id="gh", data=ALICE_VALUE.encode())
    admin.apply_service(service("api", "- {name: LOG_LEVEL, value: info}"))
    dev = project("dev", project_role="developer")
    attacks = {
        "container.secrets": service("api").replace("  image:", "  secrets: [openai]\n  image:"),
        "container.environment[0].secret": service("api", "- {name: GH, secret: {identity: alice, id: gh}}"),
        "container.environment[0].token": service(
            "api", "- {name: T, token: {identity: alice, api: [secrets, admin]}}"
        ),
        "container.environment[0].token ": service(
            "api", "- {name: T, token: {identity: dev, api: [admin]}}"
        ),
    }
    for field, manifest in attacks.items():
        with pytest.raises(PermissionDeniedError) as refused:
            dev.apply_service(manifest)
        assert field.strip() in refused.value.message, refused.value.message
    # The service still gets only what the admin gave it.
    api = project("api", project_role="service", service="api")
    assert dict(api.resolve_service("api").environment) == {"LOG_LEVEL": "info"}
    denied = [
        line
        for line in audit_lines(room.server)
        if line["action"] == "apply_service" and line["outcome"] == "denied"
    ]
    assert len(denied) == len(attacks) and {d["actor"] for d in denied} == {"dev"}


def test_a_room_secret_reaches_a_manifest_only_through_its_owners_delegation(
    room: Participants, project: Callable[..., ProjectSecretsClient]
) -> None:
    dev = project("dev", project_role="developer")
    manifest = service("api", "- {name: GH, secret: {identity: alice, id: gh}}")
    set_secret(room, "alice", secret_id="gh", data=ALICE_VALUE.encode())
    with pytest.raises(PermissionDeniedError):
        dev.apply_service(manifest)  # alice's own secret: not dev's to give
    set_secret(room, "alice", secret_id="gh", data=ALICE_VALUE.encode(), delegated_to="dev")
    applied = dev.apply_service(manifest)
    assert (applied.applied_by, applied.applied_by_role) == ("dev", "developer")
    api = project("api", project_role="service", service="api")
    assert api.resolve_service("api").environment["GH"] == ALICE_VALUE
    release = [line for line in audit_lines(room.server) if line["action"] == "resolve_service.secret"]
    assert [(r["actor"], r["owner"], r["secret_id"], r["delegated_to"]) for r in release] == [
        ("api", "alice", "gh", "dev")
    ]
    assert release[0]["authority"] == "delegate:dev (manifest api)"
    # alice revokes the delegation: the manifest loses the secret.
    room.stub.DeleteSecret(
        pb.DeleteSecretRequest(secret_id="gh", delegated_to="dev"), metadata=room.auth("alice")
    )
    with pytest.raises(FailedPreconditionError) as gone:
        api.resolve_service("api")
    assert "'gh'" in gone.value.message and ALICE_VALUE not in gone.value.message


def test_a_minted_token_carries_nothing_beyond_its_author(
    room: Participants, project: Callable[..., ProjectSecretsClient]
) -> None:
    restriction = [{"endpoint": "https://idp.example/authorize", "client_id": "c1"}]
    author = project("ops", project_role="admin", admin=True, request_oauth_token=restriction)
    author.apply_service(service("bot", "- {name: T, token: {identity: bot-agent, api: [secrets, admin]}}"))
    token = project("bot", project_role="service", service="bot").resolve_service("bot").environment["T"]
    claims = jwt.decode(token, options={"verify_signature": False})
    api = next(g["scope"] for g in claims["grants"] if g["name"] == "api")
    assert claims["name"] == "bot-agent" and set(api) == {"secrets", "admin"}
    assert api["secrets"]["request_oauth_token"] == restriction  # the author's restriction travels
    # A project admin without room admin mints only for itself, and no admin grant.
    no_room_admin = project("pa", project_role="admin")
    for entry in ("{identity: bot-agent, api: [secrets]}", "{identity: pa, api: [admin]}"):
        with pytest.raises(PermissionDeniedError):
            no_room_admin.apply_service(service("bot2", f"- {{name: T, token: {entry}}}"))
    no_room_admin.apply_service(service("bot2", "- {name: T, token: {identity: pa, api: [secrets]}}"))
    minted = project("bot2", project_role="service", service="bot2").resolve_service("bot2").environment["T"]
    assert jwt.decode(minted, options={"verify_signature": False})["name"] == "pa"


def test_a_manifest_without_a_recorded_author_releases_no_key_values(
    room: Participants, project: Callable[..., ProjectSecretsClient]
) -> None:
    admin = project("ops", project_role="admin")
    admin.create_secret_key("OpenAI", {"OPENAI_API_KEY": KEY_VALUE}, id="openai")
    legacy = service("api", "- {name: LOG_LEVEL, value: info}").replace(
        "  image:", "  secrets: [openai]\n  image:"
    )
    server = room.server.server
    assert server is not None
    key = SecretKey("", "dev-project", "", "service:api")  # how a manifest row was stored before authors
    record = server.secrets.seal(key, SERVICE_TYPE, "api", legacy.encode())
    room.server.call(server.store.put_secret(record, ANY))
    api = project("api", project_role="service", service="api")
    for call in (lambda: api.resolve_service("api"), lambda: api.get_secret_key("openai")):
        with pytest.raises(SecretsError) as refused:
            call()
        assert refused.value.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED)
        assert KEY_VALUE not in str(refused.value)
    admin.apply_service(legacy)  # re-applied by a project admin: it works again
    assert api.resolve_service("api").environment["OPENAI_API_KEY"] == KEY_VALUE


# -- finding 9: `run` executed a developer's code ---------------------------------------------------------
def test_start_up_variables_need_an_admins_allow_list(
    room: Participants, project: Callable[..., ProjectSecretsClient]
) -> None:
    dev = project("dev", project_role="developer")
    for name in (
        "BASH_ENV",
        "LD_PRELOAD",
        "PATH",
        "PYTHONPATH",
        "NODE_OPTIONS",
        "path",
        "ROOMSECRETS_ADDRESS",
    ):
        with pytest.raises(SecretsError) as refused:
            dev.apply_service(service("api", f"- {{name: {name}, value: /tmp/x}}"))
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "container.environment[0].name" in refused.value.message
    allowing = service("api", "- {name: PYTHONPATH, value: /opt/lib}").replace(
        "  image:", "  allow_environment: [PYTHONPATH]\n  image:"
    )
    with pytest.raises(PermissionDeniedError):
        dev.apply_service(allowing)
    admin = project("ops", project_role="admin")
    admin.apply_service(allowing)
    resolved = project("api", project_role="service", service="api").resolve_service("api")
    assert resolved.environment == {"PYTHONPATH": "/opt/lib"} and resolved.allowed_environment == (
        "PYTHONPATH",
    )
    # A key's variables are environment too: a key holding BASH_ENV is refused unless allowed.
    admin.create_secret_key("Shell", {"BASH_ENV": "/tmp/evil"}, id="shell")
    admin.apply_service(service("api").replace("  image:", "  secrets: [shell]\n  image:"))
    with pytest.raises(FailedPreconditionError) as refused:
        project("api", project_role="service", service="api").resolve_service("api")
    assert "BASH_ENV" in refused.value.message and "/tmp/evil" not in refused.value.message


# -- finding 10: a template install overwrote another identity's secret --------------------------------------
def test_a_template_never_uses_or_replaces_a_secret_it_did_not_store(
    room: Participants, project: Callable[..., ProjectSecretsClient]
) -> None:
    set_secret(room, "ci", secret_id="ci.token", data=b"ci-own-token")
    template = textwrap.dedent(
        """\
        version: v1
        kind: ServiceTemplate
        metadata: {name: ci}
        variables:
          - {name: token, obscure: true}
        container:
          image: registry.example/ci:1
          environment:
            - {name: TOKEN, value: "{{ token }}"}
        """
    )
    admin = project("pa", project_role="admin", admin=True)
    admin.apply_service(template)
    for variables in ({"token": "overwrite"}, {}):
        with pytest.raises(FailedPreconditionError) as refused:
            admin.resolve_service("ci", variables)
        assert "ci.token" in refused.value.message and "ci-own-token" not in refused.value.message
    assert get_data(room, "ci", secret_id="ci.token") == b"ci-own-token"
    # Its own variable it stores, reads back, and replaces.
    room.stub.DeleteSecret(pb.DeleteSecretRequest(secret_id="ci.token"), metadata=room.auth("ci"))
    assert admin.resolve_service("ci", {"token": "t1"}).environment == {"TOKEN": "t1"}
    assert admin.resolve_service("ci").environment == {"TOKEN": "t1"}
    assert admin.resolve_service("ci", {"token": "t2"}).environment == {"TOKEN": "t2"}


def test_audit_of_a_resolution_names_every_release(
    room: Participants, project: Callable[..., ProjectSecretsClient], data_dir: Path
) -> None:
    admin = project("ops", project_role="admin", admin=True)
    admin.create_secret_key("OpenAI", {"OPENAI_API_KEY": KEY_VALUE}, id="openai")
    admin.create_pull_secret("Reg", id="reg", server="r.example", username="u", password=PULL_PASSWORD)
    set_secret(room, "ops", secret_id="own", data=b"ops-own")
    manifest = service(
        "api", "- {name: OWN, secret: {identity: ops, id: own}}", "- {name: T, token: {identity: bot}}"
    ).replace("  image:", "  secrets: [openai]\n  pull_secret: reg\n  image:")
    admin.apply_service(manifest)
    project("api", project_role="service", service="api").resolve_service("api")
    lines = [line for line in audit_lines(room.server) if line["action"].startswith("resolve_service.")]
    seen = {(line["action"], line.get("secret_id") or line.get("target")) for line in lines}
    assert seen == {
        ("resolve_service.secret_key", "openai"),
        ("resolve_service.pull_secret", "reg"),
        ("resolve_service.secret", "own"),
        ("resolve_service.token", "bot"),
    }
    assert all(line["actor"] == "api" and "ops" in line["authority"] for line in lines)
    text = (data_dir / "audit.log").read_text()
    assert KEY_VALUE not in text and PULL_PASSWORD not in text and "ops-own" not in text


# -- the classes: an information-flow table --------------------------------------------------------------
# Who may have what, written from the rule (SECURITY.md "Authority"), not from the server's answers:
# a room secret: its owner and its one delegate; project key values and pull passwords: project
# admins; a token naming another identity with the admin grant: a room admin; a token for oneself
# with the secrets grant: anyone holding that grant.
PRINCIPALS: dict[str, dict[str, Any]] = {
    "alice": {"project_role": "developer"},  # owns `own` and `del`
    "bob": {"project_role": "developer"},  # `del` is delegated to him; he answered carol
    "carol": {"project_role": "developer"},  # bob's answer is delegated to her
    "ops": {"project_role": "admin", "admin": True},
    "pa": {"project_role": "admin"},
    "dev": {"project_role": "developer"},
    "mallory": {},
}
VALUES = (
    "alice-own",
    "alice-to-bob",
    "bob-answer-to-carol",
    "key",
    "pull",
    "token-alice-admin",
    "token-self",
)
OWNERS = {
    "alice-own": ("alice", ""),
    "alice-to-bob": ("alice", "bob"),
    "bob-answer-to-carol": ("bob", "carol"),
}


def may_have(who: str, value: str) -> bool:
    grants = PRINCIPALS[who]
    if value in OWNERS:
        return who in OWNERS[value]
    return {
        "key": grants.get("project_role") == "admin",
        "pull": grants.get("project_role") == "admin",
        "token-alice-admin": bool(grants.get("admin")),
        "token-self": True,
    }[value]


def may_author(who: str, value: str) -> bool:
    """Whether `who` can apply a manifest naming `value`: a project admin or developer, and a room
    secret is named {identity, id}: the author's own undelegated one, or one delegated to it (so
    an owner cannot name its own secret that is delegated to someone else)."""
    owner, delegate = OWNERS.get(value, ("", ""))
    return PRINCIPALS[who].get("project_role") in ("admin", "developer") and not (who == owner and delegate)


def test_information_flow_table(room: Participants, project: Callable[..., ProjectSecretsClient]) -> None:
    marks = {
        "alice-own": "flow-alice-own-91ab",
        "alice-to-bob": "flow-alice-del-72cd",
        "bob-answer-to-carol": "flow-bob-answer-53ef",
        "key": "flow-key-value-34aa",
        "pull": "flow-pull-pw-15bb",
    }
    ops = project("ops", **PRINCIPALS["ops"])
    set_secret(room, "alice", secret_id="own", data=marks["alice-own"].encode())
    set_secret(room, "alice", secret_id="del", data=marks["alice-to-bob"].encode(), delegated_to="bob")
    bob = Watcher(room, "bob", provider(room, "bob", marks["bob-answer-to-carol"].encode()))
    url = "https://flow.example/repo"
    ask(room, "carol", "bob", url=url, delegate_to="carol")
    bob.cancel()  # from here on nobody answers: what a request yields comes from storage
    answer_id = next(
        s.id
        for s in room.stub.ListSecrets(pb.ListSecretsRequest(), metadata=room.auth("bob")).secrets
        if s.name == url
    )
    ops.create_secret_key("K", {"FLOW_KEY": marks["key"]}, id="k")
    ops.create_pull_secret("R", id="reg", server="r.example", username="u", password=marks["pull"])
    ops.apply_service(service("withpull").replace("  image:", "  pull_secret: reg\n  image:"))
    rooms = {  # value -> (owner, delegate, id) of a room secret
        "alice-own": ("alice", "", "own"),
        "alice-to-bob": ("alice", "bob", "del"),
        "bob-answer-to-carol": ("bob", "carol", answer_id),
    }

    def holds(who: str, value: str, blob: bytes, tokens: list[str]) -> bool:
        if value in marks:
            return marks[value].encode() in blob
        for token in tokens:
            claims = jwt.decode(token, options={"verify_signature": False})
            api = next(g["scope"] for g in claims["grants"] if g["name"] == "api")
            if value == "token-alice-admin" and claims["name"] == "alice" and "admin" in api:
                return True
            if value == "token-self" and claims["name"] == who and "secrets" in api:
                return True
        return False

    def direct(who: str, value: str) -> bool:
        blobs: list[bytes] = []
        md = room.auth(who, **PRINCIPALS[who])
        if value in rooms:
            owner, delegate, secret_id = rooms[value]
            for fields in ({}, {"delegated_by": owner}, {"delegated_to": delegate}):
                try:
                    reply = room.stub.GetSecret(
                        pb.GetSecretRequest(secret_id=secret_id, **fields), metadata=md
                    )
                    blobs.append(reply.SerializeToString())
                except grpc.RpcError:
                    pass
            with contextlib.suppress(grpc.RpcError):  # answered from storage, asked as the delegate
                blobs.append(ask(room, who, owner, url=url, delegate_to=who, timeout=1).SerializeToString())
        client = project(who, **PRINCIPALS[who])
        try:
            if value == "key":
                blobs.append(repr(dict((client.get_secret_key("k") or pytest.fail("gone")).data)).encode())
            if value == "pull":
                blobs.append(client.resolve_service("withpull").docker_config_json)
        except SecretsError:
            pass
        return any(holds(who, value, blob, []) for blob in blobs)

    def through_a_manifest(who: str, value: str) -> bool:
        name = f"m-{who}-{VALUES.index(value)}"
        entry = {
            "token-alice-admin": "- {name: T, token: {identity: alice, api: [secrets, admin]}}",
            "token-self": f"- {{name: T, token: {{identity: {who}, api: [secrets]}}}}",
        }
        if value in rooms:
            owner, _, secret_id = rooms[value]
            entry[value] = f"- {{name: V, secret: {{identity: {owner}, id: '{secret_id}'}}}}"
        manifest = service(name, entry[value]) if value in entry else service(name)
        if value == "key":
            manifest = manifest.replace("  image:", "  secrets: [k]\n  image:")
        if value == "pull":
            manifest = manifest.replace("  image:", "  pull_secret: reg\n  image:")
        try:
            project(who, **PRINCIPALS[who]).apply_service(manifest)
            resolved = project(name, project_role="service", service=name).resolve_service(name)
        except SecretsError:
            return False
        blob = repr(dict(resolved.environment)).encode() + resolved.docker_config_json
        return holds(who, value, blob, [v for k, v in resolved.environment.items() if k == "T"])

    rows = []
    mismatches = []
    for who in PRINCIPALS:
        cells = []
        for value in VALUES:
            expected_direct = may_have(who, value) and not value.startswith("token")
            expected_manifest = may_have(who, value) and may_author(who, value)
            got_direct = direct(who, value) if not value.startswith("token") else False
            got_manifest = through_a_manifest(who, value)
            cells.append(f"{'D' if got_direct else '-'}{'M' if got_manifest else '-'}")
            if (got_direct, got_manifest) != (expected_direct, expected_manifest):
                mismatches.append(
                    (who, value, (got_direct, got_manifest), (expected_direct, expected_manifest))
                )
        rows.append(f"{who:8} " + " ".join(f"{c:>{len(v)}}" for c, v in zip(cells, VALUES, strict=True)))
    print("\nD: read directly, M: through a manifest it applies (resolved by its service)")
    print(f"{'':8} " + " ".join(VALUES))
    print("\n".join(rows))
    assert mismatches == []


def test_security_md_lists_the_start_up_variables_refused() -> None:
    text = (Path(__file__).parent.parent / "SECURITY.md").read_text()
    assert launch.document() in text


# -- what the black-box review found (each failed before its fix) -----------------------------------------
def forged(room: Participants, identity: str, api: Any, **claims: Any) -> tuple[tuple[str, str], ...]:
    """A token signed with the server's dev key, with `api` and other claims as given."""
    kid, key = ensure_dev_key(room.server.settings.data_dir)
    body = {
        "name": identity,
        "sub": "dev-project",
        "exp": int(time.time()) + 600,
        "grants": [{"name": "room", "scope": room.room}, {"name": "api", "scope": api}],
        **claims,
    }
    body = {k: v for k, v in body.items() if v is not None}
    return (("authorization", f"Bearer {jwt.encode(body, key, algorithm='HS256', headers={'kid': kid})}"),)


def test_an_admin_grant_saying_false_grants_nothing(room: Participants) -> None:
    set_secret(room, "victim", secret_id="s", data=b"victim-value")
    grants: list[Any] = [False, 0, "", "false", [], {"config": False}]
    for admin in grants:
        md = forged(room, "eve", {"secrets": {}, "admin": admin})
        request = pb.SetSecretRequest(secret_id="s", data=b"EVE-WAS-HERE", for_identity="victim")
        with pytest.raises(grpc.RpcError) as refused:
            room.stub.SetSecret(request, metadata=md)
        assert refused.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED), (
            admin
        )
    assert get_data(room, "victim", secret_id="s") == b"victim-value"
    ok = forged(room, "ops", {"secrets": {}, "admin": {}})  # the reference's AdminGrant{config: true}
    room.stub.Exists(pb.ExistsRequest(secret_id="s", for_identity="victim"), metadata=ok)


def test_a_token_without_a_project_is_refused(room: Participants) -> None:
    for sub in ("", None):
        with pytest.raises(grpc.RpcError) as refused:
            room.stub.ListSecrets(
                pb.ListSecretsRequest(), metadata=forged(room, "eve", {"secrets": {}}, sub=sub)
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_developer_naming_a_template_after_itself_reads_no_installers_input(
    room: Participants, project: Callable[..., ProjectSecretsClient]
) -> None:
    template = textwrap.dedent(
        """\
        version: v1
        kind: ServiceTemplate
        metadata: {name: dev}
        variables:
          - {name: db_password, obscure: true}
        container:
          image: registry.example/dev:1
          environment:
            - {name: DB_PASSWORD, value: "{{ db_password }}"}
        """
    )
    project("dev", project_role="developer").apply_service(template)
    installer = project("ops", project_role="admin", admin=True)  # stores for identity `dev`: room admin
    installer.resolve_service("dev", {"db_password": "ADMIN-ONLY-DB-PASSWORD"})
    read = pb.GetSecretRequest(secret_id="dev.db_password")
    for md in (room.auth("dev"), room.auth("dev", project_role="developer")):
        with pytest.raises(grpc.RpcError) as refused:
            room.stub.GetSecret(read, metadata=md)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    service = room.auth("dev", project_role="service", service="dev")  # the service itself does
    assert room.stub.GetSecret(read, metadata=service).data == b"ADMIN-ONLY-DB-PASSWORD"
    # Not even its size and CRC32C (a short value falls to a brute force of the checksum).
    listed = room.stub.ListSecrets(pb.ListSecretsRequest(), metadata=room.auth("dev")).secrets
    assert "dev.db_password" not in [s.id for s in listed]
    assert [s.id for s in room.stub.ListSecrets(pb.ListSecretsRequest(), metadata=service).secrets] == [
        "dev.db_password"
    ]


def test_installing_a_template_stores_for_its_identity_only_with_room_admin(
    room: Participants, project: Callable[..., ProjectSecretsClient]
) -> None:
    """A template named `alice` stores its variables as alice's secrets: acting for alice, which a
    project admin without room admin may not do (the service installing itself may)."""
    template = textwrap.dedent(
        """\
        version: v1
        kind: ServiceTemplate
        metadata: {name: alice}
        variables:
          - {name: pw, obscure: true}
        container:
          image: registry.example/alice:1
          environment:
            - {name: PW, value: "{{ pw }}"}
        """
    )
    project("dev", project_role="developer").apply_service(template)
    with pytest.raises(PermissionDeniedError):
        project("pa", project_role="admin").resolve_service("alice", {"pw": "INSTALLER-PW"})
    assert not room.stub.Exists(pb.ExistsRequest(secret_id="alice.pw"), metadata=room.auth("alice")).exists
    project("ops", project_role="admin", admin=True).resolve_service("alice", {"pw": "INSTALLER-PW"})
    project("alice", project_role="service", service="alice").resolve_service("alice", {"pw": "SELF"})


def test_dot_segments_cannot_step_out_of_a_granted_endpoint_prefix(room: Participants) -> None:
    grant = [
        {
            "endpoint": "https://idp.example/tenant-a/*",
            "client_id": "c",
            "token_endpoint": "https://idp.example/tenant-a/*",
        }
    ]
    md = room.auth("eve", request_oauth_token=grant)
    for token_endpoint in (
        "https://idp.example/tenant-a/../tenant-b/token",
        "https://idp.example/tenant-a/%2e%2e/tenant-b/token",
        "https://idp.example/tenant-a/..%2ftenant-b/token",
        "https://idp.example/tenant-a\\..\\tenant-b/token",
        "https://idp.example/tenant-a/..;/tenant-b/token",
        "https://idp.example/tenant-a/%252e%252e/tenant-b/token",
    ):
        oauth = pb.OAuthClientConfig(
            client_id="c",
            authorization_endpoint="https://idp.example/tenant-a/authorize",
            token_endpoint=token_endpoint,
        )
        request = pb.GetOfflineOAuthTokenRequest(oauth=oauth)
        with pytest.raises(grpc.RpcError) as refused:
            room.stub.GetOfflineOAuthToken(request, metadata=md)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, token_endpoint
        assert "oauth.token_endpoint" in (refused.value.details() or "")


def test_every_refusal_leaves_an_audit_line(
    room: Participants, project: Callable[..., ProjectSecretsClient]
) -> None:
    set_secret(room, "alice", secret_id="s", data=b"alice-value", delegated_to="bob")
    before = len(audit_lines(room.server))
    calls = {
        "get_secret": lambda: room.stub.GetSecret(
            pb.GetSecretRequest(secret_id="s", delegated_by="alice"), metadata=room.auth("mallory")
        ),
        "set_secret": lambda: room.stub.SetSecret(
            pb.SetSecretRequest(secret_id="s", data=b"x", for_identity="alice"), metadata=room.auth("mallory")
        ),
        "delete_secret": lambda: room.stub.DeleteSecret(
            pb.DeleteSecretRequest(secret_id="nope"), metadata=room.auth("mallory")
        ),
        "list_secrets": lambda: room.stub.ListSecrets(
            pb.ListSecretsRequest(), metadata=room.auth("mallory", secrets_grant=False)
        ),
        "exists": lambda: room.stub.Exists(
            pb.ExistsRequest(secret_id="s"), metadata=(("authorization", "x"),)
        ),
        "resolve_service": lambda: project("dev", project_role="developer").resolve_service("api"),
    }
    for call in calls.values():
        assert code_of(call) != grpc.StatusCode.OK
    refused = audit_lines(room.server)[before:]
    assert [line["action"] for line in refused] == list(calls)
    assert all(line["outcome"] != "ok" for line in refused)
    assert refused[0]["actor"] == "mallory" and refused[0]["secret_id"] == "s"
    assert refused[4]["actor"] == "" and refused[4]["outcome"] == "unauthenticated"
    assert b"alice-value" not in room.server.settings.audit_log_path.read_bytes()


def test_start_up_variables_of_libraries_and_runtimes_are_refused(
    project: Callable[..., ProjectSecretsClient],
) -> None:
    dev = project("dev", project_role="developer")
    names = "OPENSSL_CONF QT_PLUGIN_PATH GTK_MODULES ERL_AFLAGS MONO_ENV_OPTIONS BUN_OPTIONS GEM_PATH"
    names += " RUBYGEMS_GEMDEPS JULIA_LOAD_PATH R_LIBS VIMINIT WGETRC KRB5_CONFIG"
    names += (
        " GRPC_PROXY grpc_proxy GST_PLUGIN_SYSTEM_PATH XDG_CONFIG_DIRS TCL_LIBRARY GDK_PIXBUF_MODULE_FILE"
    )
    names += " PKCS11_MODULE_PATH VK_LAYER_PATH __EGL_VENDOR_LIBRARY_FILENAMES LIBGL_DRIVERS_PATH MAVEN_OPTS"
    names += " GRADLE_OPTS GOFLAGS FPATH BASH_LOADABLES_PATH PS0"
    for name in names.split():
        with pytest.raises(SecretsError) as refused:
            dev.apply_service(service("api", f"- {{name: {name}, value: /tmp/x}}"))
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT, name
