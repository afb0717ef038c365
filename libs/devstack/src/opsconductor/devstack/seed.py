"""Seed a migrated database with a large, consistent history, fast (COPY), for scale checks.

``make bench-scale`` and the index test (``tests/integration/test_hot_query_plans.py``) need
tables as large as a busy installation's: a million stored executions and a backlog of queued
jobs. :func:`seed_history` writes them with ``COPY`` (asyncpg ``copy_records_to_table``) in
batches, each row as the services would have left it:

* **stored** executions, ended over the last ``days`` days: one-step ``noop`` plans, mostly
  succeeded (immediate and background alike), one in 20 failed (its step failed), one in 20
  cancelled while queued (its step never ran); each with its step row and its events in seq order
  (``execution_started``, ``execution_queued`` for background, ``execution_running``,
  ``step_started``, ``step_succeeded``/``step_failed``, ``execution_completed``) and
  ``event_seq`` counting them. The audit chain's trigger hashes every event as it would for a
  real append (COPY fires row triggers). Keys of executions ended longer ago than the dedup
  window are retired, as the retire job would have done.
* **queued** background executions: ``queued``, step ``pending``, events ``execution_started``
  and ``execution_queued``, and their ``execution_queue`` rows ``delayed`` until
  ``backlog_delay_s`` from now: a backlog that sits in the queue (and in Redis, once pushed with
  :func:`push_backlog`) for the whole measurement instead of being consumed by it — ready jobs of
  other tenants would be dispatched in turn with the measured ones (fair share) and drain away.

Spread over ``tenants`` tenants (``seed-tenant-000``...) plus ``main_tenant``, which gets
``main_share`` of the stored executions, so that listing one tenant's executions pages over a
large set. Plan, snapshot and hashes are rendered from one real plan with only its name and
target changing, so every row's hashes are those the api would compute.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from opsconductor.common.hashing import canonical_json
from opsconductor.common.plan import parse_plan, to_wire_dict
from opsconductor.devstack.queries import query

__all__ = ["SeedReport", "SeedSpec", "push_backlog", "seed_history"]

# Placeholders a plan accepts as its name and target ref, replaced in the canonical texts.
_NAME = "seedplaceholdername0"
_TARGET = "seedplaceholdertarget0"
_POLICY = "fast_read"
_WORKER = "seed-worker"

_EXECUTION_COLUMNS = (
    "id",
    "tenant_id",
    "actor_id",
    "request_id",
    "idempotency_key",
    "idempotency_retired_at",
    "plan_hash",
    "plan_snapshot",
    "plan_snapshot_hash",
    "status",
    "execution_mode",
    "sla_class",
    "action_class",
    "priority",
    "timeout_policy_id",
    "timeout_ms",
    "estimated_duration_ms",
    "deadline_at",
    "attempts",
    "created_at",
    "started_at",
    "ended_at",
    "updated_at",
    "result_summary",
    "error_class",
    "error_message",
    "worker_id",
    "cancel_checks_performed",
    "last_transition_at",
    "last_transition_by",
    "last_transition_from",
    "lease_token",
    "event_seq",
    "cancelled_by",
    "cancelled_at",
    "cancel_reason",
    "cancel_initiator",
)
_STEP_COLUMNS = (
    "execution_id",
    "step_id",
    "position",
    "action",
    "action_class",
    "status",
    "idempotency_key",
    "attempt",
    "worker_id",
    "created_at",
    "started_at",
    "ended_at",
    "duration_ms",
    "result",
    "error_class",
    "error_message",
)
_EVENT_COLUMNS = ("execution_id", "tenant_id", "actor_id", "seq", "type", "payload", "created_at")
_QUEUE_COLUMNS = (
    "id",
    "execution_id",
    "tenant_id",
    "priority",
    "state",
    "attempts",
    "max_attempts",
    "available_at",
    "enqueued_at",
    "updated_at",
)

_SEED_POLICY = query("seed_timeout_policy")
_QUEUE_ROWS = query("seeded_queue_rows")


@dataclass(frozen=True)
class SeedSpec:
    """How much to write; see the module docstring."""

    stored: int = 1_000_000
    queued: int = 100_000
    tenants: int = 100
    main_tenant: str = "bench-tenant"
    main_share: float = 0.1
    actor: str = "seed-operator"
    days: float = 30.0
    dedup_window_s: float = 86_400.0
    backlog_delay_s: float = 86_400.0
    batch: int = 20_000


@dataclass
class SeedReport:
    """Rows written per table, and how long it took."""

    executions: int = 0
    steps: int = 0
    events: int = 0
    queue_rows: int = 0
    seconds: float = 0.0
    #: Seconds per phase (executions, steps, events, queue, analyze).
    phases: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Templates:
    """Canonical texts of one plan with placeholders for its name and target."""

    plan: str
    snapshot: dict[str, str]  # per execution mode


def _templates(policy: asyncpg.Record) -> _Templates:
    plan = to_wire_dict(
        parse_plan(
            {
                "name": _NAME,
                "sla_class": "fast",
                "steps": [
                    {
                        "id": "noop",
                        "action": "noop",
                        "action_class": "read",
                        "targets": [{"ref": _TARGET}],
                        "params": {},
                    }
                ],
            }
        )
    )
    snapshots = {}
    for mode in ("immediate", "background"):
        snapshots[mode] = canonical_json(
            {
                "plan": plan,
                "resolved": {
                    "timeout_policy_id": policy["id"],
                    "execution_timeout_ms": policy["execution_timeout_ms"],
                    "step_timeout_ms": policy["step_timeout_ms"],
                    "approval_level": 0,
                    "action_class": "read",
                    "estimated_duration_ms": 5,
                    "can_parallelize": False,
                    "execution_mode": mode,
                },
            }
        )
    return _Templates(canonical_json(plan), snapshots)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _render(template: str, name: str, target: str) -> str:
    # Names and targets are [a-z0-9-:] only: their JSON text is themselves, so substituting
    # in the canonical text gives the canonical text of the substituted plan.
    return template.replace(_NAME, name).replace(_TARGET, target)


def _tenant_of(i: int, spec: SeedSpec) -> str:
    if spec.tenants < 1 or (i * 7919) % 1000 < spec.main_share * 1000:
        return spec.main_tenant
    return f"seed-tenant-{i % spec.tenants:03d}"


@dataclass
class _Batch:
    executions: list[tuple[Any, ...]] = field(default_factory=list)
    steps: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    queue: list[tuple[Any, ...]] = field(default_factory=list)


def _ms(delta_ms: float) -> timedelta:
    return timedelta(milliseconds=delta_ms)


class _Writer:
    def __init__(self, spec: SeedSpec, templates: _Templates, policy: asyncpg.Record) -> None:
        self.spec = spec
        self.t = templates
        self.policy = policy
        self.now = datetime.now(UTC)
        self.run = uuid.uuid4().hex[:8]

    def _execution(self, b: _Batch, i: int, kind: str, created: datetime, tenant: str) -> uuid.UUID:
        spec, policy = self.spec, self.policy
        mode = "immediate" if kind == "immediate" else "background"
        name = f"seed-{self.run}-{kind}-{i}"
        target = f"seed:{self.run}:{i}"
        plan_text = _render(self.t.plan, name, target)
        snapshot = _render(self.t.snapshot[mode], name, target)
        eid = uuid.uuid4()
        started = (
            created + _ms(20 + i % 30) if kind in {"immediate", "succeeded", "failed"} else None
        )
        ended: datetime | None = None
        status = "queued"
        events: list[tuple[str, str | None, dict[str, Any], datetime]] = [
            (
                "execution_started",
                spec.actor,
                {
                    "mode": mode,
                    "status": "pending",
                    "plan_hash": _sha(plan_text),
                    "sla_class": "fast",
                    "approval_level": 0,
                },
                created,
            )
        ]
        if mode == "background":
            events.append(
                ("execution_queued", "api", {"from": "pending", "status": "queued"}, created)
            )
        step_status, step_started, step_ended, result, error = "pending", None, None, None, None
        if started is not None:
            ended = started + _ms(30 + i % 40)
            previous = "queued" if mode == "background" else "pending"
            events.append(
                ("execution_running", _WORKER, {"from": previous, "status": "running"}, started)
            )
            step_started = started + _ms(5)
            step_ended = ended - _ms(5)
            duration = int((step_ended - step_started).total_seconds() * 1000)
            step_payload = {"action": "noop", "attempt": 1, "step_id": "noop", "position": 0}
            events.append(
                ("step_started", _WORKER, {**step_payload, "worker_id": _WORKER}, step_started)
            )
            if kind == "failed":
                status, step_status = "failed", "failed"
                error = ("ActionError", "seeded failure")
                events.append(
                    (
                        "step_failed",
                        _WORKER,
                        {**step_payload, "duration_ms": duration, "error_class": error[0]},
                        step_ended,
                    )
                )
            else:
                status, step_status, result = "succeeded", "succeeded", '{"ok": true}'
                events.append(
                    (
                        "step_succeeded",
                        _WORKER,
                        {**step_payload, "duration_ms": duration},
                        step_ended,
                    )
                )
        elif kind == "cancelled":
            status, step_status, ended = "cancelled", "skipped", created + _ms(500 + i % 500)
        if ended is not None:
            events.append(
                (
                    "execution_completed",
                    _WORKER if started is not None else spec.actor,
                    {
                        "from": "running" if started is not None else "queued",
                        "status": status,
                        "timed_out": False,
                        "duration_ms": int((ended - created).total_seconds() * 1000),
                    },
                    ended,
                )
            )
        terminal = ended is not None
        summary = None
        if terminal:
            counts = {"failed": 0, "skipped": 0, "succeeded": 0}
            counts[step_status if step_status in counts else "skipped"] += 1
            summary = json.dumps({"steps": {"noop": step_status}, "counts": counts})
        retired = (
            ended + timedelta(seconds=spec.dedup_window_s)
            if ended is not None and (self.now - ended).total_seconds() > spec.dedup_window_s
            else None
        )
        last_at = events[-1][3]
        b.executions.append(
            (
                eid,
                tenant,
                spec.actor,
                uuid.uuid4().hex,
                _sha(plan_text + tenant + spec.actor),
                retired,
                _sha(plan_text),
                snapshot,
                _sha(snapshot),
                status,
                mode,
                "fast",
                "read",
                50,
                policy["id"],
                policy["execution_timeout_ms"],
                5,
                started + _ms(policy["execution_timeout_ms"]) if started is not None else None,
                1 if mode == "background" and started is not None else 0,
                created,
                started,
                ended,
                last_at,
                summary,
                error[0] if error else None,
                error[1] if error else None,
                _WORKER if started is not None else None,
                1 if started is not None else 0,
                last_at,
                events[-1][1],
                "running" if started is not None else "queued" if terminal else "pending",
                uuid.uuid4() if mode == "background" and started is not None else None,
                len(events),
                spec.actor if kind == "cancelled" else None,
                ended if kind == "cancelled" else None,
                "seeded cancellation" if kind == "cancelled" else None,
                "user" if kind == "cancelled" else None,
            )
        )
        b.steps.append(
            (
                eid,
                "noop",
                0,
                "noop",
                "read",
                step_status,
                f"{eid}:noop",
                1 if step_started is not None else 0,
                _WORKER if step_started is not None else None,
                created,
                step_started,
                step_ended,
                int((step_ended - step_started).total_seconds() * 1000)
                if step_started is not None and step_ended is not None
                else None,
                result,
                error[0] if error else None,
                error[1] if error else None,
            )
        )
        for seq, (kind_name, actor, payload, at) in enumerate(events, start=1):
            b.events.append((eid, tenant, actor, seq, kind_name, json.dumps(payload), at))
        return eid

    def stored(self, start: int, stop: int) -> _Batch:
        b = _Batch()
        span_s = self.spec.days * 86_400
        for i in range(start, stop):
            kind = (
                "failed"
                if i % 20 == 0
                else "cancelled"
                if i % 20 == 1
                else "immediate"
                if i % 2
                else "succeeded"
            )
            # Oldest first, so ids, times and event ids grow together as in a real history.
            created = self.now - timedelta(seconds=span_s * (1 - i / max(self.spec.stored, 1)))
            created -= timedelta(seconds=120)
            self._execution(b, i, kind, created, _tenant_of(i, self.spec))
        return b

    def queued(self, start: int, stop: int) -> _Batch:
        b = _Batch()
        available = self.now + timedelta(seconds=self.spec.backlog_delay_s)
        for i in range(start, stop):
            created = self.now - timedelta(seconds=3600 * (1 - i / max(self.spec.queued, 1)))
            tenant = _tenant_of(i + 1, self.spec)
            eid = self._execution(b, i + self.spec.stored, "queued", created, tenant)
            b.queue.append(
                (
                    uuid.uuid4(),
                    eid,
                    tenant,
                    50,
                    "delayed",
                    0,
                    self.policy["max_attempts"],
                    available,
                    created,
                    created,
                )
            )
        return b


def _chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)


async def _copy(
    conn: asyncpg.Connection, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]
) -> None:
    if rows:
        await conn.copy_records_to_table(table, records=rows, columns=list(columns))


async def seed_history(
    conn: asyncpg.Connection,
    spec: SeedSpec,
    *,
    progress: Callable[[str], None] | None = None,
) -> SeedReport:
    """Write ``spec.stored`` stored and ``spec.queued`` queued executions (module docstring).

    ``conn`` is a plain asyncpg connection (jsonb as text) to a migrated database; each batch is
    its own transaction. Ends with ``VACUUM ANALYZE`` of the tables written, so the planner and
    the visibility map see them as an installation that has been running would.
    """
    policy = await conn.fetchrow(_SEED_POLICY, _POLICY)
    if policy is None:
        raise LookupError(f"timeout policy {_POLICY!r} missing: is the database migrated?")
    writer = _Writer(spec, _templates(policy), policy)
    report = SeedReport()
    started = time.monotonic()
    jobs = [("stored", spec.stored, writer.stored), ("queued", spec.queued, writer.queued)]
    for label, total, make in jobs:
        chunks = list(_chunks(total, spec.batch))
        # The next batch is built in a thread while Postgres copies this one.
        pending = asyncio.ensure_future(asyncio.to_thread(make, *chunks[0])) if chunks else None
        for index, (_start, stop) in enumerate(chunks):
            assert pending is not None
            batch = await pending
            pending = (
                asyncio.ensure_future(asyncio.to_thread(make, *chunks[index + 1]))
                if index + 1 < len(chunks)
                else None
            )
            async with conn.transaction():
                await _copy(conn, "executions", _EXECUTION_COLUMNS, batch.executions)
                await _copy(conn, "execution_steps", _STEP_COLUMNS, batch.steps)
                await _copy(conn, "execution_events", _EVENT_COLUMNS, batch.events)
                await _copy(conn, "execution_queue", _QUEUE_COLUMNS, batch.queue)
            report.executions += len(batch.executions)
            report.steps += len(batch.steps)
            report.events += len(batch.events)
            report.queue_rows += len(batch.queue)
            if progress is not None:
                progress(f"seeded {label} {stop}/{total} ({time.monotonic() - started:.0f} s)")
        report.phases[label] = round(time.monotonic() - started - sum(report.phases.values()), 1)
    for table in ("executions", "execution_steps", "execution_events", "execution_queue"):
        # Composed: VACUUM takes a table name, no parameter (the names are the four above).
        await conn.execute(f"VACUUM ANALYZE {table}")
    report.seconds = time.monotonic() - started
    report.phases["analyze"] = round(report.seconds - sum(report.phases.values()), 1)
    return report


async def push_backlog(conn: asyncpg.Connection, queue: Any, *, concurrency: int = 64) -> int:
    """Push every ``execution_queue`` row into ``queue`` (a ``RedisQueue``), as its submit did.

    For a database copied from a seeded one: its queue rows are there, the Redis side of the run
    is empty. The same data the reaper's reconcile would re-push, just faster (it re-pushes at
    most 10 000 per pass). Returns how many jobs were queued.
    """
    rows = await conn.fetch(_QUEUE_ROWS)
    pushed = 0
    for start, stop in _chunks(len(rows), concurrency):
        results = await asyncio.gather(
            *(
                queue.enqueue(
                    row["id"],
                    row["execution_id"],
                    row["tenant_id"],
                    row["priority"],
                    row["max_attempts"],
                    row["max_lease_renewals"] or 0,
                    row["available_at"] if row["state"] == "delayed" else None,
                    attempts=row["attempts"],
                    request_id=row["request_id"],
                )
                for row in rows[start:stop]
            )
        )
        pushed += sum(1 for created in results if created)
    return pushed
