"""The per-asset mutex against a real Postgres: exclusion under real races, no deadlock,
owner-tagged release, fencing on takeover, the reaper, and release on every way out (spec §3.2,
§3.5, DESIGN.md §3)."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest
from structlog.testing import capture_logs

from opsconductor.common.errors import ResourceBusyError, StaleLeaseError, StorageError
from opsconductor.lifecycle.storage.db import create_pool
from opsconductor.lifecycle.storage.locks import (
    LockRequest,
    LockSet,
    acquire_locks,
    check_lock_status,
    extend_locks,
    held_locks,
    reap_expired_locks,
    release_locks,
)

TTL = timedelta(seconds=30)
SPEC_KEY = "lock:v1:t1:server-01:restart"


def restart(target: str, tenant: str = "t1") -> LockRequest:
    return LockRequest(tenant, target, "restart")


async def lock_rows(pool: asyncpg.Pool) -> dict[str, UUID]:
    rows = await pool.fetch("SELECT lock_key, owner_token FROM execution_locks")
    return {row["lock_key"]: row["owner_token"] for row in rows}


async def backdate(pool: asyncpg.Pool, keys: list[str]) -> None:
    """Make these leases lapse now (an owner that stalled past its ttl), without waiting."""
    await pool.execute(
        "UPDATE execution_locks SET acquired_at = now() - interval '2 hours',"
        " expires_at = now() - interval '1 hour' WHERE lock_key = ANY($1::varchar[])",
        keys,
    )


async def eventually(condition: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def reaped_total(pool: asyncpg.Pool) -> int:
    """The stored count of reaped locks (exported by the api as opsc_mutex_reaped_total)."""
    return int(await pool.fetchval("SELECT value FROM metric_counters WHERE name = 'mutex_reaped'"))


# --- mutual exclusion under real races ------------------------------------------------------


async def test_fifty_connections_racing_for_one_key_yield_exactly_one_holder(db_dsn: str) -> None:
    """50 tasks on 50 server connections fire at once: one wins, 49 get ResourceBusyError naming
    the winner, and the table holds one row, the winner's."""
    pool = await create_pool(db_dsn, min_size=50, max_size=50)
    conns = [await pool.acquire() for _ in range(50)]
    try:
        go = asyncio.Event()

        async def contend(conn: Any) -> tuple[LockSet, UUID]:
            execution_id = uuid4()
            await go.wait()
            lock_set = await acquire_locks(
                conn,
                [restart("server-01")],
                owner_token=uuid4(),
                owner_execution_id=execution_id,
                ttl=TTL,
            )
            return lock_set, execution_id

        tasks = [asyncio.create_task(contend(conn)) for conn in conns]
        go.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        wins = [result for result in results if isinstance(result, tuple)]
        busy = [result for result in results if isinstance(result, ResourceBusyError)]
        assert len(wins) == 1, results
        assert len(busy) == 49, results
        (winner, winner_execution), *_ = wins
        assert {error.details["lock_key"] for error in busy} == {SPEC_KEY}
        assert {error.details["held_by_execution_id"] for error in busy} == {str(winner_execution)}
        rows = await conns[0].fetch("SELECT lock_key, owner_token FROM execution_locks")
        assert [tuple(row) for row in rows] == [(SPEC_KEY, winner.owner_token)]
    finally:
        for conn in conns:
            await pool.release(conn)
        await pool.close()


@pytest.mark.slow
async def test_twenty_plans_over_overlapping_targets_never_share_a_key_nor_deadlock(
    db_pool: asyncpg.Pool,
) -> None:
    """20 plans repeatedly take random overlapping subsets of 5 targets, in shuffled order.

    While a plan holds, no other plan holds any of its keys (in-process registry) and the table
    shows its owner token on each of them; a concurrent checker sees every owner's keys appear
    and disappear all at once. No deadlock error, bounded time, empty table afterwards.
    """
    targets = [f"server-{i:02d}" for i in range(5)]
    rounds_per_plan = 15
    holders: dict[str, int] = {}
    requested: dict[UUID, set[str]] = {}
    stats = {"acquired": 0, "busy": 0, "max_parallel_plans": 0, "snapshots": 0}
    done = asyncio.Event()

    async def plan(plan_id: int) -> None:
        rng = random.Random(plan_id)
        held = 0
        while held < rounds_per_plan:
            chosen = rng.sample(targets, rng.randint(2, 4))  # random subset, random order
            owner = uuid4()
            requested[owner] = {restart(target).key for target in chosen}
            try:
                async with held_locks(
                    db_pool, [restart(t) for t in chosen], ttl=TTL, owner_token=owner
                ) as lock_set:
                    for key in lock_set.keys:
                        assert key not in holders, f"{key}: plans {holders[key]} and {plan_id}"
                        holders[key] = plan_id
                    stats["max_parallel_plans"] = max(
                        stats["max_parallel_plans"], len(set(holders.values()))
                    )
                    rows = await db_pool.fetch(
                        "SELECT lock_key, owner_token FROM execution_locks"
                        " WHERE lock_key = ANY($1::varchar[])",
                        lock_set.keys,
                    )
                    assert {row["lock_key"]: row["owner_token"] for row in rows} == dict.fromkeys(
                        lock_set.keys, owner
                    )
                    await asyncio.sleep(rng.uniform(0, 0.002))  # work done under the lock
                    for key in lock_set.keys:
                        del holders[key]
                held += 1
                stats["acquired"] += 1
            except ResourceBusyError:
                stats["busy"] += 1
                await asyncio.sleep(rng.uniform(0, 0.003))  # back off before retrying

    async def checker() -> None:
        while not done.is_set():
            snapshot: dict[UUID, set[str]] = defaultdict(set)
            for key, owner in (await lock_rows(db_pool)).items():
                snapshot[owner].add(key)
            for owner, keys in snapshot.items():
                assert keys == requested[owner], "a plan's keys appeared or vanished one by one"
            stats["snapshots"] += 1

    check = asyncio.create_task(checker())
    started = time.perf_counter()
    async with asyncio.timeout(90):
        results = await asyncio.gather(*(plan(i) for i in range(20)), return_exceptions=True)
    elapsed = time.perf_counter() - started
    done.set()
    await check
    failures = [result for result in results if result is not None]
    assert not any(
        isinstance(failure.__cause__, asyncpg.DeadlockDetectedError) for failure in failures
    ), "deadlock between plans"
    assert not failures, failures
    assert stats["acquired"] == 20 * rounds_per_plan
    assert stats["busy"] > 0, "the plans never contended: the test proved nothing"
    assert stats["max_parallel_plans"] >= 2, "disjoint plans should have held at the same time"
    assert stats["snapshots"] > 0
    assert await lock_rows(db_pool) == {}
    print(  # figures for the closing report (run with -s)
        f"LOCK_BENCH contended: {stats['acquired']} lock sets in {elapsed:.2f}s "
        f"({stats['acquired'] / elapsed:.0f} sets/s, {stats['busy']} busy attempts, "
        f"{(stats['acquired'] + stats['busy']) / elapsed:.0f} attempts/s)"
    )


_PROCESS_WORKER = r"""
import asyncio, json, logging, random, sys, time
from datetime import timedelta

import structlog

from opsconductor.common.errors import ResourceBusyError
from opsconductor.lifecycle.storage.db import create_pool
from opsconductor.lifecycle.storage.locks import LockRequest, held_locks

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


async def main(dsn, out_path, seed, duration):
    rng = random.Random(seed)
    pool = await create_pool(dsn, min_size=1, max_size=2)
    targets = ["server-01", "server-02", "server-03"]
    intervals, busy = [], 0
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        chosen = rng.sample(targets, rng.randint(1, 2))
        requests = [LockRequest("t1", target, "restart") for target in chosen]
        try:
            async with held_locks(pool, requests, ttl=timedelta(seconds=60)) as lock_set:
                start = time.monotonic_ns()
                await asyncio.sleep(rng.uniform(0, 0.001))
                end = time.monotonic_ns()
            intervals.extend([key, start, end] for key in lock_set.keys)
        except ResourceBusyError:
            busy += 1
    await pool.close()
    with open(out_path, "w") as out:
        json.dump({"intervals": intervals, "busy": busy}, out)


asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
"""


@pytest.mark.slow
async def test_four_processes_hammering_overlapping_keys_never_overlap_holds(
    db_dsn: str, tmp_path: Path
) -> None:
    """4 OS processes acquire/release overlapping keys for 2 s, stamping each hold with the
    machine-wide monotonic clock: per key, no two hold intervals overlap."""
    outputs = [tmp_path / f"worker-{i}.json" for i in range(4)]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _PROCESS_WORKER,
            db_dsn,
            str(out),
            str(seed),
            "2.0",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for seed, out in enumerate(outputs)
    ]
    for proc in procs:  # every worker connected before any starts: they really race
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"ready\n"
    async with asyncio.timeout(60):
        finished = await asyncio.gather(*(proc.communicate(b"go\n") for proc in procs))
    for proc, (_, stderr) in zip(procs, finished, strict=True):
        assert proc.returncode == 0, stderr.decode()

    per_key: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    busy = 0
    for worker, out in enumerate(outputs):
        data = json.loads(out.read_text())
        busy += data["busy"]
        for key, start, end in data["intervals"]:
            per_key[key].append((start, end, worker))
    holds = sum(len(intervals) for intervals in per_key.values())
    assert busy > 0, "the processes never contended: the test proved nothing"
    assert len(per_key) == 3
    for key, intervals in per_key.items():
        assert len({worker for _, _, worker in intervals}) == 4, f"{key} not shared by all"
        intervals.sort()
        for (_, prev_end, prev_worker), (start, _, worker) in itertools.pairwise(intervals):
            assert start > prev_end, f"{key}: workers {prev_worker} and {worker} overlapped"
    pool = await create_pool(db_dsn)
    try:
        assert await lock_rows(pool) == {}
    finally:
        await pool.close()
    print(  # figures for the closing report (run with -s)
        f"LOCK_BENCH processes: {holds} key-holds, {busy} busy attempts in 2 s by 4 processes"
    )


# --- spec §3.2 contract, owner tags, fencing ------------------------------------------------


async def test_second_restart_of_a_held_server_fails_at_once(db_pool: asyncpg.Pool) -> None:
    """Spec §3.2: while server-01 is being restarted, a second restart fails in < 1 s with
    ResourceBusyError naming the key and the holder, and succeeds once the first is done."""
    first_execution = uuid4()
    entered, finish = asyncio.Event(), asyncio.Event()

    async def first_restart() -> None:
        async with held_locks(
            db_pool, [restart("server-01")], ttl=TTL, owner_execution_id=first_execution
        ):
            entered.set()
            await finish.wait()

    first = asyncio.create_task(first_restart())
    await entered.wait()
    started = time.perf_counter()
    with pytest.raises(ResourceBusyError) as busy:
        await acquire_locks(
            db_pool, [restart("server-01")], owner_token=uuid4(), owner_execution_id=None, ttl=TTL
        )
    assert time.perf_counter() - started < 1.0
    assert busy.value.reason == "RESOURCE_BUSY"
    assert busy.value.details == {
        "lock_key": SPEC_KEY,
        "held_by_execution_id": str(first_execution),
    }
    status = await check_lock_status(db_pool, "t1", "server-01", "restart")
    assert status is not None
    assert status.owner_execution_id == first_execution
    finish.set()
    await first
    assert await check_lock_status(db_pool, "t1", "server-01", "restart") is None
    second = await acquire_locks(
        db_pool, [restart("server-01")], owner_token=uuid4(), owner_execution_id=None, ttl=TTL
    )
    assert second.keys == [SPEC_KEY]


async def test_a_busy_key_makes_the_whole_plan_keep_nothing(db_pool: asyncpg.Pool) -> None:
    """All or nothing: a plan needing a free and a held key fails and keeps neither."""
    holder = await acquire_locks(
        db_pool, [restart("server-02")], owner_token=uuid4(), owner_execution_id=None, ttl=TTL
    )
    with pytest.raises(ResourceBusyError) as busy:
        await acquire_locks(
            db_pool,
            [restart("server-03"), restart("server-01"), restart("server-02")],
            owner_token=uuid4(),
            owner_execution_id=None,
            ttl=TTL,
        )
    assert busy.value.details["lock_key"] == "lock:v1:t1:server-02:restart"
    assert busy.value.details["held_by_execution_id"] is None
    assert await lock_rows(db_pool) == {"lock:v1:t1:server-02:restart": holder.owner_token}


async def test_same_target_in_two_tenants_or_actions_are_distinct_locks(
    db_pool: asyncpg.Pool,
) -> None:
    """The key scopes a lock to (tenant, target, action); duplicates in one plan count once."""
    requests = [
        restart("server-01", "t1"),
        restart("server-01", "t2"),
        LockRequest("t1", "server-01", "deploy"),
        restart("server-01", "t1"),
    ]
    lock_set = await acquire_locks(
        db_pool, requests, owner_token=uuid4(), owner_execution_id=None, ttl=TTL
    )
    assert lock_set.keys == [
        "lock:v1:t1:server-01:deploy",
        "lock:v1:t1:server-01:restart",
        "lock:v1:t2:server-01:restart",
    ]
    assert len(set(lock_set.fencing_tokens.values())) == 3
    assert await release_locks(db_pool, lock_set) == 3


async def test_release_with_a_wrong_owner_token_deletes_nothing(db_pool: asyncpg.Pool) -> None:
    """Spec §3.2 owner tags: someone presenting the right keys but not the owner token frees
    nothing; the owner then frees everything; releasing twice is harmless."""
    owner = await acquire_locks(
        db_pool,
        [restart("server-01"), restart("server-02")],
        owner_token=uuid4(),
        owner_execution_id=None,
        ttl=TTL,
    )
    impostor = LockSet(uuid4(), owner.locks)
    assert await release_locks(db_pool, impostor) == 0
    assert await lock_rows(db_pool) == dict.fromkeys(owner.keys, owner.owner_token)
    assert await release_locks(db_pool, owner) == 2
    assert await release_locks(db_pool, owner) == 0
    assert await lock_rows(db_pool) == {}


async def test_expired_lock_is_taken_over_with_a_larger_fencing_token(
    db_pool: asyncpg.Pool,
) -> None:
    """An owner that stalls past its ttl loses the lock: the taker gets a strictly larger fencing
    token; the old owner's release frees nothing and its extend raises StaleLeaseError."""
    old_execution, new_execution = uuid4(), uuid4()
    old = await acquire_locks(
        db_pool,
        [restart("server-01")],
        owner_token=uuid4(),
        owner_execution_id=old_execution,
        ttl=TTL,
    )
    await backdate(db_pool, old.keys)
    assert await check_lock_status(db_pool, "t1", "server-01", "restart") is None
    new = await acquire_locks(
        db_pool,
        [restart("server-01")],
        owner_token=uuid4(),
        owner_execution_id=new_execution,
        ttl=TTL,
    )
    assert new.fencing_tokens[SPEC_KEY] > old.fencing_tokens[SPEC_KEY]
    assert await release_locks(db_pool, old) == 0
    with pytest.raises(StaleLeaseError) as lost:
        await extend_locks(db_pool, old, TTL)
    assert lost.value.details == {"lost_keys": [SPEC_KEY]}
    status = await check_lock_status(db_pool, "t1", "server-01", "restart")
    assert status is not None
    assert (status.owner_execution_id, status.fencing_token) == (
        new_execution,
        new.fencing_tokens[SPEC_KEY],
    )


async def test_lease_lapses_by_itself_after_its_ttl(db_pool: asyncpg.Pool) -> None:
    """With no reaper and no backdating, a lock is free once its ttl has passed on the DB clock."""
    lock_set = await acquire_locks(
        db_pool,
        [restart("server-01")],
        owner_token=uuid4(),
        owner_execution_id=None,
        ttl=timedelta(milliseconds=50),
    )

    async def free() -> bool:
        return await check_lock_status(db_pool, "t1", "server-01", "restart") is None

    await eventually(free)
    taker = await acquire_locks(
        db_pool, [restart("server-01")], owner_token=uuid4(), owner_execution_id=None, ttl=TTL
    )
    assert taker.fencing_tokens[SPEC_KEY] > lock_set.fencing_tokens[SPEC_KEY]


async def test_extend_pushes_expiry_and_revives_an_untaken_lapsed_lease(
    db_pool: asyncpg.Pool,
) -> None:
    """The owner can extend a live lease, and one that lapsed but nobody took (same fencing token,
    since nobody else held it in between)."""
    lock_set = await acquire_locks(
        db_pool,
        [restart("server-01"), restart("server-02")],
        owner_token=uuid4(),
        owner_execution_id=None,
        ttl=timedelta(seconds=5),
    )
    longer = await extend_locks(db_pool, lock_set, timedelta(minutes=10))
    assert longer.keys == lock_set.keys
    assert longer.fencing_tokens == lock_set.fencing_tokens
    assert longer.expires_at is not None
    assert lock_set.expires_at is not None
    assert longer.expires_at > lock_set.expires_at
    await backdate(db_pool, lock_set.keys)
    revived = await extend_locks(db_pool, lock_set, TTL)
    assert revived.fencing_tokens == lock_set.fencing_tokens
    assert await check_lock_status(db_pool, "t1", "server-02", "restart") is not None


async def test_extend_is_all_or_nothing_when_one_key_was_taken_over(
    db_pool: asyncpg.Pool,
) -> None:
    """If one key of a set was lost, extend names only that key and extends none of the others."""
    old = await acquire_locks(
        db_pool,
        [restart("server-01"), restart("server-02")],
        owner_token=uuid4(),
        owner_execution_id=None,
        ttl=TTL,
    )
    await backdate(db_pool, old.keys)
    await acquire_locks(
        db_pool, [restart("server-02")], owner_token=uuid4(), owner_execution_id=None, ttl=TTL
    )
    with pytest.raises(StaleLeaseError) as lost:
        await extend_locks(db_pool, old, TTL)
    assert lost.value.details["lost_keys"] == ["lock:v1:t1:server-02:restart"]
    assert await check_lock_status(db_pool, "t1", "server-01", "restart") is None


# --- the reaper -----------------------------------------------------------------------------


async def test_concurrent_reapers_remove_only_expired_locks_and_count_each_once(
    db_pool: asyncpg.Pool,
) -> None:
    """8 reapers race over 3 expired and 2 live locks: the 3 expired go, counted exactly once in
    the return values, the log and the stored counter behind opsc_mutex_reaped_total; the live
    ones stay."""
    live = await acquire_locks(
        db_pool,
        [restart("live-1"), restart("live-2")],
        owner_token=uuid4(),
        owner_execution_id=None,
        ttl=TTL,
    )
    stale_keys: list[str] = []
    for target in ("stale-1", "stale-2", "stale-3"):
        stale = await acquire_locks(
            db_pool, [restart(target)], owner_token=uuid4(), owner_execution_id=None, ttl=TTL
        )
        stale_keys += stale.keys
    await backdate(db_pool, stale_keys)
    before = await reaped_total(db_pool)
    with capture_logs() as logs:
        counts = await asyncio.gather(*(reap_expired_locks(db_pool) for _ in range(8)))
    assert sum(counts) == 3
    assert await reaped_total(db_pool) - before == 3
    assert sum(entry["count"] for entry in logs if entry["event"] == "locks_reaped") == 3
    assert await lock_rows(db_pool) == dict.fromkeys(live.keys, live.owner_token)
    assert await reap_expired_locks(db_pool) == 0
    assert await reaped_total(db_pool) - before == 3


# --- release on every way out of held_locks -------------------------------------------------


async def test_held_locks_releases_on_success_and_on_exception(db_pool: asyncpg.Pool) -> None:
    """Spec §3.2: the mutex is released when the body returns and when it raises."""
    async with held_locks(db_pool, [restart("server-01")], ttl=TTL) as lock_set:
        assert await lock_rows(db_pool) == {SPEC_KEY: lock_set.owner_token}
    assert await lock_rows(db_pool) == {}

    with pytest.raises(RuntimeError, match="step failed"):
        async with held_locks(db_pool, [restart("server-01")], ttl=TTL):
            raise RuntimeError("step failed")
    assert await lock_rows(db_pool) == {}


async def test_held_locks_releases_when_the_task_is_cancelled_mid_hold(
    db_pool: asyncpg.Pool,
) -> None:
    """Spec §3.5: cancelling the holder releases the lock before the cancelled task finishes."""
    entered = asyncio.Event()

    async def hold() -> None:
        async with held_locks(db_pool, [restart("server-01")], ttl=TTL):
            entered.set()
            await asyncio.Event().wait()  # a step that never ends by itself

    task = asyncio.create_task(hold())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await check_lock_status(db_pool, "t1", "server-01", "restart") is None


async def test_release_survives_a_second_cancellation_while_it_runs(
    db_pool: asyncpg.Pool, db_dsn: str
) -> None:
    """A task cancelled again while its release is blocked still releases: the DELETE is shielded
    and completes once the row it waits for is free."""
    entered = asyncio.Event()

    async def hold() -> None:
        async with held_locks(db_pool, [restart("server-01")], ttl=TTL):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(hold())
    await entered.wait()
    blocker = await asyncpg.connect(db_dsn)
    try:
        blocking = blocker.transaction()
        await blocking.start()
        await blocker.execute(
            "SELECT 1 FROM execution_locks WHERE lock_key = $1 FOR UPDATE", SPEC_KEY
        )
        task.cancel()

        async def release_is_waiting() -> bool:
            waiting = await db_pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE '%DELETE FROM execution_locks%'"
                " AND pid <> pg_backend_pid()"
            )
            return bool(waiting)

        await eventually(release_is_waiting)
        task.cancel()  # cancelled again while the release is in flight
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await lock_rows(db_pool) != {}  # the release is still blocked...
        await blocking.rollback()
    finally:
        await blocker.close()

    async def released() -> bool:
        return await lock_rows(db_pool) == {}

    await eventually(released)  # ...and completes after its caller is gone


async def test_cancelling_a_blocked_acquire_leaves_no_lock_behind(
    db_pool: asyncpg.Pool, db_dsn: str
) -> None:
    """A plan cancelled while its acquire waits on another transaction's insert of the same key
    ends promptly and holds nothing afterwards."""
    blocker = await asyncpg.connect(db_dsn)
    try:
        blocking = blocker.transaction()
        await blocking.start()
        await blocker.execute(
            "INSERT INTO execution_locks (lock_key, tenant_id, target_ref, action, owner_token,"
            " expires_at) VALUES ($1, 't1', 'server-01', 'restart', $2, now() + interval '1 min')",
            SPEC_KEY,
            uuid4(),
        )
        owner = uuid4()

        async def hold() -> None:
            async with held_locks(db_pool, [restart("server-01")], ttl=TTL, owner_token=owner):
                raise AssertionError("the blocked acquire must not succeed")

        task = asyncio.create_task(hold())

        async def acquire_is_waiting() -> bool:
            waiting = await db_pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO execution_locks%'"
                " AND pid <> $1",
                blocker.get_server_pid(),
            )
            return bool(waiting)

        await eventually(acquire_is_waiting)
        task.cancel()
        async with asyncio.timeout(5):
            with pytest.raises(asyncio.CancelledError):
                await task
        await blocking.rollback()
    finally:
        await blocker.close()
    assert await lock_rows(db_pool) == {}


async def test_held_locks_logs_but_does_not_raise_a_failed_release(db_dsn: str) -> None:
    """If the database is gone at release time, the body's outcome stands, the failure is logged
    as locks_release_failed, and the lease is left to lapse at its expiry."""
    pool = await create_pool(db_dsn)
    with capture_logs() as logs:
        async with held_locks(pool, [restart("server-01")], ttl=TTL):
            pool.terminate()
    assert [entry["lock_keys"] for entry in logs if entry["event"] == "locks_release_failed"] == [
        [SPEC_KEY]
    ]
    survivor = await create_pool(db_dsn)
    try:
        assert SPEC_KEY in await lock_rows(survivor)
    finally:
        await survivor.close()


# --- waiting, transactions, errors ----------------------------------------------------------


async def test_acquire_with_wait_gets_the_lock_once_the_holder_releases(
    db_pool: asyncpg.Pool,
) -> None:
    """Opt-in waiting: a waiter retries while the key is busy and wins when it is freed."""
    holder = await acquire_locks(
        db_pool, [restart("server-01")], owner_token=uuid4(), owner_execution_id=None, ttl=TTL
    )
    with capture_logs() as logs:
        waiter = asyncio.create_task(
            acquire_locks(
                db_pool,
                [restart("server-01")],
                owner_token=uuid4(),
                owner_execution_id=None,
                ttl=TTL,
                wait=timedelta(seconds=10),
            )
        )

        async def waiter_was_refused() -> bool:
            return any(entry["event"] == "lock_busy" for entry in logs)

        await eventually(waiter_was_refused)
        assert not waiter.done()
        await release_locks(db_pool, holder)
        lock_set = await asyncio.wait_for(waiter, 10)
    assert await lock_rows(db_pool) == {SPEC_KEY: lock_set.owner_token}


async def test_acquire_with_wait_gives_up_at_its_deadline(db_pool: asyncpg.Pool) -> None:
    """A waiter whose deadline passes while the key stays held gets ResourceBusyError."""
    await acquire_locks(
        db_pool, [restart("server-01")], owner_token=uuid4(), owner_execution_id=None, ttl=TTL
    )
    started = time.perf_counter()
    with pytest.raises(ResourceBusyError):
        await acquire_locks(
            db_pool,
            [restart("server-01")],
            owner_token=uuid4(),
            owner_execution_id=None,
            ttl=TTL,
            wait=timedelta(milliseconds=200),
        )
    assert 0.2 <= time.perf_counter() - started < 3.0


async def test_acquire_on_a_connection_follows_the_callers_transaction(
    db_pool: asyncpg.Pool,
) -> None:
    """Given a connection inside a transaction, the locks commit or roll back with the caller."""

    async def lock_then_roll_back(conn: Any) -> None:
        async with conn.transaction():
            await acquire_locks(
                conn, [restart("server-01")], owner_token=uuid4(), owner_execution_id=None, ttl=TTL
            )
            raise RuntimeError("caller rolls back")

    async with db_pool.acquire() as conn:
        with pytest.raises(RuntimeError, match="caller rolls back"):
            await lock_then_roll_back(conn)
    assert await lock_rows(db_pool) == {}


async def test_empty_requests_and_bad_ttl(db_pool: asyncpg.Pool) -> None:
    """No targets means no locks and no SQL; a non-positive ttl is a programming error."""
    empty = await acquire_locks(db_pool, [], owner_token=uuid4(), owner_execution_id=None, ttl=TTL)
    assert empty.locks == ()
    assert await release_locks(db_pool, empty) == 0
    assert await extend_locks(db_pool, empty, TTL) is empty
    for ttl in (timedelta(0), timedelta(seconds=-1)):
        with pytest.raises(ValueError, match="ttl"):
            await acquire_locks(
                db_pool, [restart("a")], owner_token=uuid4(), owner_execution_id=None, ttl=ttl
            )
        with pytest.raises(ValueError, match="ttl"):
            await extend_locks(db_pool, empty, ttl)


async def test_driver_errors_become_storage_errors_with_their_cause(db_dsn: str) -> None:
    """A dead connection surfaces as StorageError (reason STORAGE_ERROR) chained to the driver
    error, from every operation."""
    conn = await asyncpg.connect(db_dsn)
    await conn.close()
    held = await _held_one(db_dsn)
    operations: list[Callable[[], Awaitable[object]]] = [
        lambda: acquire_locks(
            conn, [restart("a")], owner_token=uuid4(), owner_execution_id=None, ttl=TTL
        ),
        lambda: release_locks(conn, held),
        lambda: extend_locks(conn, held, TTL),
        lambda: check_lock_status(conn, "t1", "a", "restart"),
        lambda: reap_expired_locks(conn),
    ]
    for operation in operations:
        with pytest.raises(StorageError) as failure:
            await operation()
        assert failure.value.reason == "STORAGE_ERROR"
        assert isinstance(failure.value.__cause__, asyncpg.InterfaceError)


async def _held_one(dsn: str) -> LockSet:
    pool = await create_pool(dsn)
    try:
        return await acquire_locks(
            pool, [restart("a")], owner_token=uuid4(), owner_execution_id=None, ttl=TTL
        )
    finally:
        await pool.close()


async def test_same_execution_retakes_its_locks_with_a_new_fencing_token(
    db_pool: asyncpg.Pool,
) -> None:
    """A job taken over after its worker died re-takes the execution's own live locks at once
    (new owner, larger fencing token); the old owner can then neither release nor extend them,
    and another execution still finds them busy."""
    execution = uuid4()
    requests = [
        LockRequest("t1", "server-01", "restart"),
        LockRequest("t1", "server-02", "restart"),
    ]
    first = await acquire_locks(
        db_pool,
        requests,
        owner_token=uuid4(),
        owner_execution_id=execution,
        ttl=timedelta(minutes=5),
    )
    second = await acquire_locks(
        db_pool,
        requests,
        owner_token=uuid4(),
        owner_execution_id=execution,
        ttl=timedelta(minutes=5),
    )
    for key in first.keys:
        assert second.fencing_tokens[key] > first.fencing_tokens[key]
    assert await release_locks(db_pool, first) == 0
    with pytest.raises(StaleLeaseError):
        await extend_locks(db_pool, first, timedelta(minutes=5))
    with pytest.raises(ResourceBusyError):
        await acquire_locks(
            db_pool,
            requests,
            owner_token=uuid4(),
            owner_execution_id=uuid4(),
            ttl=timedelta(minutes=5),
        )
    assert await release_locks(db_pool, second) == 2
