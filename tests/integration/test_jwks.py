"""RS256 tokens verified against an identity provider's JWKS served on 127.0.0.1 by the test.

Keys are generated here; the JWKS server counts its requests, can hang, and can rotate its keys,
so each property is observed on the wire: a new ``kid`` accepted after one refresh, random
``kid`` values costing at most one fetch per cooldown, a retired key refused after the periodic
refresh, a hanging IdP bounded by the timeout, and every refusal an UNAUTHENTICATED status
with a reason through a real gRPC server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from uuid import uuid4

import grpc
import grpc.aio
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from opsconductor.common.auth import TokenVerifier
from opsconductor.common.errors import AuthenticationError
from opsconductor.common.jwks import JwksKeys
from opsconductor.common.settings import ServiceSettings
from opsconductor.execution.v1 import worker_service_pb2, worker_service_pb2_grpc
from opsconductor.rpc.auth import authenticate
from opsconductor.rpc.server import RpcServer, build_server

AUDIENCE = "opsconductor-execution"
ISSUER = "https://idp.test"


@dataclass
class Idp:
    """An identity provider: signing keys by kid, and a JWKS endpoint publishing some of them."""

    keys: dict[str, rsa.RSAPrivateKey] = field(default_factory=dict)
    published: list[str] = field(default_factory=list)
    requests: int = 0
    hang_s: float = 0.0
    url: str = ""

    def new_key(self, kid: str, *, publish: bool = True) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if publish:
            self.published.append(kid)

    def document(self) -> bytes:
        entries = []
        for kid in self.published:
            entry = json.loads(RSAAlgorithm.to_jwk(self.keys[kid].public_key()))
            entries.append({**entry, "kid": kid, "use": "sig", "alg": "RS256"})
        return json.dumps({"keys": entries}).encode()

    def token(self, kid: str | None, **claims: Any) -> str:
        now = int(datetime.now(UTC).timestamp())
        body = {"sub": "alice", "tenant_id": "acme", "aud": AUDIENCE, "iss": ISSUER}
        body.update({"iat": now, "exp": now + 300, **claims})
        body = {k: v for k, v in body.items() if v is not None}
        headers = {"kid": kid} if kid is not None else None
        key = self.keys[kid] if kid is not None else next(iter(self.keys.values()))
        return jwt.encode(body, key, algorithm="RS256", headers=headers)


@pytest.fixture
def idp() -> Iterator[Idp]:
    provider = Idp()
    provider.new_key("k1")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            provider.requests += 1
            if provider.hang_s:
                time.sleep(provider.hang_s)
            body = provider.document()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError):  # the client gave up (timeout test)
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    provider.url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    try:
        yield provider
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
async def verifier(idp: Idp) -> AsyncIterator[TokenVerifier]:
    jwks = JwksKeys(idp.url, refresh_s=300, min_refresh_s=60, timeout_s=2)
    verifier = TokenVerifier(audience=AUDIENCE, issuer=ISSUER, jwks=jwks)
    await verifier.start()
    try:
        yield verifier
    finally:
        await verifier.close()


async def _refusal(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(AuthenticationError) as info:
        await verifier.verify_async(token)
    return str(info.value)


async def test_a_token_signed_by_a_published_key_is_accepted(
    idp: Idp, verifier: TokenVerifier
) -> None:
    principal = await verifier.verify_async(idp.token("k1"))
    assert (principal.actor_id, principal.tenant_id) == ("alice", "acme")
    assert idp.requests == 1  # fetched once at start, then cached
    await verifier.verify_async(idp.token("k1"))
    assert idp.requests == 1


async def test_rotation_a_new_kid_is_accepted_after_one_refresh(
    idp: Idp, verifier: TokenVerifier
) -> None:
    idp.new_key("k2")  # the IdP rotates and signs with the new key at once
    assert (await verifier.verify_async(idp.token("k2"))).actor_id == "alice"
    assert idp.requests == 2
    assert (await verifier.verify_async(idp.token("k1"))).actor_id == "alice"


async def test_random_kids_cost_at_most_one_fetch_per_cooldown(
    idp: Idp, verifier: TokenVerifier
) -> None:
    """An attacker's unknown kids are refused; they cannot make us hammer the IdP."""
    idp.new_key("rogue", publish=False)
    forged = [idp.token("rogue") for _ in range(3)]
    forged += [
        jwt.encode(
            {"sub": "x"},
            idp.keys["rogue"],
            algorithm="RS256",
            headers={"kid": secrets.token_hex(8)},
        )
        for _ in range(50)
    ]
    reasons = await asyncio.gather(*(_refusal(verifier, token) for token in forged))
    assert all("unknown signing key" in reason for reason in reasons)
    assert idp.requests == 2  # the start-up fetch and one refresh for all 53 tokens


async def test_concurrent_unknown_kids_share_one_fetch(idp: Idp) -> None:
    jwks = JwksKeys(idp.url, min_refresh_s=0, timeout_s=2)
    verifier = TokenVerifier(audience=AUDIENCE, issuer=ISSUER, jwks=jwks)
    idp.new_key("k2")
    tokens = [idp.token("k2") for _ in range(20)]
    principals = await asyncio.gather(*(verifier.verify_async(t) for t in tokens))
    assert {p.actor_id for p in principals} == {"alice"}
    assert idp.requests == 1
    await verifier.close()


async def test_a_retired_key_is_refused_after_the_periodic_refresh(idp: Idp) -> None:
    jwks = JwksKeys(idp.url, refresh_s=0.05, min_refresh_s=60, timeout_s=2)
    verifier = TokenVerifier(audience=AUDIENCE, issuer=ISSUER, jwks=jwks)
    await verifier.start()
    try:
        old = idp.token("k1")
        assert (await verifier.verify_async(old)).actor_id == "alice"
        idp.new_key("k2")
        idp.published.remove("k1")
        deadline = time.monotonic() + 5
        while jwks.kids != {"k2"}:
            assert time.monotonic() < deadline, "the periodic refresh never came"
            await asyncio.sleep(0.02)
        assert "unknown signing key" in await _refusal(verifier, old)
    finally:
        await verifier.close()


async def test_a_hanging_idp_is_bounded_by_the_timeout_and_known_keys_stay(idp: Idp) -> None:
    jwks = JwksKeys(idp.url, min_refresh_s=0, timeout_s=0.3)
    verifier = TokenVerifier(audience=AUDIENCE, issuer=ISSUER, jwks=jwks)
    await verifier.start()
    idp.hang_s = 3.0
    started = time.monotonic()
    reason = await _refusal(verifier, _unknown(idp))
    assert time.monotonic() - started < 1.5
    assert "unknown signing key" in reason
    assert (await verifier.verify_async(idp.token("k1"))).actor_id == "alice"
    idp.hang_s = 0.0
    await verifier.close()


def _unknown(idp: Idp) -> str:
    idp.new_key(f"k-{secrets.token_hex(3)}", publish=False)
    return idp.token(list(idp.keys)[-1])


async def test_a_token_without_kid_is_refused_when_only_a_jwks_is_configured(
    idp: Idp, verifier: TokenVerifier
) -> None:
    assert "no kid" in await _refusal(verifier, idp.token(None))


async def test_settings_build_a_jwks_verifier(idp: Idp) -> None:
    settings = ServiceSettings(
        service_name="t",
        database_url="postgresql://x@h/db",
        jwt_jwks_url=idp.url,
        jwt_issuer=ISSUER,
        allow_insecure_dev=True,  # plain http to the test's IdP
    )
    verifier = TokenVerifier.from_settings(settings)
    assert verifier.algorithms == ("RS256",)
    await verifier.start()
    try:
        assert (await verifier.verify_async(idp.token("k1"))).actor_id == "alice"
    finally:
        await verifier.close()


# --- through a real gRPC server: UNAUTHENTICATED with a reason ------------------------------


class AuthenticatingWorker(worker_service_pb2_grpc.WorkerServiceServicer):
    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    async def RunImmediate(
        self, request: worker_service_pb2.RunImmediateRequest, context: Any
    ) -> worker_service_pb2.RunImmediateResponse:
        await authenticate(context, self._verifier)
        return worker_service_pb2.RunImmediateResponse()


@dataclass(frozen=True)
class _Boot:
    service_name: str = "jwks-test"
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 0
    metrics_port: int | None = None
    shutdown_grace_s: float = 1.0
    otel_enabled: bool = False
    port_file: None = None


@pytest.fixture
async def rpc(verifier: TokenVerifier) -> AsyncIterator[RpcServer]:
    def register(server: grpc.aio.Server) -> list[str]:
        worker_service_pb2_grpc.add_WorkerServiceServicer_to_server(
            AuthenticatingWorker(verifier), server
        )
        return ["opsconductor.execution.v1.WorkerService"]

    server = build_server(_Boot(), register)
    await server.start()
    await server.mark_serving()
    try:
        yield server
    finally:
        await server.stop(None)


async def test_refusals_over_grpc_are_unauthenticated_with_a_reason(
    idp: Idp, rpc: RpcServer
) -> None:
    now = int(datetime.now(UTC).timestamp())
    idp.new_key("rogue", publish=False)
    cases = {
        "token expired": idp.token("k1", iat=now - 600, exp=now - 300),
        "lifetime exceeds 12 h": idp.token("k1", exp=now + 10 * 365 * 86400),
        "must be a number": idp.token("k1", exp=str(now + 300)),
        "missing claim iss": idp.token("k1", iss=None),
        "unknown signing key": idp.token("rogue"),
    }
    async with grpc.aio.insecure_channel(rpc.address) as channel:
        stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
        request = worker_service_pb2.RunImmediateRequest(
            tenant_id="acme", execution_id=str(uuid4())
        )
        assert (
            await stub.RunImmediate(
                request, metadata=(("authorization", f"Bearer {idp.token('k1')}"),), timeout=5
            )
            is not None
        )
        for reason, token in cases.items():
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.RunImmediate(
                    request, metadata=(("authorization", f"Bearer {token}"),), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, reason
            assert reason in (info.value.details() or ""), (reason, info.value.details())
