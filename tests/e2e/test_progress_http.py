"""The progress service's HTTP transports against real processes: SSE, WebSocket and long-poll
each deliver an execution's events exactly once and in order across a reconnect, refuse (and
audit) another tenant, authenticate by header or short-lived ticket, and never log a ticket."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import pytest
import websockets

from .conftest import Tenant, running_stack, token
from .plans import plan, probe_step
from .stack import Stack


@pytest.fixture(scope="module")
async def stack(e2e_dsn: str, e2e_pool: asyncpg.Pool, redis_url: str) -> AsyncIterator[Stack]:
    async with running_stack(
        e2e_dsn, redis_url, with_progress=True, progress_env={"OPSC_SSE_HEARTBEAT_S": "0.1"}
    ) as running:
        yield running


def base_url(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.http_port('progress')}"


def events_path(tenant_id: str, execution_id: str) -> str:
    return f"/v1/tenants/{tenant_id}/executions/{execution_id}/events"


def bearer(actor: str, tenant_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(actor, tenant_id)}"}


async def submit_background(tenant: Tenant, ledger: Path, steps: int = 4) -> str:
    async with tenant.client("alice") as client:
        submitted = await client.submit(
            plan(
                *(
                    probe_step(f"s{i}", ["web-1"], ledger, hold_s=0.2, estimate_ms=11_000)
                    for i in range(steps)
                ),
                sla="medium",
            ),
            tenant_id=tenant.id,
        )
    return submitted.execution_id


async def read_sse(
    http: httpx.AsyncClient, url: str, headers: dict[str, str], *, stop_after: str | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Events (with their SSE ids checked) and the other lines' kinds, until the stream ends or
    ``stop_after`` (an event type) arrives."""
    events: list[dict[str, Any]] = []
    kinds: list[str] = []
    async with http.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        block: dict[str, str] = {}
        async for line in response.aiter_lines():
            if line.startswith(":"):
                kinds.append("comment")
            elif line == "":
                if "data" in block:
                    kind = block.get("event", "message")
                    kinds.append(kind)
                    if kind == "message":
                        event = json.loads(block["data"])
                        assert block["id"] == str(event["seq"])
                        events.append(event)
                        if event["type"] == stop_after:
                            return events, kinds
                block = {}
            else:
                field, _, value = line.partition(":")
                block[field] = value.removeprefix(" ")
    return events, kinds


async def _receive_all(ws: Any, into: list[dict[str, Any]]) -> None:
    while True:
        into.append(json.loads(await ws.recv()))


async def expected_seqs(tenant: Tenant, execution_id: str) -> list[int]:
    rows = await tenant.pool.fetch(
        "SELECT seq, type FROM execution_events WHERE execution_id = $1 ORDER BY seq",
        UUID(execution_id),
    )
    end = next(r["seq"] for r in rows if r["type"] == "execution_completed")
    return list(range(1, end + 1))


async def test_sse_resumes_with_last_event_id_exactly_once_and_ends(
    tenant: Tenant, ledger: Path
) -> None:
    """SSE: ids are seqs; a reconnect with Last-Event-ID gets every later event once, in
    order; heartbeats are comments; the stream ends with `event: end`; after the end 204."""
    execution_id = await submit_background(tenant, ledger)
    url = events_path(tenant.id, execution_id) + "/sse"
    headers = bearer("vera", tenant.id)
    async with httpx.AsyncClient(base_url=base_url(tenant.stack), timeout=60) as http:
        first, _ = await read_sse(http, url, headers, stop_after="step_succeeded")
        rest, kinds = await read_sse(http, url, {**headers, "Last-Event-ID": str(first[-1]["seq"])})
        assert kinds[-1] == "end"
        assert "comment" in kinds  # heartbeats while a step holds the target
        seqs = [e["seq"] for e in first + rest]
        assert seqs == await expected_seqs(tenant, execution_id)
        assert rest[-1]["type"] == "execution_completed"
        assert rest[-1]["payload"]["status"] == "succeeded"
        after_end = await http.get(url, headers={**headers, "Last-Event-ID": str(seqs[-1])})
        assert after_end.status_code == 204


async def test_websocket_resumes_with_after_seq_exactly_once(tenant: Tenant, ledger: Path) -> None:
    """WebSocket with a stream ticket: events until hang-up, then a new connection with
    after_seq=last gets the rest once, in order, and is closed 1000 after the end."""
    execution_id = await submit_background(tenant, ledger)
    async with httpx.AsyncClient(base_url=base_url(tenant.stack), timeout=30) as http:
        reply = await http.post("/v1/tickets", headers=bearer("vera", tenant.id))
    assert reply.status_code == 200
    ticket = reply.json()["ticket"]
    url = (
        f"ws://127.0.0.1:{tenant.stack.http_port('progress')}"
        f"{events_path(tenant.id, execution_id)}/ws?ticket={ticket}"
    )
    seqs: list[int] = []
    async with websockets.connect(url) as ws:
        async for message in ws:
            body = json.loads(message)
            if "event" in body:
                seqs.append(body["event"]["seq"])
                if body["event"]["type"] == "step_succeeded":
                    break
    async with websockets.connect(f"{url}&after_seq={seqs[-1]}") as ws:
        async for message in ws:
            body = json.loads(message)
            if "event" in body:
                seqs.append(body["event"]["seq"])
        assert ws.close_code == 1000
    assert seqs == await expected_seqs(tenant, execution_id)
    assert ticket not in tenant.stack.logs()


async def test_long_poll_returns_as_soon_as_something_newer_exists(
    tenant: Tenant, ledger: Path
) -> None:
    """Long-poll from after_seq=0 to the end: every event once, in order; each poll waiting
    for the next event answers when it exists, long before wait_s; at the end completed."""
    execution_id = await submit_background(tenant, ledger)
    url = events_path(tenant.id, execution_id) + "/poll"
    headers = bearer("vera", tenant.id)
    seqs: list[int] = []
    after = 0
    async with httpx.AsyncClient(base_url=base_url(tenant.stack), timeout=60) as http:
        while True:
            started = time.monotonic()
            reply = await http.get(url, params={"after_seq": after, "wait_s": 20}, headers=headers)
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert time.monotonic() - started < 10
            seqs.extend(e["seq"] for e in body["events"])
            after = body["after_seq"]
            if body["completed"]:
                break
        assert seqs == await expected_seqs(tenant, execution_id)
        done = await http.get(url, params={"after_seq": after, "wait_s": 20}, headers=headers)
        assert done.json() == {"events": [], "after_seq": after, "completed": True}
        bad = await http.get(url, params={"wait_s": "soon"}, headers=headers)
        assert bad.status_code == 400
        assert bad.json()["error"]["field_violations"][0]["field"] == "wait_s"


async def test_another_tenant_is_refused_on_every_http_transport_and_audited(
    tenant: Tenant, ledger: Path, e2e_pool: asyncpg.Pool
) -> None:
    """A token of tenant B gets 403 on SSE and long-poll and close 4403 on WebSocket for A's
    execution; nothing of A's events is sent; each attempt is an rbac_violation under A."""
    execution_id = await submit_background(tenant, ledger, steps=1)
    other = f"other-{tenant.id[::-1]}"
    headers = bearer("mallory", other)
    async with httpx.AsyncClient(base_url=base_url(tenant.stack), timeout=30) as http:
        for route in ("sse", "poll"):
            reply = await http.get(
                events_path(tenant.id, execution_id) + f"/{route}", headers=headers
            )
            assert reply.status_code == 403
            assert reply.json()["error"]["reason"] == "PERMISSION_DENIED"
            assert tenant.id not in reply.text
        ticket = (await http.post("/v1/tickets", headers=headers)).json()["ticket"]
    url = (
        f"ws://127.0.0.1:{tenant.stack.http_port('progress')}"
        f"{events_path(tenant.id, execution_id)}/ws?ticket={ticket}"
    )
    messages: list[dict[str, Any]] = []
    async with websockets.connect(url) as ws:
        with pytest.raises(websockets.ConnectionClosedError):
            await _receive_all(ws, messages)
        assert ws.close_code == 4403
    assert [list(m) for m in messages] == [["error"]]
    rows = await e2e_pool.fetch(
        "SELECT payload FROM execution_events WHERE tenant_id = $1 AND type = 'rbac_violation' "
        "AND actor_id = 'mallory'",
        tenant.id,
    )
    assert sorted(r["payload"]["resource"] for r in rows) == ["http/poll", "http/sse", "http/ws"]


async def test_credentials_are_required_and_checked(tenant: Tenant, ledger: Path) -> None:
    """No credential, a malformed header, a forged or expired ticket: 401 with a message that
    says what to do; a ticket cannot be had without a bearer token."""
    execution_id = await submit_background(tenant, ledger, steps=1)
    url = events_path(tenant.id, execution_id) + "/poll"
    async with httpx.AsyncClient(base_url=base_url(tenant.stack), timeout=30) as http:
        missing = await http.get(url)
        assert missing.status_code == 401
        assert '"Authorization"' in missing.json()["error"]["message"]
        assert (await http.get(url, headers={"Authorization": "Basic eA=="})).status_code == 401
        forged = await http.get(url, params={"ticket": "e30.AAAA"})
        assert forged.status_code == 401
        assert "ticket" in forged.json()["error"]["message"]
        assert (await http.post("/v1/tickets")).status_code == 401
        ok = await http.get(url, params={"wait_s": 0}, headers=bearer("vera", tenant.id))
        assert ok.status_code == 200
        assert (await http.get("/healthz")).json() == {"status": "ok"}


async def test_ui_is_served(tenant: Tenant) -> None:
    """/ redirects to /ui/, which serves the page without Node.js at run time."""
    async with httpx.AsyncClient(base_url=base_url(tenant.stack), timeout=30) as http:
        root = await http.get("/")
        assert root.status_code in (302, 307)
        assert root.headers["location"] == "/ui/"
        page = await http.get("/ui/")
        assert page.status_code == 200
        assert "OpsConductor" in page.text


async def test_subscribing_to_an_unknown_execution_is_404(tenant: Tenant) -> None:
    async with httpx.AsyncClient(base_url=base_url(tenant.stack), timeout=30) as http:
        reply = await http.get(
            events_path(tenant.id, "00000000-0000-0000-0000-000000000001") + "/sse",
            headers=bearer("vera", tenant.id),
        )
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "NOT_FOUND"


async def test_many_sse_subscribers_each_get_every_event(tenant: Tenant, ledger: Path) -> None:
    """30 concurrent SSE subscribers of one execution each get 1..n exactly once."""
    execution_id = await submit_background(tenant, ledger, steps=3)
    url = events_path(tenant.id, execution_id) + "/sse"
    headers = bearer("vera", tenant.id)
    async with httpx.AsyncClient(
        base_url=base_url(tenant.stack), timeout=60, limits=httpx.Limits(max_connections=50)
    ) as http:
        results = await asyncio.gather(*(read_sse(http, url, headers) for _ in range(30)))
    expected = await expected_seqs(tenant, execution_id)
    assert all([e["seq"] for e in events] == expected for events, _ in results)
