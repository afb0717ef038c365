"""Decoding queue records from Redis job hashes, and the queue's argument checks (no I/O:
building a ``RedisQueue`` registers its scripts locally and opens no connection)."""

from __future__ import annotations

from uuid import uuid4

import pytest
from redis.asyncio import Redis

from opsconductor.lifecycle.queue import (
    KEY_VERSION,
    LeasedJob,
    MaintenanceReport,
    QueuedJob,
    QueueStats,
    RedisQueue,
)
from opsconductor.lifecycle.queue.records import decode_hash

JOB, EXECUTION, TOKEN = uuid4(), uuid4(), uuid4()
HASH = {
    "job_id": str(JOB),
    "execution_id": str(EXECUTION),
    "tenant_id": "t1",
    "priority": "50",
    "score": "500000000000001",
    "state": "leased",
    "attempts": "1",
    "max_attempts": "3",
    "lease_renewals": "0",
    "max_lease_renewals": "1",
    "lease_expirations": "1",
    "deliveries": "2",
    "enqueued_at": "1700000000000",
    "ready_at": "1700000000000",
    "lease_token": str(TOKEN),
    "worker_id": "worker-01",
    "lease_deadline": "1700000300500",
    "leased_at": "1700000000500",
}


def test_hgetall_pairs_in_bytes_and_mappings_decode_alike() -> None:
    pairs: list[bytes | str] = []
    for key, value in HASH.items():
        pairs += [key.encode(), value.encode()]
    assert decode_hash(pairs) == HASH
    assert decode_hash({k.encode(): v.encode() for k, v in HASH.items()}) == HASH
    assert decode_hash(HASH) == HASH


def test_a_leased_job_is_decoded_with_times_in_seconds() -> None:
    job = LeasedJob.from_hash(HASH)
    assert (job.job_id, job.execution_id, job.lease_token) == (JOB, EXECUTION, TOKEN)
    assert (job.priority, job.attempts, job.max_attempts, job.deliveries) == (50, 1, 3, 2)
    assert job.lease_deadline == 1_700_000_300.5
    assert job.enqueued_at == 1_700_000_000.0
    assert job.renewals_left == 1
    assert job.last_error is None


def test_a_snapshot_keeps_optional_fields_optional() -> None:
    fields = {k: v for k, v in HASH.items() if k not in {"lease_token", "worker_id"}}
    fields |= {"state": "delayed", "available_at": "1700000002000.0"}
    del fields["lease_deadline"]
    fields["last_error"] = '{"message": "boom", "error_class": "HTTPError"}'
    job = QueuedJob.from_hash(fields)
    assert (job.state, job.available_at, job.worker_id, job.lease_deadline) == (
        "delayed",
        1_700_000_002.0,
        None,
        None,
    )
    assert job.last_error == {"message": "boom", "error_class": "HTTPError"}


def test_a_non_object_last_error_is_wrapped() -> None:
    job = QueuedJob.from_hash(HASH | {"last_error": '"plain"'})
    assert job.last_error == {"message": "plain"}


def test_renewals_left_never_goes_negative() -> None:
    assert LeasedJob.from_hash(HASH | {"lease_renewals": "5"}).renewals_left == 0


def test_stats_total_ready_and_reports_add_up() -> None:
    stats = QueueStats({0: 2, 100: 3}, 1, 0, 4, 0, None, False)
    assert stats.ready == 5
    assert MaintenanceReport(1, 2, 3) + MaintenanceReport(1, 1, 1) == MaintenanceReport(2, 3, 4)


@pytest.fixture
def queue() -> RedisQueue:
    # Never connected: a port nothing listens on would fail any real call.
    return RedisQueue(Redis(host="127.0.0.1", port=1), prefix="unit:")


def test_keys_carry_the_version_prefix(queue: RedisQueue) -> None:
    assert KEY_VERSION == "v2"
    assert queue.key_prefix == "unit:q:v2:"
    assert queue.job_key(str(JOB)) == f"unit:q:v2:job:{JOB}"
    assert RedisQueue(Redis(), clock=lambda: 42.0).now() == 42.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"priority": 101}, "priority"),
        ({"priority": -1}, "priority"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_lease_renewals": -1}, "max_lease_renewals"),
        ({"attempts": 3}, "attempts"),
        ({"attempts": -1}, "attempts"),
    ],
)
async def test_enqueue_refuses_invalid_arguments(
    queue: RedisQueue, kwargs: dict[str, int], message: str
) -> None:
    args = {"priority": 50, "max_attempts": 3, "max_lease_renewals": 1} | kwargs
    attempts = args.pop("attempts", 0)
    with pytest.raises(ValueError, match=message):
        await queue.enqueue(uuid4(), uuid4(), "t1", **args, attempts=attempts)


async def test_lease_lengths_and_delays_are_checked(queue: RedisQueue) -> None:
    with pytest.raises(ValueError, match="lease_s"):
        await queue.dequeue("w", 0)
    with pytest.raises(ValueError, match="lease_s"):
        await queue.renew(uuid4(), uuid4(), 0.0001)
    with pytest.raises(ValueError, match="delay_s"):
        await queue.release(uuid4(), uuid4(), delay_s=-1)
    with pytest.raises(ValueError, match=r"hexadecimal"):
        await queue.ack("not-a-uuid", uuid4())


def test_construction_checks_its_settings() -> None:
    with pytest.raises(ValueError, match="maintenance_batch"):
        RedisQueue(Redis(), maintenance_batch=0)
    with pytest.raises(ValueError, match="max_backoff_s"):
        RedisQueue(Redis(), max_backoff_s=0)


async def test_dead_jobs_needs_a_positive_limit(queue: RedisQueue) -> None:
    with pytest.raises(ValueError, match="limit"):
        await queue.dead_jobs(0)


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_job_carries_the_correlation_of_the_request_that_queued_it() -> None:
    job = LeasedJob.from_hash(HASH | {"request_id": "req-42", "traceparent": TRACEPARENT})
    assert (job.request_id, job.trace_context) == ("req-42", TRACEPARENT)
    # Queued before jobs carried it: none (the worker falls back to the execution's).
    assert (LeasedJob.from_hash(HASH).request_id, QueuedJob.from_hash(HASH).trace_context) == (
        None,
        None,
    )


@pytest.mark.parametrize(
    "request_id",
    ["", "x" * 101, "has space", "line\nbreak", '{"event": "forged"}', "é"],
)
def test_a_malformed_or_oversized_request_id_from_redis_is_dropped(request_id: str) -> None:
    job = LeasedJob.from_hash(HASH | {"request_id": request_id, "traceparent": TRACEPARENT})
    assert (job.request_id, job.trace_context) == (None, TRACEPARENT)


@pytest.mark.parametrize(
    "traceparent",
    [
        "",
        TRACEPARENT + "-00",  # longer than version 00 allows
        TRACEPARENT.upper(),
        "01" + TRACEPARENT[2:],  # another version: not carried
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero span id
        "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        "x" * 100_000,
    ],
)
def test_a_malformed_or_oversized_traceparent_from_redis_is_dropped(traceparent: str) -> None:
    job = QueuedJob.from_hash(HASH | {"request_id": "req-1", "traceparent": traceparent})
    assert (job.request_id, job.trace_context) == ("req-1", None)
