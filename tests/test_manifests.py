"""Service manifests: parsing, validation errors (field and line), and template variable rendering."""

from __future__ import annotations

from pathlib import Path

import pytest
from roomsecrets_server.errors import InvalidArgument
from roomsecrets_server.project.manifests import (
    MAX_MANIFEST,
    EnvVar,
    Manifest,
    SecretRef,
    TokenSpec,
    Variable,
    obscure_references,
    parse_manifest,
    render_environment,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "services"

SERVICE = """\
version: v1
kind: Service
metadata: {name: api}
container:
  image: img:1
"""
SERVICE_ENV = SERVICE + "  environment:\n"  # entries start on line 7

TEMPLATE = """\
version: v1
kind: ServiceTemplate
metadata: {name: chat}
variables:
  - {name: api_key, obscure: true}
  - {name: model, enum: [small, large], optional: true}
container:
  image: img:1
  environment:
"""  # entries start on line 10


def fails(text: str, field: str, line: int | None, fragment: str) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        parse_manifest(text)
    err = info.value
    assert err.field == field, err.message
    if line is not None:
        assert f"line {line}: " in err.message, err.message
    assert fragment in err.message, err.message
    return err


# -- valid manifests ---------------------------------------------------------------------------------


def test_service_parses() -> None:
    text = """\
version: v1
kind: Service
metadata:
  name: api
  description: |
    The API server.
    Two lines.
container:
  image: registry.example/api:1.2
  command: serve --port 8080
  secrets: [openai, db]
  pull_secret: regcred
  environment:
    - {name: LOG_LEVEL, value: debug}
    - {name: ROOM_TOKEN, token: {identity: api-bot, api: [secrets, admin], role: tool}}
    - {name: BOT_TOKEN, token: {identity: bot}}
    - {name: GITHUB_TOKEN, secret: {identity: alice, id: gh}}
    - {name: _EMPTY, value: ""}
"""
    assert parse_manifest(text) == Manifest(
        kind="Service",
        name="api",
        description="The API server.\nTwo lines.\n",
        image="registry.example/api:1.2",
        command="serve --port 8080",
        secrets=("openai", "db"),
        pull_secret="regcred",
        environment=(
            EnvVar("LOG_LEVEL", value="debug"),
            EnvVar("ROOM_TOKEN", token=TokenSpec("api-bot", ("secrets", "admin"), "tool")),
            EnvVar("BOT_TOKEN", token=TokenSpec("bot", (), "agent")),
            EnvVar("GITHUB_TOKEN", secret=SecretRef("alice", "gh")),
            EnvVar("_EMPTY", value=""),
        ),
        variables=(),
        source=text,
    )


def test_minimal_service_defaults() -> None:
    m = parse_manifest(SERVICE)
    assert (m.description, m.command, m.secrets, m.pull_secret, m.environment) == ("", "", (), "", ())


def test_template_parses() -> None:
    m = parse_manifest(
        TEMPLATE
        + '    - {name: API_KEY, value: "{{ api_key }}"}\n'
        + '    - {name: GREETING, value: "model {{model}} / {{ model }}"}\n'
        + "    - {name: TOKEN, token: {identity: chat-bot}}\n"
    )
    assert m.kind == "ServiceTemplate"
    assert m.variables == (
        Variable("api_key", obscure=True),
        Variable("model", enum=("small", "large"), optional=True),
    )
    assert m.environment[0] == EnvVar("API_KEY", value="{{ api_key }}")
    assert obscure_references(m) == {"API_KEY": "api_key"}


def test_variable_fields() -> None:
    text = TEMPLATE.replace(
        "  - {name: api_key, obscure: true}\n",
        '  - {name: api_key, title: "API key", description: "The key.", obscure: yes, optional: false}\n',
    ).replace("  environment:\n", "")
    assert parse_manifest(text).variables[0] == Variable("api_key", "API key", "The key.", obscure=True)


@pytest.mark.parametrize("name", ["api.yaml", "chat-template.yaml"])
def test_examples_parse(name: str) -> None:
    m = parse_manifest((EXAMPLES / name).read_text())
    assert m.name == name.removesuffix(".yaml").removesuffix("-template")


def test_example_contents() -> None:
    api = parse_manifest((EXAMPLES / "api.yaml").read_text())
    assert (api.kind, api.pull_secret, "openai" in api.secrets) == ("Service", "regcred", True)
    assert {e.name for e in api.environment if e.value is not None} == {"LOG_LEVEL"}
    assert any(e.token for e in api.environment) and any(e.secret for e in api.environment)
    chat = parse_manifest((EXAMPLES / "chat-template.yaml").read_text())
    assert chat.kind == "ServiceTemplate"
    variables = {v.name: v for v in chat.variables}
    assert variables["api_key"].obscure and variables["model"].enum
    assert list(obscure_references(chat).values()) == ["api_key"]


# -- document-level errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("- a\n- b\n", 1, "must be a mapping"),
        ("", 1, "is empty"),
        ("# only a comment\n", 1, "is empty"),
        (SERVICE + "---\n" + SERVICE, 6, "single YAML document"),
        ("version: v1\nkind: [Service\n", 3, "invalid YAML"),
        ("version: v1\n  kind: x\n", 2, "invalid YAML"),
        ("version: v1\nkind: \x07\n", 2, "invalid YAML"),
        ("version: v1\nmetadata: &m {name: api}\n", 2, "anchors and aliases are not allowed"),
    ],
)
def test_document_errors(text: str, line: int, fragment: str) -> None:
    fails(text, "manifest", line, fragment)


def test_aliases_refused() -> None:
    laughs = 'a: &a ["lol", "lol"]\nb: [*a, *a, *a]\nc: [*b, *b, *b]\n'
    fails(laughs, "manifest", 1, "anchors and aliases")
    fails(SERVICE.replace("metadata: {name: api}", "metadata: *m"), "manifest", 3, "anchors and aliases")


def test_too_large() -> None:
    text = SERVICE + "# " + "x" * MAX_MANIFEST + "\n"
    err = fails(text, "manifest", None, "the limit is 262144 bytes")
    assert "line" not in err.message


def test_nothing_is_constructed() -> None:
    text = SERVICE.replace("img:1", '!!python/object/apply:os.system ["echo pwned"]')
    fails(text, "container.image", 5, "must be a string")


# -- field errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field", "line", "fragment"),
    [
        (SERVICE.replace("v1", "v2"), "version", 1, "unsupported version"),
        (SERVICE.replace("kind: Service", "kind: Job"), "kind", 2, "unknown kind"),
        ("version: v1\nkind: Service\nmetadata: {name: api}\n", "container", 1, "is required"),
        (SERVICE + "extra: 1\n", "extra", 6, "unknown key"),
        (SERVICE + "kind: Service\n", "kind", 6, "duplicate key"),
        (SERVICE + "  image: img:2\n", "container.image", 6, "duplicate key"),
        (SERVICE + "  Image: img:2\n", "container.Image", 6, "unknown key"),
        (SERVICE.replace("{name: api}", "{name: API}"), "metadata.name", 3, "DNS label"),
        (SERVICE.replace("{name: api}", "{name: " + "a" * 64 + "}"), "metadata.name", 3, "DNS label"),
        (SERVICE.replace("{name: api}", "{description: x}"), "metadata.name", 3, "is required"),
        (SERVICE.replace("{name: api}", "[api]"), "metadata", 3, "must be a mapping"),
        (SERVICE.replace("img:1", "123"), "container.image", 5, "quote it"),
        (SERVICE.replace("img:1", '""'), "container.image", 5, "is required"),
        (SERVICE.replace("img:1", "'img 1'"), "container.image", 5, "must not contain spaces"),
        (SERVICE + "  command: [a, b]\n", "container.command", 6, "must be a string"),
        (SERVICE + "  secrets: [openai, 'has space']\n", "container.secrets[1]", 6, "may contain only"),
        (SERVICE + "  secrets:\n    - a\n    - a\n", "container.secrets[1]", 8, "duplicate entry"),
        (SERVICE + "  secrets: openai\n", "container.secrets", 6, "must be a list"),
        (SERVICE + "  pull_secret: [regcred]\n", "container.pull_secret", 6, "must be a string"),
        (SERVICE + "variables: []\n", "variables", 6, "a Service takes no variables"),
        (SERVICE + "  environment: {A: b}\n", "container.environment", 6, "must be a list"),
    ],
)
def test_field_errors(text: str, field: str, line: int, fragment: str) -> None:
    fails(text, field, line, fragment)


ENV = "container.environment"


@pytest.mark.parametrize(
    ("entries", "field", "line", "fragment"),
    [
        ("- {name: 1X, value: a}", f"{ENV}[0].name", 7, "must be an env-var name"),
        ("- {name: A-B, value: a}", f"{ENV}[0].name", 7, "must be an env-var name"),
        ("- {name: A, value: a}\n- {name: B, value: b}\n- {name: A, value: c}", f"{ENV}[2].name", 9, "dup"),
        ("- {value: a}", f"{ENV}[0].name", 7, "is required"),
        ("- {name: A}", f"{ENV}[0]", 7, "exactly one of value, token, secret"),
        ("- {name: A, value: a, secret: {identity: x, id: y}}", f"{ENV}[0]", 7, "exactly one of"),
        ("- {name: A, value: 123}", f"{ENV}[0].value", 7, "quote it"),
        ("- {name: A, value: true}", f"{ENV}[0].value", 7, "quote it"),
        ("- {name: A, value: null}", f"{ENV}[0].value", 7, "quote it"),
        ('- {name: A, value: "a\\0b"}', f"{ENV}[0].value", 7, "NUL"),
        ("- {name: A, valeu: a}", f"{ENV}[0].valeu", 7, "unknown key"),
        ("- {name: A, token: {api: [secrets]}}", f"{ENV}[0].token.identity", 7, "is required"),
        ("- {name: A, token: {identity: ' bob'}}", f"{ENV}[0].token.identity", 7, "surrounding spaces"),
        ("- {name: A, token: {identity: bob, api: [root]}}", f"{ENV}[0].token.api[0]", 7, "must be one of"),
        ("- {name: A, token: {identity: bob, role: god}}", f"{ENV}[0].token.role", 7, "must be one of"),
        ("- {name: A, token: bob}", f"{ENV}[0].token", 7, "must be a mapping"),
        ("- {name: A, secret: {identity: alice}}", f"{ENV}[0].secret.id", 7, "is required"),
        ("- {name: A, secret: {identity: alice, id: 'a b'}}", f"{ENV}[0].secret.id", 7, "may contain only"),
        ("- {name: A, secret: {identity: '', id: gh}}", f"{ENV}[0].secret.identity", 7, "is required"),
        ("- name: A\n  secret:\n    identity: alice\n    id: 7", f"{ENV}[0].secret.id", 10, "quote it"),
    ],
)
def test_environment_errors(entries: str, field: str, line: int, fragment: str) -> None:
    text = SERVICE_ENV + "".join(f"    {row}\n" for row in entries.splitlines())
    fails(text, field, line, fragment)


def test_null_is_not_an_empty_list() -> None:
    fails(SERVICE_ENV, ENV, 6, "must be a list")


def test_service_values_are_literal() -> None:
    m = parse_manifest(SERVICE_ENV + '    - {name: A, value: "{{ not_a_variable }}"}\n')
    assert m.environment[0].value == "{{ not_a_variable }}"


# -- templates ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["secrets: [openai]", "pull_secret: regcred"])
def test_template_forbids_project_secrets(key: str) -> None:
    text = TEMPLATE.replace("  image: img:1\n", f"  image: img:1\n  {key}\n")
    fails(text, f"container.{key.split(':', maxsplit=1)[0]}", 9, "is for a Service only")


@pytest.mark.parametrize(
    ("variables", "field", "line", "fragment"),
    [
        ("- {name: Model}", "variables[0].name", 5, "lowercase identifier"),
        ("- {name: 1x}", "variables[0].name", 5, "lowercase identifier"),
        ("- {name: a}\n- {name: a}", "variables[1].name", 6, "duplicate variable name"),
        ("- {title: x}", "variables[0].name", 5, "is required"),
        ("- {name: a, obscure: maybe}", "variables[0].obscure", 5, "must be true or false"),
        ("- {name: a, optional: 'true'}", "variables[0].optional", 5, "must be true or false"),
        ("- {name: a, enum: []}", "variables[0].enum", 5, "must not be empty"),
        ("- {name: a, enum: [1, 2]}", "variables[0].enum[0]", 5, "quote it"),
        ("- {name: a, enum: [x, x]}", "variables[0].enum[1]", 5, "duplicate entry"),
        ("- {name: a, default: x}", "variables[0].default", 5, "unknown key"),
        ("- name: a\n  title: [x]", "variables[0].title", 6, "must be a string"),
    ],
)
def test_variable_errors(variables: str, field: str, line: int, fragment: str) -> None:
    head = TEMPLATE.split("variables:\n", maxsplit=1)[0] + "variables:\n"
    text = head + "".join(f"  {row}\n" for row in variables.splitlines()) + "container: {image: img:1}\n"
    fails(text, field, line, fragment)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ('"{{ modle }}"', "{{ modle }} does not name a declared variable"),
        ('"{{ Model }}"', "does not name a declared variable"),
        ('"{{}}"', "does not name a declared variable"),
        ('"sk-{{ api_key }}"', "obscure variable api_key may only be a whole value"),
        ('"{{ api_key }}{{ api_key }}"', "obscure variable api_key"),
    ],
)
def test_template_reference_errors(value: str, fragment: str) -> None:
    text = TEMPLATE + "    - {name: A, value: ok}\n" + f"    - {{name: B, value: {value}}}\n"
    fails(text, f"{ENV}[1].value", 11, fragment)


# -- rendering ---------------------------------------------------------------------------------------

CHAT = parse_manifest(
    TEMPLATE
    + '    - {name: API_KEY, value: "{{api_key}}"}\n'
    + '    - {name: MODEL, value: "{{ model }}"}\n'
    + '    - {name: GREETING, value: "{{ model }}: {{model}}!"}\n'
    + "    - {name: TOKEN, token: {identity: chat-bot}}\n"
)


def render_error(manifest: Manifest, variables: dict[str, str]) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        render_environment(manifest, variables)
    return info.value


def test_render_substitutes_and_leaves_obscure() -> None:
    env = render_environment(CHAT, {"api_key": "sk-123", "model": "large"})
    assert env == (
        EnvVar("API_KEY", value="{{api_key}}"),
        EnvVar("MODEL", value="large"),
        EnvVar("GREETING", value="large: large!"),
        EnvVar("TOKEN", token=TokenSpec("chat-bot")),
    )
    assert obscure_references(CHAT) == {"API_KEY": "api_key"}


def test_render_optional_defaults_to_empty() -> None:
    env = render_environment(CHAT, {"api_key": "sk-123"})
    assert [e.value for e in env[1:3]] == ["", ": !"]


def test_render_substitution_is_not_recursive() -> None:
    assert render_environment(CHAT, {"api_key": "k", "model": ""})[1].value == ""
    free = TEMPLATE.replace("enum: [small, large], ", "")
    m = parse_manifest(free + '    - {name: M, value: "{{ model }}"}\n')
    assert render_environment(m, {"api_key": "k", "model": "{{ api_key }}"})[0].value == "{{ api_key }}"


def test_render_errors() -> None:
    err = render_error(CHAT, {"model": "small"})
    assert (err.field, "is required" in err.message) == ("variables.api_key", True)
    err = render_error(CHAT, {"api_key": "k", "model": "huge"})
    assert err.field == "variables.model"
    assert "must be one of: small, large" in err.message
    assert "huge" not in err.message
    err = render_error(CHAT, {"api_key": "k", "colour": "red", "size": "xl"})
    assert err.field == "variables"
    assert "colour, size" in err.message
    err = render_error(CHAT, {"api_key": "sk\x00"})
    assert err.field == "variables.api_key"
    assert "sk" not in err.message.removeprefix("variables.api_key: ")


def test_render_service() -> None:
    service = parse_manifest(SERVICE_ENV + "    - {name: A, value: a}\n")
    assert render_environment(service, {}) == service.environment
    assert obscure_references(service) == {}
    err = render_error(service, {"x": "y"})
    assert (err.field, err.message) == ("variables", "variables: a Service takes no variables")
