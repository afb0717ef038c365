"""The exec health probe of the TLS deployment against real gRPC servers, plaintext and mTLS."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from opsconductor.rpc import health_probe


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _make_pki(folder: Path, label: str, dns_names: list[str]) -> Pki:
    """A CA and one certificate it signed (server and client auth), as PEM files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{label} CA"))
        .issuer_name(_name(f"{label} CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_names[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(folder / f"{label}-ca.crt", folder / f"{label}.crt", folder / f"{label}.key")
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _make_pki(tmp_path_factory.mktemp("pki"), "cluster", ["api"])


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _make_pki(tmp_path_factory.mktemp("rogue"), "rogue", ["api"])


class Server:
    def __init__(self, pki: Pki | None) -> None:
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if pki is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            credentials = grpc.ssl_server_credentials(
                [(pki.key.read_bytes(), pki.cert.read_bytes())],
                root_certificates=pki.ca.read_bytes(),
                require_client_auth=True,
            )
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    def set(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        self.health.set("", status)


@pytest.fixture
def plain() -> Iterator[Server]:
    server = Server(None)
    yield server
    server.server.stop(None)


@pytest.fixture
def mtls(pki: Pki) -> Iterator[Server]:
    server = Server(pki)
    yield server
    server.server.stop(None)


def _env(monkeypatch: pytest.MonkeyPatch, port: int, pki: Pki | None = None) -> None:
    for name in ("OPSC_TLS_CERT_FILE", "OPSC_TLS_KEY_FILE", "OPSC_TLS_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPSC_GRPC_PORT", str(port))
    monkeypatch.setenv("OPSC_TLS_SERVER_NAME", "api")
    if pki is not None:
        monkeypatch.setenv("OPSC_TLS_CERT_FILE", str(pki.cert))
        monkeypatch.setenv("OPSC_TLS_KEY_FILE", str(pki.key))
        monkeypatch.setenv("OPSC_TLS_CA_FILE", str(pki.ca))


def test_plaintext_serving_server_passes(
    plain: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _env(monkeypatch, plain.port)
    assert health_probe.main([]) == 0
    assert capsys.readouterr().err == ""


def test_not_serving_fails_with_the_status(
    plain: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plain.set(health_pb2.HealthCheckResponse.NOT_SERVING)
    _env(monkeypatch, plain.port)
    assert health_probe.main([]) == 1
    assert capsys.readouterr().err == "health_probe: not healthy: NOT_SERVING\n"


def test_nothing_listening_fails_in_one_line(
    plain: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = plain.port
    plain.server.stop(None)
    _env(monkeypatch, port)
    assert health_probe.main(["--timeout", "1"]) == 1
    assert capsys.readouterr().err == "health_probe: not healthy: UNAVAILABLE\n"


def test_mtls_server_is_checked_with_the_pods_own_certificate(
    mtls: Server, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    _env(monkeypatch, mtls.port, pki)
    assert health_probe.main([]) == 0
    mtls.set(health_pb2.HealthCheckResponse.NOT_SERVING)
    assert health_probe.main([]) == 1


def test_mtls_server_refuses_a_probe_without_a_client_certificate(
    mtls: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _env(monkeypatch, mtls.port)
    assert health_probe.main(["--timeout", "1"]) == 1
    assert "not healthy: UNAVAILABLE" in capsys.readouterr().err


def test_the_server_is_checked_under_the_service_name(
    mtls: Server, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the name (or with another one) 127.0.0.1 matches nothing in the certificate."""
    _env(monkeypatch, mtls.port, pki)
    monkeypatch.setenv("OPSC_TLS_SERVER_NAME", "worker")
    assert health_probe.main(["--timeout", "1"]) == 1
    monkeypatch.delenv("OPSC_TLS_SERVER_NAME")
    assert health_probe.main(["--timeout", "1"]) == 1


def test_a_server_of_another_ca_is_not_trusted(
    mtls: Server, pki: Pki, rogue: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe verifies the server: a certificate from another CA fails the check."""
    _env(monkeypatch, mtls.port, Pki(ca=rogue.ca, cert=pki.cert, key=pki.key))
    assert health_probe.main(["--timeout", "1"]) == 1


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "health_probe: OPSC_GRPC_PORT is unset or not a port\n"),
        ({"OPSC_GRPC_PORT": "http"}, "health_probe: OPSC_GRPC_PORT is unset or not a port\n"),
        (
            {"OPSC_GRPC_PORT": "50051", "OPSC_TLS_CERT_FILE": "/x.crt"},
            "health_probe: OPSC_TLS_CERT_FILE needs OPSC_TLS_KEY_FILE and OPSC_TLS_CA_FILE\n",
        ),
        (
            {
                "OPSC_GRPC_PORT": "50051",
                "OPSC_TLS_CERT_FILE": "/nonexistent/tls.crt",
                "OPSC_TLS_KEY_FILE": "/nonexistent/tls.key",
                "OPSC_TLS_CA_FILE": "/nonexistent/ca.crt",
            },
            "health_probe: cannot read /nonexistent/ca.crt: No such file or directory\n",
        ),
    ],
)
def test_bad_settings_fail_in_one_line(
    env: dict[str, str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("OPSC_GRPC_PORT", "OPSC_TLS_CERT_FILE", "OPSC_TLS_KEY_FILE", "OPSC_TLS_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert health_probe.main([]) == 1
    assert capsys.readouterr().err == message
