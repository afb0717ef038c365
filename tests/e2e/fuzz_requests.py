"""What the edge fuzz sends: every RPC of the contract, and a seeded generator of requests.

The generator fills any request message from its descriptor — each field left empty, set to an
edge value (empty, 101/300/5 000 characters, NUL, ``:``, right-to-left marks, NaN, ±Infinity,
2^60, 60-deep Structs...) or to a plausible one (the caller's tenant, real ids) — and sometimes
replaces the bytes with ones no decoder accepts (truncated, garbage, non-UTF-8, too deep). About
40 % of requests are *plausible* (own tenant, own token, real ids, a valid plan but for its
params), so the fuzz also reaches past the front door into the run.
"""

from __future__ import annotations

import math
import random
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from opsconductor.execution.v1 import (
    admin_service_pb2,
    approval_service_pb2,
    execution_service_pb2,
    progress_service_pb2,
    types_pb2,
    worker_service_pb2,
)
from opsconductor.lifecycle.storage.flags import SYSTEM_TENANT

from .conftest import Tenant
from .edge_support import deep_params_plan, length_delimited

PACKAGE = "opsconductor.execution.v1"
#: The modules whose services the fuzz covers (all of the contract).
SERVICE_MODULES = (
    execution_service_pb2,
    admin_service_pb2,
    worker_service_pb2,
    approval_service_pb2,
    progress_service_pb2,
)


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
                "VerifyAuditChain",
                "ListFlagChanges",
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
                    f"/{PACKAGE}.{service}/{method}",
                    getattr(module, f"{method}Request"),
                    getattr(module, f"{method}Response"),
                    streaming=method == "StreamEvents",
                )
            )
    return rpcs


RPCS = _rpcs()


@dataclass
class World:
    """Who may call, which ids exist, and what the successful calls created."""

    own: Tenant
    foreign: Tenant
    tokens: list[str | None]
    ids: list[str]
    approval_ids: list[str]
    #: The foreign tenant's execution and approval ids (probes aimed at them must not learn
    #: which tenant owns them).
    foreign_ids: list[str] = field(default_factory=list)
    created: set[str] = field(default_factory=set)


def noop_plan(name: str, action_class: int = types_pb2.ACTION_CLASS_READ) -> types_pb2.Plan:
    plan = types_pb2.Plan(name=name, sla_class=types_pb2.SLA_CLASS_FAST)
    step = plan.steps.add(id="s1", action="noop", action_class=action_class)
    step.targets.add(ref="srv-1")
    return plan


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
            message.CopyFrom(noop_plan(f"fuzz-{rnd.randint(0, 10**9)}"))
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
            return length_delimited(2, deep_params_plan(60))  # 60 Structs deep: undecodable
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
