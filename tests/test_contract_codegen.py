"""The contract generates cleanly for the languages whose toolchains are not on this machine:
C# message classes with protoc's own C# generator (.NET itself is not installed, so the
client library is not compiled here), checked against the names the hand-written .NET wrapper
uses."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted((ROOT / "proto" / "roomsecrets" / "v1").glob("*.proto"))
WRAPPER = ROOT / "clients" / "dotnet" / "RoomSecrets.Client" / "SecretsClient.cs"


@pytest.fixture(scope="module")
def csharp(tmp_path_factory: pytest.TempPathFactory) -> str:
    protoc = shutil.which("protoc")
    if protoc is None:
        pytest.skip("protoc (Debian protobuf-compiler) is not installed; .ci/run installs it")
    out = tmp_path_factory.mktemp("csharp")
    subprocess.run(
        [protoc, f"-I{ROOT / 'proto'}", f"--csharp_out={out}", *map(str, PROTOS)],
        check=True,
        capture_output=True,
    )
    files = sorted(out.glob("*.cs"))
    assert [f.name for f in files] == ["OauthConnectors.cs", "ProjectSecrets.cs", "RoomSecrets.cs"]
    return "\n".join(f.read_text() for f in files)


def test_csharp_namespace_and_messages(csharp: str) -> None:
    assert set(re.findall(r"^namespace (\S+) \{", csharp, re.M)) == {"RoomSecrets.V1"}
    for message in ("SecretInfo", "GetSecretRequest", "WatchRequestsResponse", "ResolveServiceResponse"):
        assert f"public sealed partial class {message} : pb::IMessage<{message}>" in csharp


def test_dotnet_wrapper_uses_only_generated_names(csharp: str) -> None:
    source = WRAPPER.read_text()
    types = set(re.findall(r"\bPb\.(\w+)", source)) - {
        "RoomSecrets"
    }  # the service class needs grpc_csharp_plugin
    assert types, "the wrapper references no generated types"
    for name in sorted(types):
        assert re.search(rf"\b(class|enum) {name}\b", csharp), f"Pb.{name} is not generated"
    # Properties set in `new Pb.X { A = ..., B = ... }` initializers exist on that message.
    for message, body in re.findall(r"new Pb\.(\w+)\s*\{([^{}]*)\}", source):
        for prop in re.findall(r"(\w+)\s*=(?!=)", body):
            assert re.search(rf"public \S+ {prop} \{{", csharp), f"{message}.{prop} is not generated"
