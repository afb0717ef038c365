"""A seeded fuzz of every RPC of every service, against real running processes (issue 8).

Over 500 generated requests — edge and random field values, oversized and non-UTF-8 strings,
truncated and garbage bytes, NaN/±Infinity/huge/deep Structs, foreign tenants, real and made-up
ids, bad request ids, missing and foreign tokens — go to ExecutionService, AdminService,
WorkerService, ApprovalService and ProgressService. For every answer:

* the code is never INTERNAL, UNKNOWN or UNAVAILABLE (nor, for a unary call, DEADLINE_EXCEEDED:
  a hang); Redis is real here, so even background submits have no excuse;
* neither the details nor the rich status (message, ErrorInfo metadata) carry a class name, a
  traceback or a module path;

and at the end no refused request has left an execution behind (every execution row of the
fuzzed tenants was returned by a successful call), and no service logged an error. The seed is
fixed, so a failure replays; ``OPSC_FUZZ_SEED`` picks another.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import grpc
import grpc.aio
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from opsconductor.execution.v1 import (
    execution_service_pb2,
    types_pb2,
)
from opsconductor.lifecycle.storage.flags import SYSTEM_TENANT, update_flags
from opsconductor.lifecycle.storage.role_bindings import bind_role

from . import inspection
from .conftest import Tenant, running_stack, token
from .edge_support import FORBIDDEN_CODES, LEAK
from .fuzz_requests import PACKAGE, RPCS, SERVICE_MODULES, Generator, Rpc, World, noop_plan
from .stack import Stack, start_service

module_end_checks = inspection.module_end_checks
pytestmark = pytest.mark.usefixtures("module_end_checks")

SEED = int(os.environ.get("OPSC_FUZZ_SEED", "20261202"))
REQUESTS = 560
CONCURRENCY = 12


def test_the_fuzz_covers_every_rpc_of_every_service() -> None:
    """No RPC of the contract escapes the fuzz (a new one must be added to the table)."""
    expected = {
        f"/{PACKAGE}.{service.name}/{method.name}"
        for module in SERVICE_MODULES
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert {rpc.method for rpc in RPCS} == expected


# --- the stack and the world the fuzz acts in ---------------------------------------------


@pytest.fixture(scope="module")
async def stack(e2e_dsn: str, e2e_pool: asyncpg.Pool, redis_url: str) -> AsyncIterator[Stack]:
    """Every service as a real process, with a real Redis (background submits can succeed)."""
    await update_flags(e2e_pool, {"max_approval_level": 3}, by="e2e")
    async with running_stack(
        e2e_dsn, redis_url, with_approvals=True, OPSC_CONSUMER_POLL_INTERVAL_S="0.05"
    ) as running:
        common = {
            key: value
            for key, value in running.services["api"].extra_env.items()
            if key in {"OPSC_REDIS_URL", "OPSC_QUEUE_PREFIX"}
        }
        await start_service("progress", running, {**common, "OPSC_HTTP_PORT": "0"})
        yield running


async def _unary(channel: grpc.aio.Channel, rpc: Rpc, request: Message, bearer: str) -> Any:
    return await channel.unary_unary(
        rpc.method,
        request_serializer=type(request).SerializeToString,
        response_deserializer=rpc.response.FromString,
    )(request, metadata=[("authorization", f"Bearer {bearer}")], timeout=30)


@pytest.fixture
async def world(stack: Stack, tenant: Tenant, e2e_pool: asyncpg.Pool) -> World:
    """Two tenants with every role, a system admin, and real executions and approvals."""
    # The previous test's fuzz may have flipped the rollout flags as the system admin (a valid
    # UpdateFeatureFlags): start every world from the module's flags.
    await update_flags(
        e2e_pool,
        {
            "stage_e_enabled": True,
            "all_tenants_enabled": True,
            "record_only_tenants": [],
            "max_approval_level": 3,
        },
        by="e2e",
    )
    foreign = await inspection.new_tenant(stack, e2e_pool)
    for t in (tenant, foreign):
        for actor in ("bob", "carol"):
            await t.bind(actor, "approver")
    await bind_role(e2e_pool, SYSTEM_TENANT, "root", "admin", created_by="e2e")
    submit = next(rpc for rpc in RPCS if rpc.method.endswith("/SubmitExecution"))
    ids: list[str] = []
    approval_ids: list[str] = []
    foreign_ids: list[str] = []
    async with grpc.aio.insecure_channel(stack.address("api")) as channel:
        for t in (tenant, foreign):
            for index, action_class in enumerate(
                (types_pb2.ACTION_CLASS_READ, types_pb2.ACTION_CLASS_MODIFY)
            ):
                request = execution_service_pb2.SubmitExecutionRequest(
                    tenant_id=t.id, plan=noop_plan(f"seed-{index}", action_class)
                )
                response = await _unary(channel, submit, request, token("alice", t.id))
                ids.append(response.execution.execution_id)
                if response.execution.approval_id:
                    approval_ids.append(response.execution.approval_id)
                if t is foreign:
                    foreign_ids.append(response.execution.execution_id)
                    if response.execution.approval_id:
                        foreign_ids.append(response.execution.approval_id)
    actors = ("alice", "alice", "alice", "vera", "ada", "ada", "dave", "bob")
    tokens: list[str | None] = [token(actor, tenant.id) for actor in actors]
    tokens += [token("alice", foreign.id), token("root", SYSTEM_TENANT), None, "not-a-jwt"]
    return World(
        own=tenant,
        foreign=foreign,
        tokens=tokens,
        ids=ids,
        approval_ids=approval_ids,
        foreign_ids=foreign_ids,
    )


# --- the fuzz --------------------------------------------------------------------------------


def _leaks(details: str, trailers: Any) -> list[str]:
    found = [details] if LEAK.search(details) else []
    for key, value in trailers or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        if LEAK.search(status.message):
            found.append(status.message)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                found += [v for v in info.metadata.values() if LEAK.search(v)]
    return found


async def _send(
    channels: dict[str, grpc.aio.Channel], rpc: Rpc, payload: bytes, metadata: list[Any]
) -> tuple[grpc.StatusCode, str, list[str], Any]:
    channel = channels[rpc.service]
    try:
        if rpc.streaming:
            call = channel.unary_stream(rpc.method, response_deserializer=rpc.response.FromString)(
                payload, metadata=metadata, timeout=2
            )
            async for _ in call:
                call.cancel()
                return grpc.StatusCode.OK, "", [], None
            return grpc.StatusCode.OK, "", [], None
        response = await channel.unary_unary(
            rpc.method, response_deserializer=rpc.response.FromString
        )(payload, metadata=metadata, timeout=30)
    except grpc.aio.AioRpcError as exc:
        details = exc.details() or ""
        return exc.code(), details, _leaks(details, exc.trailing_metadata()), None
    return grpc.StatusCode.OK, "", [], response


def _created_ids(response: Any) -> list[str]:
    if response is None:
        return []
    found = []
    execution = getattr(response, "execution", None)
    if execution is not None and execution.execution_id:
        found.append(execution.execution_id)
    if getattr(response, "execution_id", ""):
        found.append(response.execution_id)
    return found


async def test_no_generated_request_gets_internal_unknown_or_unavailable(
    stack: Stack, world: World, e2e_pool: asyncpg.Pool
) -> None:
    """560 seeded requests over every RPC; every answer is a clean, actionable refusal or OK."""
    rnd = random.Random(SEED)
    generator = Generator(rnd, world)
    plan: list[tuple[Rpc, bytes, list[Any]]] = []
    for index in range(REQUESTS):
        rpc = RPCS[index % len(RPCS)]  # every RPC gets its share
        plan.append((rpc, generator.payload(rpc), generator.metadata()))
    channels = {
        name: grpc.aio.insecure_channel(stack.address(name))
        for name in ("api", "worker", "approvals", "progress")
    }
    failures: list[str] = []
    codes: dict[str, int] = {}
    per_rpc: dict[str, int] = {}
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(index: int, rpc: Rpc, payload: bytes, metadata: list[Any]) -> None:
        async with slots:
            code, details, leaks, response = await _send(channels, rpc, payload, metadata)
        codes[code.name] = codes.get(code.name, 0) + 1
        key = f"{rpc.method.rsplit('/', 1)[1]}:{code.name}"
        per_rpc[key] = per_rpc.get(key, 0) + 1
        world.created.update(_created_ids(response))
        hung = code is grpc.StatusCode.DEADLINE_EXCEEDED and not rpc.streaming
        if code in FORBIDDEN_CODES or hung or leaks:
            failures.append(f"#{index} {rpc.method} -> {code.name} {details[:300]!r} {leaks}")

    try:
        await asyncio.gather(*(one(i, *item) for i, item in enumerate(plan)))
    finally:
        for channel in channels.values():
            await channel.close()
    print(f"fuzz seed {SEED}: {len(plan)} requests, codes {sorted(codes.items())}")
    if os.environ.get("OPSC_FUZZ_VERBOSE"):
        print(sorted(per_rpc.items()))
    assert not failures, "\n".join(failures[:40])
    assert len(plan) >= 500
    assert codes.get("OK", 0) > 0, "nothing succeeded: the fuzz only tested the front door"
    assert codes.get("INVALID_ARGUMENT", 0) > 0

    # A refusal leaves no row: every execution of the two tenants came from a successful call.
    rows = await e2e_pool.fetch(
        "SELECT id::text AS id FROM executions WHERE tenant_id = ANY($1::varchar[])",
        [world.own.id, world.foreign.id],
    )
    stray = {row["id"] for row in rows} - set(world.ids) - world.created
    assert not stray, f"refused requests left executions behind: {sorted(stray)[:10]}"


async def test_hand_picked_attacks_on_every_rpc_are_refused_cleanly(
    stack: Stack, world: World
) -> None:
    """The issue's own cases, aimed at every RPC: undecodable bytes, a foreign tenant, no token."""
    channels = {
        name: grpc.aio.insecure_channel(stack.address(name))
        for name in ("api", "worker", "approvals", "progress")
    }
    own = token("alice", world.own.id)
    failures: list[str] = []
    cases: list[tuple[str, Callable[[Rpc], bytes], list[Any]]] = [
        ("garbage", lambda rpc: b"\xff\xff\xff\xff", [("authorization", f"Bearer {own}")]),
        ("bad_utf8", lambda rpc: b"\x0a\x02\xc3\x28", [("authorization", f"Bearer {own}")]),
        (
            "foreign_tenant",
            lambda rpc: _with_tenant(rpc, world.foreign.id),
            [("authorization", f"Bearer {own}")],
        ),
        (
            "nul_tenant",
            lambda rpc: _with_tenant(rpc, "acme\x00"),
            [("authorization", f"Bearer {own}")],
        ),
        ("no_token", lambda rpc: rpc.request().SerializeToString(), []),
        *(
            (
                "foreign_id",
                lambda rpc, foreign_id=foreign_id: _aimed_at(rpc, world.own.id, foreign_id),
                [("authorization", f"Bearer {own}")],
            )
            for foreign_id in world.foreign_ids
        ),
    ]
    try:
        for name, build, metadata in cases:
            for rpc in RPCS:
                code, details, leaks, _ = await _send(channels, rpc, build(rpc), metadata)
                hung = code is grpc.StatusCode.DEADLINE_EXCEEDED and not rpc.streaming
                if code in FORBIDDEN_CODES or hung or leaks:
                    failures.append(f"{name} {rpc.method} -> {code.name} {details[:200]!r}")
                if world.foreign.id in details:
                    failures.append(f"{name} {rpc.method} names the foreign tenant: {details!r}")
                undecodable = name == "garbage" or (name == "bad_utf8" and _string_field_1(rpc))
                if undecodable and code is not grpc.StatusCode.INVALID_ARGUMENT:
                    failures.append(f"{name} {rpc.method} -> {code.name}, not INVALID_ARGUMENT")
    finally:
        for channel in channels.values():
            await channel.close()
    assert not failures, "\n".join(failures)


def _string_field_1(rpc: Rpc) -> bool:
    """Whether field 1 of the request is a string (else b"\x0a..." is just an unknown field)."""
    fd = rpc.request.DESCRIPTOR.fields_by_number.get(1)
    return fd is not None and fd.type == FieldDescriptor.TYPE_STRING


def _aimed_at(rpc: Rpc, tenant_id: str, foreign_id: str) -> bytes:
    """The caller's own tenant, but every id field set to an id of another tenant."""
    message = rpc.request()
    for name in ("tenant_id", "execution_id", "approval_id"):
        if name in message.DESCRIPTOR.fields_by_name:
            setattr(message, name, tenant_id if name == "tenant_id" else foreign_id)
    return message.SerializeToString()


def _with_tenant(rpc: Rpc, tenant_id: str) -> bytes:
    message = rpc.request()
    if "tenant_id" in message.DESCRIPTOR.fields_by_name:
        message.tenant_id = tenant_id  # type: ignore[attr-defined]
    return message.SerializeToString()
