"""Production transport end to end: RS256 tokens with an issuer, TLS to the api, mTLS to the worker.

The worker and the api run as real processes configured as the production overlay configures
them (``OPSC_TLS_*`` from cert-manager-style files, an identity provider's RS256 key). The
attacks of issue 8 finding 11: a user token forwarded api → worker in clear, anyone reaching the
worker's port, and a worker that would start without TLS in production.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opsconductor.client import ApprovalClient, AuthenticationError, ClientTls, ExecutionClient
from opsconductor.client.tls import open_channel
from opsconductor.common.auth import issue_token
from opsconductor.execution.v1 import worker_service_pb2, worker_service_pb2_grpc
from opsconductor.lifecycle.storage.flags import update_flags
from opsconductor.lifecycle.storage.role_bindings import bind_role
from tests.tls_material import Authority

from .conftest import dead_redis_url
from .plans import create_simple_query_plan, plan, probe_step
from .stack import AUDIENCE, Stack, service_env, start_service

ISSUER = "https://idp.e2e.test"


class Pki:
    """Certificates of one stack: a CA, the worker's, the api's and a user's view of the CA."""

    def __init__(self, root: Path) -> None:
        self.ca = Authority.create()
        self.worker = self.ca.issue(root / "worker", "worker")
        self.api = self.ca.issue(root / "api", "api")
        self.idp_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.idp_public = root / "idp.pub"
        self.idp_public.write_bytes(
            self.idp_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def env(self, folder: Path, client_auth: str) -> dict[str, str]:
        return {
            "OPSC_TLS_CERT_FILE": str(folder / "tls.crt"),
            "OPSC_TLS_KEY_FILE": str(folder / "tls.key"),
            "OPSC_TLS_CA_FILE": str(folder / "ca.crt"),
            "OPSC_TLS_CLIENT_AUTH": client_auth,
            "OPSC_TLS_SERVER_NAME": "worker",
            "OPSC_JWT_RS256_PUBLIC_KEY_FILE": str(self.idp_public),
            "OPSC_JWT_ISSUER": ISSUER,
        }

    def token(self, actor: str, tenant: str) -> str:
        return issue_token(
            actor_id=actor,
            tenant_id=tenant,
            audience=AUDIENCE,
            issuer=ISSUER,
            rs256_private_key=self.idp_key,
        )

    @property
    def user_tls(self) -> ClientTls:
        """What a user of the api has: the CA, no client certificate; the api's name."""
        return ClientTls(ca_file=self.api / "ca.crt", server_name="api")


@pytest.fixture(scope="module")
async def secured(e2e_dsn: str, e2e_pool: asyncpg.Pool) -> AsyncIterator[tuple[Stack, Pki, str]]:
    log_dir = Path(tempfile.mkdtemp(prefix="opsc-e2e-tls-"))
    pki = Pki(log_dir)
    running = Stack(dsn=e2e_dsn, log_dir=log_dir)
    worker_tls = ClientTls(
        ca_file=pki.api / "ca.crt",
        cert_file=pki.api / "tls.crt",
        key_file=pki.api / "tls.key",
        server_name="worker",
    )
    common = {"OPSC_REDIS_URL": dead_redis_url()}
    tenant = f"t-{secrets.token_hex(4)}"
    await bind_role(e2e_pool, tenant, "alice", "operator", created_by="e2e")
    await bind_role(e2e_pool, tenant, "bob", "approver", created_by="e2e")
    await update_flags(e2e_pool, {"max_approval_level": 1}, by="e2e")
    try:
        worker = await start_service(
            "worker", running, {**common, **pki.env(pki.worker, "require")}, tls=worker_tls
        )
        api_env = {
            **common,
            **pki.env(pki.api, "none"),
            "OPSC_WORKER_TARGET": worker.address,
        }
        await start_service("api", running, api_env, tls=pki.user_tls)
        await start_service("approvals", running, api_env, tls=pki.user_tls)
        yield running, pki, tenant
    finally:
        await running.stop()


async def test_an_immediate_run_crosses_tls_and_mtls_with_an_idp_token(
    secured: tuple[Stack, Pki, str], tmp_path: Path
) -> None:
    """User → api over TLS; api → worker over mTLS carrying the user's token; the worker
    re-authorizes it against Postgres and runs the plan."""
    running, pki, tenant = secured
    client = ExecutionClient(running.address("api"), pki.token("alice", tenant), tls=pki.user_tls)
    async with client:
        result = await client.submit(create_simple_query_plan(tmp_path / "l"), tenant_id=tenant)
    assert result.execution_mode == "immediate"
    assert result.status == "succeeded", (result.error_class, result.error_message)


async def test_an_approved_run_is_dispatched_by_the_approvals_service_over_mtls(
    secured: tuple[Stack, Pki, str], tmp_path: Path
) -> None:
    """approvals → worker: the approver's token crosses mTLS and the worker accepts it."""
    running, pki, tenant = secured
    restart = plan(probe_step("restart", ["svc-1"], tmp_path / "l", action_class="modify"))
    async with ExecutionClient(
        running.address("api"), pki.token("alice", tenant), tls=pki.user_tls
    ) as client:
        submitted = await client.submit(restart, tenant_id=tenant)
        assert submitted.status == "awaiting_approval"
        async with ApprovalClient(
            running.address("approvals"), pki.token("bob", tenant), tls=pki.user_tls
        ) as approvals:
            assert submitted.approval_id is not None
            await approvals.approve(submitted.approval_id, tenant_id=tenant)
        deadline = time.monotonic() + 15
        while (
            current := await client.get(submitted.execution_id, tenant_id=tenant)
        ).status not in (
            "succeeded",
            "failed",
        ):
            assert time.monotonic() < deadline, current.status
            await asyncio.sleep(0.05)
    assert current.status == "succeeded", (current.error_class, current.error_message)


async def test_the_worker_refuses_callers_without_an_internal_certificate(
    secured: tuple[Stack, Pki, str],
) -> None:
    """A valid user token is not enough to reach the worker: no certificate, no handshake."""
    running, pki, tenant = secured
    request = worker_service_pb2.RunImmediateRequest(
        tenant_id=tenant, execution_id="00000000-0000-0000-0000-000000000001"
    )
    metadata = (("authorization", f"Bearer {pki.token('alice', tenant)}"),)
    no_cert = ClientTls(ca_file=pki.worker / "ca.crt", server_name="worker")
    for tls in (no_cert, None):
        async with open_channel(running.address("worker"), tls) as channel:
            stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.RunImmediate(request, metadata=metadata, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # The health service is behind the same handshake: an internal certificate passes.
    member = ClientTls(
        ca_file=pki.api / "ca.crt",
        cert_file=pki.api / "tls.crt",
        key_file=pki.api / "tls.key",
        server_name="worker",
    )
    async with open_channel(running.address("worker"), member) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_hardened_jwt_refusals_over_tls_say_why(secured: tuple[Stack, Pki, str]) -> None:
    """A string ``exp``, an overlong token and a token without the issuer: UNAUTHENTICATED."""
    running, pki, tenant = secured
    now = int(datetime.now(UTC).timestamp())
    base = {"sub": "alice", "tenant_id": tenant, "aud": AUDIENCE, "iss": ISSUER, "iat": now}
    cases = {
        "must be a number": {**base, "exp": str(now + 300)},
        "lifetime exceeds 12 h": {**base, "exp": now + 10 * 365 * 86400},
        "missing claim iss": {k: v for k, v in {**base, "exp": now + 300}.items() if k != "iss"},
    }
    for reason, claims in cases.items():
        forged = jwt.encode(claims, pki.idp_key, algorithm="RS256")
        async with ExecutionClient(running.address("api"), forged, tls=pki.user_tls) as client:
            with pytest.raises(AuthenticationError) as info:
                await client.get("00000000-0000-0000-0000-000000000001", tenant_id=tenant)
        assert reason in str(info.value), (reason, str(info.value))


def test_a_production_worker_without_tls_refuses_to_start(e2e_dsn: str, tmp_path: Path) -> None:
    """RS256 keys without TLS would carry forwarded user tokens in clear: exit 2, say why."""
    pki = Pki(tmp_path)
    env = service_env(
        e2e_dsn,
        {"OPSC_JWT_RS256_PUBLIC_KEY_FILE": str(pki.idp_public), "OPSC_JWT_ISSUER": ISSUER},
    )
    done = subprocess.run(
        [sys.executable, "-m", "opsconductor.worker"],
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert b"needs TLS" in done.stderr
