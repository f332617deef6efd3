"""TLS and mutual TLS by configuration; plaintext only on loopback unless explicitly allowed."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from roomsecrets.v1 import room_secrets_pb2 as pb
from roomsecrets.v1 import room_secrets_pb2_grpc
from roomsecrets_server.auth.dev_key import mint_token
from roomsecrets_server.config import Settings

from .harness import ServerThread, test_settings


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


class Pki:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = _cert("test-ca", ca_key, "test-ca", ca_key, ca=True).public_bytes(
            serialization.Encoding.PEM
        )
        self.files: dict[str, Path] = {"ca": directory / "ca.pem"}
        self.files["ca"].write_bytes(self.ca)
        self.pem: dict[str, tuple[bytes, bytes]] = {}
        for who in ("server", "client"):
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _cert(who, key, "test-ca", ca_key, ca=False).public_bytes(serialization.Encoding.PEM)
            key_pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            self.pem[who] = (cert, key_pem)
            (directory / f"{who}.pem").write_bytes(cert)
            (directory / f"{who}-key.pem").write_bytes(key_pem)
            (directory / f"{who}-key.pem").chmod(0o600)  # the server refuses a key others may read
            self.files[who] = directory / f"{who}.pem"
            self.files[f"{who}-key"] = directory / f"{who}-key.pem"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


def _start(settings: Settings) -> Iterator[ServerThread]:
    running = ServerThread(settings).start()
    yield running
    running.stop()


def _set_and_get(channel: grpc.Channel, data_dir: Path) -> bytes:
    stub = room_secrets_pb2_grpc.RoomSecretsStub(channel)
    md = (("authorization", f"Bearer {mint_token(data_dir, identity='alice', room='r')}"),)
    stub.SetSecret(pb.SetSecretRequest(secret_id="tls", data=b"over-tls"), metadata=md, timeout=5)
    return bytes(stub.GetSecret(pb.GetSecretRequest(secret_id="tls"), metadata=md, timeout=5).data)


def test_tls(pki: Pki, data_dir: Path) -> None:
    settings = test_settings(data_dir, tls_cert=pki.files["server"], tls_key=pki.files["server-key"])
    for running in _start(settings):
        with grpc.secure_channel(running.address, grpc.ssl_channel_credentials(pki.ca)) as channel:
            assert _set_and_get(channel, data_dir) == b"over-tls"
        with grpc.insecure_channel(running.address) as plaintext, pytest.raises(grpc.RpcError) as caught:
            _set_and_get(plaintext, data_dir)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate(pki: Pki, data_dir: Path) -> None:
    settings = test_settings(
        data_dir, tls_cert=pki.files["server"], tls_key=pki.files["server-key"], tls_client_ca=pki.files["ca"]
    )
    for running in _start(settings):
        cert, key = pki.pem["client"]
        with_cert = grpc.ssl_channel_credentials(pki.ca, private_key=key, certificate_chain=cert)
        with grpc.secure_channel(running.address, with_cert) as channel:
            assert _set_and_get(channel, data_dir) == b"over-tls"
        with grpc.secure_channel(running.address, grpc.ssl_channel_credentials(pki.ca)) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                _set_and_get(channel, data_dir)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_is_refused_off_loopback_unless_allowed(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="plaintext on non-loopback"):
        Settings(data_dir=data_dir, listen="0.0.0.0:0").check()
    Settings(data_dir=data_dir, listen="0.0.0.0:0", allow_insecure_remote=True).check()
    Settings(data_dir=data_dir, listen="[::1]:0").check()
    Settings(data_dir=data_dir, listen="localhost:0").check()
