"""What the unit tests of the api's reads, cancel and DLQ use cases share: a background plan's
new execution, one dead-lettered through the in-memory lifecycle as the worker leaves it, and
feature flags given instead of read from Postgres."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

from opsconductor.common.fsm import ExecutionStatus
from opsconductor.lifecycle.facade import DeadLetter, ExecutionRecord, NewExecution
from opsconductor.lifecycle.fake import InMemoryLifecycle
from opsconductor.lifecycle.storage.flags import FeatureFlags, FlagCache
from tests.unit.roles_world import MEDIUM_MODIFY


class Flags(FlagCache):
    def __init__(self, flags: FeatureFlags) -> None:
        super().__init__(None)
        self.flags = flags

    async def get(self) -> FeatureFlags:
        return self.flags


def background_plan(tenant: str, **changes: Any) -> NewExecution:
    """A new background execution of a two-step medium modify plan (``changes`` applied)."""
    new = NewExecution(
        tenant_id=tenant,
        actor_id="alice",
        request_id="req-1",
        trace_context=None,
        idempotency_key=hashlib.sha256(uuid4().bytes).hexdigest(),
        plan_hash="a" * 64,
        plan_snapshot={"name": "dlq"},
        plan_snapshot_hash="b" * 64,
        execution_mode="background",
        sla_class="medium",
        action_class="modify",
        approval_level=0,
        priority=20,
        timeout_policy_id=MEDIUM_MODIFY.id,
        timeout_ms=30_000,
        estimated_duration_ms=1_000,
        record_only=False,
        steps=[("one", 0, "noop", "modify"), ("two", 1, "noop", "modify")],
    )
    return replace(new, **changes)


async def queued(lifecycle: InMemoryLifecycle, new: NewExecution) -> tuple[ExecutionRecord, UUID]:
    """``new`` created and queued, as a background submit leaves it: (record, job id)."""
    async with lifecycle.transaction() as tx:
        record, _ = await lifecycle.create(new, dedup_window=timedelta(hours=1), tx=tx)
        job = await lifecycle.enqueue(
            tx, record, MEDIUM_MODIFY, by="api", expected_from=ExecutionStatus.PENDING
        )
    return job.record, job.job_id


async def dead_lettered(
    lifecycle: InMemoryLifecycle, new: NewExecution, error_class: str = "ACTION_FAILED"
) -> tuple[ExecutionRecord, UUID]:
    """``new`` queued, run and ended failed on its last attempt: (record, its DLQ entry's id)."""
    record, _ = await queued(lifecycle, new)
    (job,) = await lifecycle.dequeue_batch("w1", 30.0, 1)
    await lifecycle.hand_off([job], worker_id="w1")
    await lifecycle.end_run(
        record.id,
        to=ExecutionStatus.FAILED,
        by="w1",
        lease_token=job.lease_token,
        fields={},
        tenant_id=record.tenant_id,
        dead_letter=DeadLetter(job, error_class, "boom"),
    )
    return await lifecycle.get(record.tenant_id, record.id), lifecycle.dlq[record.id].id
