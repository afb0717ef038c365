"""TLS and mTLS on the shared gRPC bootstrap, with the clients the services and users dial with.

Real ``grpc.aio`` servers on 127.0.0.1, certificates generated per test (``tests.tls_material``):
TLS on, a plaintext client refused; mTLS, a client without a certificate (or with one from another
CA) refused during the handshake; certificates rotated on disk picked up without a restart, by the
server and by a long-lived client; a plaintext health-only port for probes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from uuid import uuid4

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opsconductor.client import ClientTls
from opsconductor.client.tls import RotatingChannel, open_channel
from opsconductor.client.worker import WorkerClient
from opsconductor.execution.v1 import worker_service_pb2, worker_service_pb2_grpc
from opsconductor.rpc.server import RpcServer, build_server
from opsconductor.rpc.tls import ServerCertificates
from tests.tls_material import Authority

SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class TlsBootSettings:
    service_name: str = "tls-test"
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 0
    metrics_port: int | None = None
    shutdown_grace_s: float = 1.0
    otel_enabled: bool = False
    port_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_client_auth: str = "none"
    tls_reload_check_s: float = 0.0
    health_port: int | None = None


def peer_uses_tls(context: Any) -> bool:
    """Whether an RPC arrived over TLS (``transport_security_type`` of its auth context)."""
    return b"ssl" in ((context.auth_context() or {}).get("transport_security_type") or ())


class RecordingWorker(worker_service_pb2_grpc.WorkerServiceServicer):
    """Records how each RunImmediate arrived (over TLS or not, with which bearer)."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, str]] = []

    async def RunImmediate(
        self, request: worker_service_pb2.RunImmediateRequest, context: Any
    ) -> worker_service_pb2.RunImmediateResponse:
        bearer = dict(context.invocation_metadata() or ()).get("authorization", "")
        self.calls.append((peer_uses_tls(context), str(bearer)))
        return worker_service_pb2.RunImmediateResponse()


Started = Callable[..., Any]


@pytest.fixture
async def start_server() -> AsyncIterator[Callable[..., Any]]:
    """Build, start and mark SERVING a bootstrap server; all are stopped at the end."""
    servers: list[RpcServer] = []

    async def start(settings: TlsBootSettings, worker: RecordingWorker | None = None) -> RpcServer:
        def register(server: grpc.aio.Server) -> list[str]:
            if worker is None:
                return []
            worker_service_pb2_grpc.add_WorkerServiceServicer_to_server(worker, server)
            return ["opsconductor.execution.v1.WorkerService"]

        rpc = build_server(settings, register)
        await rpc.start()
        await rpc.mark_serving()
        servers.append(rpc)
        return rpc

    yield start
    for rpc in servers:
        await rpc.stop(None)


async def _health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=3.0
    )
    return int(reply.status)


def _tls_settings(folder: Path, **overrides: Any) -> TlsBootSettings:
    return TlsBootSettings(
        tls_cert_file=folder / "tls.crt",
        tls_key_file=folder / "tls.key",
        tls_ca_file=folder / "ca.crt",
        **overrides,
    )


async def test_tls_server_answers_a_verifying_client_and_refuses_plaintext(
    tmp_path: Path, start_server: Started
) -> None:
    ca = Authority.create()
    server_dir = ca.issue(tmp_path / "server")
    rpc = await start_server(_tls_settings(server_dir))
    async with open_channel(rpc.address, ClientTls(ca_file=server_dir / "ca.crt")) as channel:
        assert await _health(channel) == SERVING
    async with grpc.aio.insecure_channel(rpc.address) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _health(plain)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_refuses_a_server_its_ca_did_not_sign(
    tmp_path: Path, start_server: Started
) -> None:
    """Server authentication: an impostor with a certificate from another CA gets nothing."""
    impostor = Authority.create("impostor-ca").issue(tmp_path / "impostor")
    rpc = await start_server(_tls_settings(impostor))
    trusted = Authority.create().issue(tmp_path / "trusted")
    async with open_channel(rpc.address, ClientTls(ca_file=trusted / "ca.crt")) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _health(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_a_client_without_a_certificate(
    tmp_path: Path, start_server: Started
) -> None:
    ca = Authority.create()
    server_dir = ca.issue(tmp_path / "server")
    client_dir = ca.issue(tmp_path / "client", "api")
    rpc = await start_server(_tls_settings(server_dir, tls_client_auth="require"))
    anonymous = ClientTls(ca_file=server_dir / "ca.crt")
    async with open_channel(rpc.address, anonymous) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _health(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # A certificate from another CA is no better.
    foreign = Authority.create("foreign-ca").issue(tmp_path / "foreign", "api")
    stranger = ClientTls(
        ca_file=server_dir / "ca.crt",
        cert_file=foreign / "tls.crt",
        key_file=foreign / "tls.key",
    )
    async with open_channel(rpc.address, stranger) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await _health(channel)
    member = ClientTls(
        ca_file=client_dir / "ca.crt",
        cert_file=client_dir / "tls.crt",
        key_file=client_dir / "tls.key",
    )
    async with open_channel(rpc.address, member) as channel:
        assert await _health(channel) == SERVING


async def test_worker_client_forwards_the_token_only_inside_mtls(
    tmp_path: Path, start_server: Started
) -> None:
    """api → worker as the services wire it: ``ClientTls.from_settings`` of the api's settings."""
    ca = Authority.create()
    worker_dir = ca.issue(tmp_path / "worker", "worker")
    api_dir = ca.issue(tmp_path / "api", "api")
    recorder = RecordingWorker()
    rpc = await start_server(_tls_settings(worker_dir, tls_client_auth="require"), recorder)

    @dataclass(frozen=True)
    class ApiTls:
        tls_cert_file: Path = api_dir / "tls.crt"
        tls_key_file: Path = api_dir / "tls.key"
        tls_ca_file: Path = api_dir / "ca.crt"
        tls_server_name: str | None = None

    client = WorkerClient(rpc.address, tls=ClientTls.from_settings(ApiTls()))
    try:
        await client.run_immediate(
            tenant_id="t", execution_id=uuid4(), token="user-token", timeout_s=5
        )
    finally:
        await client.close()
    assert recorder.calls == [(True, "Bearer user-token")]


async def test_server_name_override_for_a_certificate_not_naming_the_address(
    tmp_path: Path, start_server: Started
) -> None:
    ca = Authority.create()
    server_dir = ca.issue(tmp_path / "server", "worker.opsc.internal")
    rpc = await start_server(_tls_settings(server_dir))
    address = f"localhost:{rpc.port}"  # not a name the certificate carries
    async with open_channel(address, ClientTls(ca_file=server_dir / "ca.crt")) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await _health(channel)
    named = ClientTls(ca_file=server_dir / "ca.crt", server_name="worker.opsc.internal")
    async with open_channel(address, named) as channel:
        assert await _health(channel) == SERVING


async def test_server_picks_up_rotated_certificates_without_a_restart(
    tmp_path: Path, start_server: Started
) -> None:
    """cert-manager renews into the mounted files: new connections get the new certificate."""
    old_ca, new_ca = Authority.create("old-ca"), Authority.create("new-ca")
    server_dir = old_ca.issue(tmp_path / "server")
    new_trust = new_ca.issue(tmp_path / "new-trust")
    rpc = await start_server(_tls_settings(server_dir))
    async with open_channel(rpc.address, ClientTls(ca_file=new_trust / "ca.crt")) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await _health(channel)
    new_ca.issue(server_dir)  # rotated in place
    async with open_channel(rpc.address, ClientTls(ca_file=new_trust / "ca.crt")) as channel:
        assert await _health(channel) == SERVING


async def test_a_half_rotated_pair_keeps_the_working_certificate(
    tmp_path: Path, start_server: Started
) -> None:
    """A new tls.crt whose key has not arrived yet must not break new handshakes."""
    ca = Authority.create()
    server_dir = ca.issue(tmp_path / "server")
    rpc = await start_server(_tls_settings(server_dir))
    other = ca.issue(tmp_path / "other")
    (server_dir / "tls.crt").write_bytes((other / "tls.crt").read_bytes())  # key not rotated
    async with open_channel(rpc.address, ClientTls(ca_file=server_dir / "ca.crt")) as channel:
        assert await _health(channel) == SERVING


async def test_a_long_lived_client_presents_its_rotated_certificate(
    tmp_path: Path, start_server: Started
) -> None:
    """mTLS with a server trusting only the new CA: the rotated client certificate gets through."""
    old_ca, new_ca = Authority.create("old-ca"), Authority.create("new-ca")
    server_dir = new_ca.issue(tmp_path / "server")
    rpc = await start_server(_tls_settings(server_dir, tls_client_auth="require"))
    client_dir = old_ca.issue(tmp_path / "client", "api")
    (client_dir / "ca.crt").write_bytes(new_ca.pem)  # trusts the server; its own cert is old
    tls = ClientTls(
        ca_file=client_dir / "ca.crt",
        cert_file=client_dir / "tls.crt",
        key_file=client_dir / "tls.key",
    )
    channel = RotatingChannel(rpc.address, tls, check_interval_s=0)
    try:
        with pytest.raises(grpc.aio.AioRpcError):
            await _health(channel.current())
        new_ca.issue(client_dir, "api")
        assert await _health(channel.current()) == SERVING
        assert channel.rotations == 1
    finally:
        await channel.close()


async def test_plaintext_health_port_beside_an_mtls_port(
    tmp_path: Path, start_server: Started
) -> None:
    """kubelet gRPC probes speak plaintext only: health (and nothing else) on its own port."""
    ca = Authority.create()
    server_dir = ca.issue(tmp_path / "server")
    rpc = await start_server(
        _tls_settings(server_dir, tls_client_auth="require", health_port=0), RecordingWorker()
    )
    assert rpc.health_port is not None
    health_address = f"127.0.0.1:{rpc.health_port}"
    async with grpc.aio.insecure_channel(health_address) as plain:
        assert await _health(plain) == SERVING
        stub = worker_service_pb2_grpc.WorkerServiceStub(plain)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RunImmediate(worker_service_pb2.RunImmediateRequest(), timeout=3)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    await rpc.stop(None)
    async with grpc.aio.insecure_channel(health_address) as plain:
        with pytest.raises(grpc.aio.AioRpcError):
            await _health(plain)


async def test_request_mode_and_incomplete_tls_settings_are_refused(tmp_path: Path) -> None:
    ca = Authority.create()
    server_dir = ca.issue(tmp_path / "server")
    with pytest.raises(ValueError, match="none or require"):
        build_server(_tls_settings(server_dir, tls_client_auth="request"), lambda s: [])
    no_ca = replace(_tls_settings(server_dir, tls_client_auth="require"), tls_ca_file=None)
    with pytest.raises(ValueError, match="tls_ca_file"):
        build_server(no_ca, lambda s: [])


# --- the fetcher itself (gRPC calls it from C-core threads, which coverage cannot see) --------


def test_the_fetcher_rereads_only_changed_files_and_only_a_matching_pair(tmp_path: Path) -> None:
    ca = Authority.create()
    folder = ca.issue(tmp_path / "server")
    certificates = ServerCertificates(
        folder / "tls.crt", folder / "tls.key", folder / "ca.crt", check_interval_s=0
    )
    assert certificates.fetch() is None  # nothing changed
    ca.issue(folder)
    assert certificates.fetch() is not None
    assert certificates.reloads == 1
    assert certificates.fetch() is None
    other = ca.issue(tmp_path / "other")
    (folder / "tls.crt").write_bytes((other / "tls.crt").read_bytes())
    assert certificates.fetch() is None  # key does not match: keep the working pair
    (folder / "tls.key").write_bytes(b"not a key")
    assert certificates.fetch() is None
    (folder / "tls.key").unlink()
    assert certificates.fetch() is None
    assert certificates.reloads == 1
    ca.issue(folder)
    assert certificates.fetch() is not None
    assert certificates.reloads == 2


def test_the_fetcher_checks_the_files_at_most_once_per_interval(tmp_path: Path) -> None:
    ca = Authority.create()
    folder = ca.issue(tmp_path / "server")
    certificates = ServerCertificates(
        folder / "tls.crt", folder / "tls.key", None, check_interval_s=3600
    )
    ca.issue(folder)
    assert certificates.fetch() is None  # within the interval: not even a stat
    assert certificates.reloads == 0


def test_a_server_does_not_start_without_its_pair(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ServerCertificates(tmp_path / "tls.crt", tmp_path / "tls.key", None, check_interval_s=0)
