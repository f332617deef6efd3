"""Service manifests: parse and validate the YAML that describes a project Service or ServiceTemplate.

Pure: no I/O. The text is composed to YAML nodes with SafeLoader resolution (nothing is constructed),
so duplicate keys, anchors/aliases and unquoted non-string scalars are refused with their line. Every
problem raises InvalidArgument(field, "line N: ...") where field is the dotted path, such as
`container.environment[2].name`.

In a ServiceTemplate, literal environment values may contain `{{ var }}` references to declared
variables (so a literal `{{` cannot appear there). An `obscure` variable may only be a whole value,
`"{{ var }}"`: the server stores what the caller supplies as a room secret instead of substituting it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import NoReturn

import yaml

from .. import validate
from ..errors import InvalidArgument
from . import launch

MAX_MANIFEST = 256 * 1024
VERSION = "v1"
KINDS = ("Service", "ServiceTemplate")
APIS = ("secrets", "admin")
ROLES = ("user", "agent", "tool")

_STR = "tag:yaml.org,2002:str"
_BOOL = "tag:yaml.org,2002:bool"
_UNQUOTED = {f"tag:yaml.org,2002:{t}" for t in ("int", "float", "bool", "null", "timestamp")}
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VAR_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_REF = re.compile(r"\{\{([^{}]*)\}\}")
_CONTROL_BUT_TAB_NL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class TokenSpec:
    identity: str
    api: tuple[str, ...] = ()
    role: str = "agent"


@dataclass(frozen=True, slots=True)
class SecretRef:
    identity: str
    id: str


@dataclass(frozen=True, slots=True)
class EnvVar:
    """One environment variable: exactly one of value (literal), token (minted) or secret (room secret)."""

    name: str
    value: str | None = None
    token: TokenSpec | None = None
    secret: SecretRef | None = None


@dataclass(frozen=True, slots=True)
class Variable:
    name: str
    title: str = ""
    description: str = ""
    obscure: bool = False
    enum: tuple[str, ...] = ()
    optional: bool = False


@dataclass(frozen=True, slots=True)
class Manifest:
    kind: str  # "Service" | "ServiceTemplate"
    name: str
    description: str
    image: str
    command: str
    secrets: tuple[str, ...]  # project Secret Key ids (Service only)
    pull_secret: str  # project Image Pull Secret id, "" for none (Service only)
    environment: tuple[EnvVar, ...]
    variables: tuple[Variable, ...]  # ServiceTemplate only
    source: str  # the YAML text as given
    # Names launch.denied() refuses that this manifest may set anyway (project admins only).
    allow_environment: tuple[str, ...] = ()


# -- public API ------------------------------------------------------------------------------------


def parse_manifest(text: str) -> Manifest:
    validate.data(text.encode(), MAX_MANIFEST, "manifest")
    top = ("version", "kind", "metadata", "container")
    root_node = _compose(text)
    _check_unicode(root_node)
    root = _mapping(root_node, "", (*top, "variables"), required=top)
    if _str(root["version"], "version") != VERSION:
        _fail("version", root["version"], f"unsupported version; expected {VERSION}")
    kind = _str(root["kind"], "kind")
    if kind not in KINDS:
        _fail("kind", root["kind"], f"unknown kind; expected one of: {', '.join(KINDS)}")
    template = kind == "ServiceTemplate"
    if not template and "variables" in root:
        _fail("variables", _key(root_node, "variables"), "a Service takes no variables")

    meta = _mapping(root["metadata"], "metadata", ("name", "description"), required=("name",))
    name = _str(meta["name"], "metadata.name")
    if not _DNS_LABEL.fullmatch(name):
        _fail("metadata.name", meta["name"], "must be a DNS label: a-z, 0-9 and -, at most 63 characters")
    description = _string(meta.get("description"), "metadata.description", multiline=True)

    variables = tuple(_variables(root.get("variables")))
    keys = ("image", "command", "secrets", "pull_secret", "environment", "allow_environment")
    container = _mapping(root["container"], "container", keys, required=("image",))
    allowed = _strings(container.get("allow_environment"), "container.allow_environment", _allowable)
    if template:
        for key in ("secrets", "pull_secret"):
            if key in container:
                _fail(
                    f"container.{key}",
                    _key(root["container"], key),
                    "is for a Service only",
                )
    image = _string(container["image"], "container.image", validate.MAX_URL, required=True)
    if any(ch.isspace() for ch in image):
        _fail("container.image", container["image"], "must not contain spaces")
    return Manifest(
        kind=kind,
        name=name,
        description=description,
        image=image,
        command=_string(container.get("command"), "container.command", multiline=True),
        secrets=_strings(container.get("secrets"), "container.secrets", validate.secret_id),
        pull_secret=_checked(container.get("pull_secret"), "container.pull_secret", validate.secret_id),
        environment=_environment(container.get("environment"), variables if template else None, allowed),
        variables=variables,
        source=text,
        allow_environment=allowed,
    )


def obscure_references(manifest: Manifest) -> dict[str, str]:
    """Env-var name -> obscure variable name, for values that are exactly `{{ var }}` of one."""
    obscure = {v.name for v in manifest.variables if v.obscure}
    out: dict[str, str] = {}
    for env in manifest.environment:
        match = _REF.fullmatch(env.value or "")
        if match and match.group(1).strip() in obscure:
            out[env.name] = match.group(1).strip()
    return out


def render_environment(manifest: Manifest, variables: Mapping[str, str]) -> tuple[EnvVar, ...]:
    """The environment with `{{ var }}` substituted. Obscure references are left for the caller."""
    if manifest.kind != "ServiceTemplate":
        if variables:
            raise InvalidArgument("variables", "a Service takes no variables")
        return manifest.environment
    declared = {v.name for v in manifest.variables}
    unknown = sorted(set(variables) - declared)
    if unknown:
        raise InvalidArgument("variables", f"unknown variable(s): {', '.join(unknown)}")
    values: dict[str, str] = {}
    for var in manifest.variables:
        value, field = variables.get(var.name, ""), f"variables.{var.name}"
        if not value and not var.optional:
            raise InvalidArgument(field, "is required")
        if value and var.enum and value not in var.enum:
            raise InvalidArgument(field, f"must be one of: {', '.join(var.enum)}")
        if "\x00" in value:
            raise InvalidArgument(field, "must not contain NUL characters")
        values[var.name] = value
    obscure = obscure_references(manifest)
    return tuple(
        env
        if env.value is None or env.name in obscure
        else replace(env, value=_REF.sub(lambda m: values[m.group(1).strip()], env.value))
        for env in manifest.environment
    )


# -- sections ----------------------------------------------------------------------------------------


def _variables(node: yaml.Node | None) -> Iterator[Variable]:
    seen: set[str] = set()
    keys = ("name", "title", "description", "obscure", "enum", "optional")
    for i, item in enumerate(_seq(node, "variables")):
        field = f"variables[{i}]"
        m = _mapping(item, field, keys, required=("name",))
        name = _str(m["name"], f"{field}.name")
        if not _VAR_NAME.fullmatch(name):
            _fail(f"{field}.name", m["name"], "must be a lowercase identifier: a-z, 0-9 and _")
        if name in seen:
            _fail(f"{field}.name", m["name"], f"duplicate variable name {name}")
        seen.add(name)
        enum = _strings(m.get("enum"), f"{field}.enum", lambda v, f: validate.text(v, f, validate.MAX_NAME))
        if "enum" in m and not enum:
            _fail(f"{field}.enum", m["enum"], "must not be empty")
        yield Variable(
            name=name,
            title=_string(m.get("title"), f"{field}.title"),
            description=_string(m.get("description"), f"{field}.description", multiline=True),
            obscure=_bool(m.get("obscure"), f"{field}.obscure"),
            enum=enum,
            optional=_bool(m.get("optional"), f"{field}.optional"),
        )


def _environment(
    node: yaml.Node | None, variables: tuple[Variable, ...] | None, allowed: tuple[str, ...]
) -> tuple[EnvVar, ...]:
    """Parse `container.environment`; `variables` is None for a Service (values are plain literals).
    Names a loader, interpreter or shell reads at start-up are refused unless `allowed`."""
    out: dict[str, EnvVar] = {}
    for i, item in enumerate(_seq(node, "container.environment")):
        field = f"container.environment[{i}]"
        m = _mapping(item, field, ("name", "value", "token", "secret"), required=("name",))
        name = _str(m["name"], f"{field}.name")
        if not _ENV_NAME.fullmatch(name):
            _fail(f"{field}.name", m["name"], "must be an env-var name: [A-Za-z_][A-Za-z0-9_]*")
        if name in out:
            _fail(f"{field}.name", m["name"], f"duplicate env-var name {name}")
        controls = launch.denied(name)
        if controls and name not in allowed:
            _fail(f"{field}.name", m["name"], launch.refusal(name, controls))
        if sum(key in m for key in ("value", "token", "secret")) != 1:
            _fail(field, item, "must have exactly one of value, token, secret")
        if "value" in m:
            value = _str(m["value"], f"{field}.value")
            if "\x00" in value:
                _fail(f"{field}.value", m["value"], "must not contain NUL characters")
            if variables is not None:
                _check_references(value, m["value"], f"{field}.value", variables)
            out[name] = EnvVar(name, value=value)
        elif "token" in m:
            t = _mapping(m["token"], f"{field}.token", ("identity", "api", "role"), required=("identity",))
            token = TokenSpec(
                identity=_checked(t["identity"], f"{field}.token.identity", _identity),
                api=_strings(t.get("api"), f"{field}.token.api", _choice(APIS)),
                role=_checked(t.get("role"), f"{field}.token.role", _choice(ROLES), "agent"),
            )
            out[name] = EnvVar(name, token=token)
        else:
            s = _mapping(m["secret"], f"{field}.secret", ("identity", "id"), required=("identity", "id"))
            ref = SecretRef(
                identity=_checked(s["identity"], f"{field}.secret.identity", _identity),
                id=_checked(s["id"], f"{field}.secret.id", validate.secret_id),
            )
            out[name] = EnvVar(name, secret=ref)
    return tuple(out.values())


def _check_references(value: str, node: yaml.Node, field: str, variables: tuple[Variable, ...]) -> None:
    declared = {v.name: v for v in variables}
    for match in _REF.finditer(value):
        ref = match.group(1).strip()
        var = declared.get(ref)
        if var is None:
            _fail(field, node, f"{{{{ {ref} }}}} does not name a declared variable")
        if var.obscure and not _REF.fullmatch(value):
            _fail(field, node, f'obscure variable {ref} may only be a whole value, "{{{{ {ref} }}}}"')


# -- YAML nodes --------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader's composer, refusing anchors and aliases (no billion laughs, no shared nodes)."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None):  # type: ignore[no-untyped-call]
            _fail("manifest", _peek_line(self), "YAML anchors and aliases are not allowed")
        return super().compose_node(parent, index)


def _compose(text: str) -> yaml.Node:
    try:
        loader = _Loader(text)  # the reader checks for unprintable characters here
        try:
            node = loader.get_node() if loader.check_node() else None
            if node is None:
                raise InvalidArgument("manifest", "line 1: is empty; expected a Service or ServiceTemplate")
            if loader.check_node():
                _fail("manifest", _peek_line(loader), "must be a single YAML document")
            return node
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        where = f"line {e.problem_mark.line + 1}: " if e.problem_mark else ""
        raise InvalidArgument("manifest", f"{where}invalid YAML: {e.problem or e.context}") from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        raise InvalidArgument("manifest", f"line {line}: invalid YAML: {e.reason}") from None
    except RecursionError:
        raise InvalidArgument("manifest", "is nested too deeply") from None


def _check_unicode(root: yaml.Node) -> None:
    """YAML's \\u escapes spell UTF-16 surrogates (json.dumps writes any non-BMP character so):
    a pair becomes its character; a lone one, which no reply could carry, is refused."""
    nodes = [root]
    while nodes:
        node = nodes.pop()
        if isinstance(node, yaml.ScalarNode):
            if _SURROGATE.search(node.value):
                try:
                    node.value = node.value.encode("utf-16", "surrogatepass").decode("utf-16")
                except UnicodeDecodeError:
                    _fail("manifest", node, "a \\u escape spells a lone UTF-16 surrogate")
        elif isinstance(node, yaml.SequenceNode):
            nodes.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            nodes.extend(n for pair in node.value for n in pair)


def _peek_line(loader: yaml.SafeLoader) -> int:
    """The 1-based line of the next parser event."""
    return int(loader.peek_event().start_mark.line) + 1  # type: ignore[no-untyped-call]


def _key(mapping: yaml.Node, name: str) -> yaml.Node:
    """The key node `name` of a mapping already read with _mapping (for errors about the key itself)."""
    key: yaml.Node = next(k for k, _ in mapping.value if k.value == name)
    return key


def _fail(field: str, where: yaml.Node | int, message: str) -> NoReturn:
    """Raise for `field` (the document itself when ""), at a node or a 1-based line."""
    line = where.start_mark.line + 1 if isinstance(where, yaml.Node) else where
    raise InvalidArgument(field or "manifest", f"line {line}: {message}")


@contextmanager
def _at(node: yaml.Node) -> Iterator[None]:
    """Re-raise a validate.* error with the node's line."""
    try:
        yield
    except InvalidArgument as e:
        _fail(e.field, node, e.message.removeprefix(f"{e.field}: "))


def _mapping(
    node: yaml.Node, field: str, keys: tuple[str, ...], required: tuple[str, ...] = ()
) -> dict[str, yaml.Node]:
    if not isinstance(node, yaml.MappingNode):
        _fail(field, node, "must be a mapping")
    out: dict[str, yaml.Node] = {}
    for key, value in node.value:
        name = key.value if isinstance(key, yaml.ScalarNode) and key.tag == _STR else ""
        path = f"{field}.{name}" if field and name else name or field
        if name not in keys:
            _fail(path, key, f"unknown key; expected one of: {', '.join(keys)}")
        if name in out:
            _fail(path, key, "duplicate key")
        out[name] = value
    for name in required:
        if name not in out:
            _fail(f"{field}.{name}" if field else name, node, "is required")
    return out


def _seq(node: yaml.Node | None, field: str) -> list[yaml.Node]:
    if node is None:
        return []
    if not isinstance(node, yaml.SequenceNode):
        _fail(field, node, "must be a list")
    return list(node.value)


def _str(node: yaml.Node, field: str) -> str:
    if isinstance(node, yaml.ScalarNode) and node.tag == _STR:
        return str(node.value)
    if isinstance(node, yaml.ScalarNode) and node.tag in _UNQUOTED:
        _fail(field, node, 'must be a string; quote it ("...")')
    _fail(field, node, "must be a string")


def _bool(node: yaml.Node | None, field: str) -> bool:
    if node is None:
        return False
    if not (isinstance(node, yaml.ScalarNode) and node.tag == _BOOL):
        _fail(field, node, "must be true or false")
    return str(node.value).lower() in ("true", "yes", "on")


def _string(
    node: yaml.Node | None,
    field: str,
    limit: int = validate.MAX_NAME,
    *,
    required: bool = False,
    multiline: bool = False,
) -> str:
    """An optional text field ("" when absent); multiline allows tab and newline."""
    if node is None:
        return ""
    value = _str(node, field)
    if not multiline:
        with _at(node):
            return validate.text(value, field, limit, required=required)
    if len(value) > limit:
        _fail(field, node, f"must be at most {limit} characters (got {len(value)})")
    if _CONTROL_BUT_TAB_NL.search(value):
        _fail(field, node, "must not contain control characters other than tab and newline")
    return value


def _checked(node: yaml.Node | None, field: str, check: Callable[[str, str], str], default: str = "") -> str:
    if node is None:
        return default
    value = _str(node, field)
    with _at(node):
        return check(value, field)


def _strings(node: yaml.Node | None, field: str, check: Callable[[str, str], str]) -> tuple[str, ...]:
    out: list[str] = []
    for i, item in enumerate(_seq(node, field)):
        value = _checked(item, f"{field}[{i}]", check)
        if value in out:
            _fail(f"{field}[{i}]", item, f"duplicate entry {value}")
        out.append(value)
    return tuple(out)


def _allowable(value: str, field: str) -> str:
    if not _ENV_NAME.fullmatch(value):
        raise InvalidArgument(field, "must be an env-var name: [A-Za-z_][A-Za-z0-9_]*")
    if not launch.denied(value):
        raise InvalidArgument(field, f"{value} needs no allowing (only names the server refuses do)")
    return value


def _identity(value: str, field: str) -> str:
    return validate.identity(value, field, required=True)


def _choice(options: tuple[str, ...]) -> Callable[[str, str], str]:
    def check(value: str, field: str) -> str:
        if value not in options:
            raise InvalidArgument(field, f"must be one of: {', '.join(options)}")
        return value

    return check
