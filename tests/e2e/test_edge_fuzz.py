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
import math
import os
import random
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
import grpc.aio
import pytest
from google.protobuf import struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from opsconductor.common.storage.flags import SYSTEM_TENANT, update_flags
from opsconductor.common.storage.role_bindings import bind_role
from opsconductor.execution.v1 import (
    admin_service_pb2,
    approval_service_pb2,
    execution_service_pb2,
    progress_service_pb2,
    types_pb2,
    worker_service_pb2,
)

from . import inspection
from .conftest import Tenant, running_stack, token
from .edge_support import FORBIDDEN_CODES, LEAK
from .stack import Stack, start_service

module_end_checks = inspection.module_end_checks
pytestmark = pytest.mark.usefixtures("module_end_checks")

SEED = int(os.environ.get("OPSC_FUZZ_SEED", "20261202"))
REQUESTS = 560
CONCURRENCY = 12
_PKG = "opsconductor.execution.v1"


@dataclass(frozen=True)
class Rpc:
    service: str  # which process serves it
    method: str  # /pkg.Service/Method
    request: type[Message]
    response: type[Message]
    streaming: bool = False


def _rpcs() -> list[Rpc]:
    e, a, w, p, ap = (
        execution_service_pb2,
        admin_service_pb2,
        worker_service_pb2,
        progress_service_pb2,
        approval_service_pb2,
    )
    table: list[tuple[str, str, Any, list[str]]] = [
        (
            "api",
            "ExecutionService",
            e,
            ["SubmitExecution", "GetExecution", "ListExecutions", "CancelExecution", "PreviewPlan"],
        ),
        (
            "api",
            "AdminService",
            a,
            [
                "GetFeatureFlags",
                "UpdateFeatureFlags",
                "ListDlqEntries",
                "RequeueDlqEntry",
                "GetQueueStats",
                "SetDrain",
            ],
        ),
        ("worker", "WorkerService", w, ["RunImmediate"]),
        (
            "approvals",
            "ApprovalService",
            ap,
            ["GetApproval", "ListPendingApprovals", "Approve", "Reject", "ApproveStep"],
        ),
        ("progress", "ProgressService", p, ["StreamEvents", "ListEvents"]),
    ]
    rpcs = []
    for process, service, module, methods in table:
        for method in methods:
            rpcs.append(
                Rpc(
                    process,
                    f"/{_PKG}.{service}/{method}",
                    getattr(module, f"{method}Request"),
                    getattr(module, f"{method}Response"),
                    streaming=method == "StreamEvents",
                )
            )
    return rpcs


RPCS = _rpcs()


def test_the_fuzz_covers_every_rpc_of_every_service() -> None:
    """No RPC of the contract escapes the fuzz (a new one must be added to the table)."""
    expected = {
        f"/{_PKG}.{service.name}/{method.name}"
        for module in (
            execution_service_pb2,
            admin_service_pb2,
            worker_service_pb2,
            approval_service_pb2,
            progress_service_pb2,
        )
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


@dataclass
class World:
    """Who may call, which ids exist, and what the successful calls created."""

    own: Tenant
    foreign: Tenant
    tokens: list[str | None]
    ids: list[str]
    approval_ids: list[str]
    created: set[str] = field(default_factory=set)


def _noop_plan(name: str, action_class: int = types_pb2.ACTION_CLASS_READ) -> types_pb2.Plan:
    plan = types_pb2.Plan(name=name, sla_class=types_pb2.SLA_CLASS_FAST)
    step = plan.steps.add(id="s1", action="noop", action_class=action_class)
    step.targets.add(ref="srv-1")
    return plan


async def _unary(channel: grpc.aio.Channel, rpc: Rpc, request: Message, bearer: str) -> Any:
    return await channel.unary_unary(
        rpc.method,
        request_serializer=type(request).SerializeToString,
        response_deserializer=rpc.response.FromString,
    )(request, metadata=[("authorization", f"Bearer {bearer}")], timeout=30)


@pytest.fixture
async def world(stack: Stack, tenant: Tenant, e2e_pool: asyncpg.Pool) -> World:
    """Two tenants with every role, a system admin, and real executions and approvals."""
    foreign = await inspection.new_tenant(stack, e2e_pool)
    for t in (tenant, foreign):
        for actor in ("bob", "carol"):
            await t.bind(actor, "approver")
    await bind_role(e2e_pool, SYSTEM_TENANT, "root", "admin", created_by="e2e")
    submit = next(rpc for rpc in RPCS if rpc.method.endswith("/SubmitExecution"))
    ids: list[str] = []
    approval_ids: list[str] = []
    async with grpc.aio.insecure_channel(stack.address("api")) as channel:
        for t in (tenant, foreign):
            for index, action_class in enumerate(
                (types_pb2.ACTION_CLASS_READ, types_pb2.ACTION_CLASS_MODIFY)
            ):
                request = execution_service_pb2.SubmitExecutionRequest(
                    tenant_id=t.id, plan=_noop_plan(f"seed-{index}", action_class)
                )
                response = await _unary(channel, submit, request, token("alice", t.id))
                ids.append(response.execution.execution_id)
                if response.execution.approval_id:
                    approval_ids.append(response.execution.approval_id)
    actors = ("alice", "alice", "alice", "vera", "ada", "ada", "dave", "bob")
    tokens: list[str | None] = [token(actor, tenant.id) for actor in actors]
    tokens += [token("alice", foreign.id), token("root", SYSTEM_TENANT), None, "not-a-jwt"]
    return World(own=tenant, foreign=foreign, tokens=tokens, ids=ids, approval_ids=approval_ids)


# --- the generator ---------------------------------------------------------------------------

_EDGE_TEXT = [
    "",
    " ",
    "x",
    "a:b",
    "../../etc/passwd",
    "x\x00y",
    "\u202eevil",
    "é",
    "😀",
    "%00",
    "' OR 1=1 --",
    "x" * 99,
    "x" * 100,
    "x" * 101,
    "x" * 128,
    "x" * 300,
    "x" * 5000,
]
_EDGE_INTS = [0, 1, -1, 2**31 - 1, -(2**31), 50, 100, 101]
_EDGE_NUMBERS = [
    0.0,
    -0.0,
    1.5,
    math.nan,
    math.inf,
    -math.inf,
    float(2**53 - 1),
    float(2**53),
    float(2**60),
    1e308,
    -1e-320,
]


class Generator:
    """Seeded requests: each field left empty, set to an edge value, or to a plausible one."""

    def __init__(self, rnd: random.Random, world: World) -> None:
        self.rnd = rnd
        self.world = world
        #: This request looks like a legitimate one (own tenant, own token, real ids), so the
        #: fuzz also reaches past the front door; else anything goes.
        self.plausible = False

    def text(self, name: str) -> str:
        rnd, world = self.rnd, self.world
        if self.plausible:
            if name == "tenant_id":
                return world.own.id
            if name in {"execution_id", "approval_id"}:
                pool = world.approval_ids if name == "approval_id" else world.ids
                return rnd.choice(pool)
            return rnd.choice(["", "", "ok", self.text_any()])
        choice = rnd.random()
        if name == "tenant_id" and choice < 0.6:
            return rnd.choice([world.own.id, world.own.id, world.foreign.id, SYSTEM_TENANT])
        if name in {"execution_id", "approval_id", "dlq_id"} and choice < 0.6:
            pool = world.approval_ids if name == "approval_id" else world.ids
            return rnd.choice([*pool, str(uuid.uuid4()), "not-a-uuid", str(uuid.uuid4()).upper()])
        return self.text_any()

    def text_any(self) -> str:
        rnd = self.rnd
        if rnd.random() < 0.8:
            return rnd.choice(_EDGE_TEXT)
        return secrets.token_urlsafe(rnd.randint(1, 40))

    def json_value(self, depth: int) -> Any:
        rnd = self.rnd
        kind = rnd.random()
        if depth > 0 and kind < 0.25:
            return {
                self.text("key")[:20]: self.json_value(depth - 1) for _ in range(rnd.randint(0, 3))
            }
        if depth > 0 and kind < 0.35:
            return [self.json_value(depth - 1) for _ in range(rnd.randint(0, 3))]
        if kind < 0.6:
            return rnd.choice(_EDGE_NUMBERS)
        if kind < 0.7:
            return rnd.choice([True, False, None])
        if kind < 0.75:
            return {
                "$secret": rnd.choice(["env:E2E_DB_PASSWORD", "env:NOPE", "bogus", "file:../x"])
            }
        return self.text("value")

    def struct(self, message: struct_pb2.Struct) -> None:
        depth = self.rnd.choice([1, 2, 3, 20, 30])
        value: Any = {"k": self.json_value(3)}
        if depth > 3:  # a deep chain (beyond the plan's 16, within protobuf's limit)
            for _ in range(depth):
                value = {"a": value}
        message.update(value)

    def plan(self, message: types_pb2.Plan) -> None:
        rnd = self.rnd
        if rnd.random() < 0.5:
            # Plausible: a valid noop plan whose only oddity is in its params (NaN, 2^60,
            # deep, secret references...), so the fuzz reaches past validation into the run.
            message.CopyFrom(_noop_plan(f"fuzz-{rnd.randint(0, 10**9)}"))
            if rnd.random() < 0.3:
                message.steps[0].action_class = types_pb2.ACTION_CLASS_MODIFY
            if rnd.random() < 0.7:
                self.struct(message.steps[0].params)
            return
        message.name = rnd.choice(["p", f"fuzz-{rnd.random()}", self.text("name")])
        message.sla_class = rnd.choice([0, 1, 2, 3, 7])
        if rnd.random() < 0.2:
            message.runbook_url = rnd.choice(["https://rb.example/x", "javascript:x", "x" * 3000])
        for index in range(rnd.choice([0, 1, 1, 2, 3, 101])):
            step = message.steps.add(
                id=rnd.choice([f"s{index}", "", "a:b", "x" * 120]),
                action=rnd.choice(["noop", "noop", "sleep", "probe", "shell", "http", "nope"]),
                action_class=rnd.choice([0, 1, 1, 2, 3, 9]),
            )
            for target in range(rnd.choice([0, 1, 1, 2, 501])):
                step.targets.add(ref=rnd.choice([f"h{target}", "", "a b", "x" * 301]))
            if rnd.random() < 0.7:
                self.struct(step.params)

    def fill(self, message: Message, depth: int = 0) -> None:
        rnd = self.rnd
        if isinstance(message, types_pb2.Plan):
            self.plan(message)
            return
        if isinstance(message, struct_pb2.Struct):
            self.struct(message)
            return
        for fd in message.DESCRIPTOR.fields:
            keep = fd.name in {"tenant_id", "plan", "execution_id", "approval_id"}
            if rnd.random() < (0.2 if not self.plausible or keep else 0.8):
                continue  # left at its default
            repeated = fd.is_repeated
            count = rnd.choice([0, 1, 2, 3]) if repeated else 1
            for _ in range(count):
                self._set(message, fd, repeated, depth)

    def _set(self, message: Message, fd: FieldDescriptor, repeated: bool, depth: int) -> None:
        rnd = self.rnd
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            if fd.message_type.GetOptions().map_entry:
                getattr(message, fd.name)[self.text("key")[:30]] = self.text("value")
                return
            if depth > 3:
                return
            child = getattr(message, fd.name).add() if repeated else getattr(message, fd.name)
            if fd.message_type.full_name == "google.protobuf.FieldMask":
                child.paths.extend(
                    rnd.sample(["stage_e_enabled", "enabled_tenants", "bogus", "", "a.b"], 2)
                )
                return
            if fd.message_type.full_name == "google.protobuf.Timestamp":
                child.seconds = rnd.choice([0, -1, 2**40])
                return
            self.fill(child, depth + 1)
            return
        if fd.type == FieldDescriptor.TYPE_STRING:
            value: Any = self.text(fd.name)
        elif fd.type == FieldDescriptor.TYPE_BOOL:
            value = rnd.random() < 0.5
        elif fd.type == FieldDescriptor.TYPE_ENUM:
            numbers = [v.number for v in fd.enum_type.values]
            value = rnd.choice(numbers[1:] if self.plausible else [*numbers, 99])
        elif fd.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            value = rnd.choice(_EDGE_NUMBERS)
        elif fd.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64):
            value = rnd.choice([*_EDGE_INTS, 2**63 - 1, -(2**63)])
        else:
            value = rnd.choice([0, 10, 50] if self.plausible else _EDGE_INTS)
        if repeated:
            getattr(message, fd.name).append(value)
        else:
            setattr(message, fd.name, value)

    def payload(self, rpc: Rpc) -> bytes:
        """A request's bytes: mostly a generated message, sometimes bytes no decoder accepts."""
        rnd = self.rnd
        self.plausible = rnd.random() < 0.4
        message = rpc.request()
        self.fill(message)
        if self.plausible:
            return message.SerializeToString()
        body = message.SerializeToString()
        roll = rnd.random()
        if roll < 0.06 and body:
            return body[: rnd.randint(0, len(body) - 1)]  # truncated
        if roll < 0.1:
            return rnd.randbytes(rnd.randint(1, 64))  # garbage
        if roll < 0.14:
            # A string field (tag 1, length-delimited) that is not UTF-8, then the rest.
            return b"\x0a\x03\xff\xfe\xc3" + body
        if roll < 0.16:
            return _deep_struct_payload()
        return body

    def metadata(self) -> list[tuple[str, str]]:
        rnd = self.rnd
        bearer = (
            self.world.tokens[rnd.choice([0, 4])]
            if self.plausible
            else rnd.choice(self.world.tokens)
        )
        metadata = [] if bearer is None else [("authorization", f"Bearer {bearer}")]
        if rnd.random() < 0.3:
            request_id = rnd.choice(["ok-1", "r" * 100, "r" * 101, "r" * 128, "r" * 400, "a b"])
            metadata.append(("x-request-id", request_id))
        return metadata


def _field(number: int, body: bytes) -> bytes:
    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            byte, value = value & 0x7F, value >> 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                return bytes(out)

    return varint(number << 3 | 2) + varint(len(body)) + body


def _deep_struct_payload() -> bytes:
    """A Plan whose step params nest 60 Structs deep (protobuf itself refuses to build it)."""
    params = b""
    for _ in range(60):
        params = _field(1, _field(1, b"a") + _field(2, _field(1, params)))
    return _field(2, _field(2, _field(1, b"s") + _field(5, params)))


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
    ]
    try:
        for name, build, metadata in cases:
            for rpc in RPCS:
                code, details, leaks, _ = await _send(channels, rpc, build(rpc), metadata)
                hung = code is grpc.StatusCode.DEADLINE_EXCEEDED and not rpc.streaming
                if code in FORBIDDEN_CODES or hung or leaks:
                    failures.append(f"{name} {rpc.method} -> {code.name} {details[:200]!r}")
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


def _with_tenant(rpc: Rpc, tenant_id: str) -> bytes:
    message = rpc.request()
    if "tenant_id" in message.DESCRIPTOR.fields_by_name:
        message.tenant_id = tenant_id  # type: ignore[attr-defined]
    return message.SerializeToString()
