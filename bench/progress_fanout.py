"""Fan-out of one execution's events to many live subscribers of one progress process.

    python bench/progress_fanout.py [--subscribers 1000] [--events 40] [--interval-ms 100]

What it does: its own database (``DATABASE_URL``'s server, or an embedded Postgres), one
execution, one ``python -m opsconductor.progress`` process; ``--subscribers`` gRPC
``StreamEvents`` subscribers, spread over ``--client-processes`` client processes (so the
subscribers' own decoding does not queue behind one interpreter), all subscribed before the
first event. This process then commits ``--events`` events plus ``execution_completed``, one
per ``--interval-ms``, noting the wall-clock time each commit returned; every subscriber notes
when each event arrived. Delivery latency = arrival - commit (same machine, same clock).

Printed: every subscriber got every event exactly once in order (or how many did not), p50 /
p95 / p99 / max delivery latency over all (subscriber, event) pairs, and the progress process's
peak RSS (``VmHWM``). Targets (issue 11): p95 <= 50 ms, peak RSS <= 150 MB at 1 000
subscribers. ``--output`` writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import grpc.aio
from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import percentile
from _stack import (
    ChildProcess,
    _start_embedded_postgres,
    peak_rss_mb,
    start_child,
    wait_serving,
    with_database,
)

from opsconductor.common.auth import issue_token
from opsconductor.execution.v1 import progress_service_pb2, progress_service_pb2_grpc
from opsconductor.lifecycle.storage.db import create_pool
from opsconductor.lifecycle.storage.events import append_event
from opsconductor.lifecycle.storage.migrate import migrate_up
from opsconductor.lifecycle.storage.role_bindings import bind_role

TENANT = "bench-progress"
ACTOR = "bench-viewer"
AUDIENCE = "opsconductor-execution"


# -- the client processes ---------------------------------------------------------------------


async def _subscribers(address: str, token: str, execution_id: str, count: int) -> None:
    """Run ``count`` subscribers; print one JSON line: per subscriber, (seq, arrival) pairs."""
    channels = [grpc.aio.insecure_channel(address) for _ in range(max(1, count // 100))]
    metadata = (("authorization", f"Bearer {token}"),)
    request = progress_service_pb2.StreamEventsRequest(tenant_id=TENANT, execution_id=execution_id)
    ready = 0
    all_ready = asyncio.Event()

    async def one(index: int) -> list[tuple[int, float]]:
        nonlocal ready
        stub = progress_service_pb2_grpc.ProgressServiceStub(channels[index % len(channels)])
        call = stub.StreamEvents(request, metadata=metadata)
        await call.wait_for_connection()  # the server sends headers once subscribed
        ready += 1
        if ready == count:
            all_ready.set()
        got = []
        async for response in call:
            got.append((response.event.seq, time.time()))
        return got

    tasks = [asyncio.ensure_future(one(i)) for i in range(count)]
    await all_ready.wait()
    print(json.dumps({"ready": True}), flush=True)
    results = await asyncio.gather(*tasks)
    print(json.dumps({"results": results}), flush=True)
    for channel in channels:
        await channel.close()


def _client_main(argv: list[str]) -> int:
    address, token, execution_id, count = argv
    asyncio.run(_subscribers(address, token, execution_id, int(count)))
    return 0


# -- the driver -------------------------------------------------------------------------------


async def _new_execution(pool: asyncpg.Pool) -> UUID:
    execution_id: UUID = await pool.fetchval(
        """
        INSERT INTO executions (tenant_id, actor_id, idempotency_key, plan_hash, plan_snapshot,
            plan_snapshot_hash, execution_mode, sla_class, action_class, timeout_ms)
        VALUES ($1, 'bench', $2, $3, $4, $5, 'background', 'medium', 'read', 30000)
        RETURNING id
        """,
        TENANT,
        secrets.token_hex(32),
        "a" * 64,
        {"name": "fanout", "steps": []},
        "b" * 64,
    )
    return execution_id


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="opsc-bench-progress-"))
    stop_pg = None
    server = os.environ.get("DATABASE_URL")
    if server:
        admin_dsn = with_database(server, "postgres")
    else:
        admin_dsn, stop_pg = await asyncio.to_thread(_start_embedded_postgres, work / "pg")
    database = f"opsc_bench_progress_{os.getpid()}_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{database}"')
    await admin.close()
    dsn = with_database(admin_dsn, database)
    key = secrets.token_hex(32)
    progress: ChildProcess | None = None
    clients: list[subprocess.Popen[bytes]] = []
    try:
        await migrate_up(dsn)
        pool = await create_pool(dsn, min_size=1, max_size=4)
        await bind_role(pool, TENANT, ACTOR, "viewer", created_by="bench")
        execution_id = await _new_execution(pool)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPSC_")}
        env.update(
            {
                "OPSC_DATABASE_URL": dsn,
                "OPSC_JWT_HS256_KEY": key,
                "OPSC_JWT_AUDIENCE": AUDIENCE,
                "OPSC_GRPC_PORT": "0",
                "OPSC_HTTP_PORT": "0",
                "OPSC_LOG_LEVEL": "WARNING",
                "OPSC_MAX_SUBSCRIBERS_PER_TENANT": str(args.subscribers + 10),
                "OPSC_MAX_SUBSCRIBERS": str(args.subscribers + 10),
                "OPSC_GRPC_MAX_CONCURRENT_RPCS": str(args.subscribers + 100),
            }
        )
        progress = await start_child(
            "progress", [sys.executable, "-m", "opsconductor.progress"], env, work
        )
        await wait_serving(progress)
        rss_idle = peak_rss_mb(progress.process.pid)
        token = issue_token(
            actor_id=ACTOR,
            tenant_id=TENANT,
            hs256_key=SecretStr(key),
            audience=AUDIENCE,
            ttl=timedelta(hours=1),
        )
        per_client = [
            args.subscribers // args.client_processes
            + (1 if i < args.subscribers % args.client_processes else 0)
            for i in range(args.client_processes)
        ]
        for count in per_client:
            clients.append(
                subprocess.Popen(  # noqa: ASYNC220 - started once, before any measurement
                    [
                        sys.executable,
                        __file__,
                        "--client",
                        progress.address,
                        token,
                        str(execution_id),
                        str(count),
                    ],
                    stdout=subprocess.PIPE,
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
            )
        for client in clients:
            assert client.stdout is not None
            line = await asyncio.to_thread(client.stdout.readline)
            if not line:
                raise RuntimeError("a client process died before its subscribers were ready")
        # Every subscriber is live (its stream replayed nothing: no event yet). Now commit.
        committed: dict[int, float] = {}
        async with pool.acquire() as conn:
            for index in range(args.events + 1):
                last = index == args.events
                async with conn.transaction():
                    seq = await append_event(
                        conn,
                        tenant_id=TENANT,
                        execution_id=execution_id,
                        actor_id="bench",
                        type="execution_completed" if last else "step_progress",
                        payload={"status": "succeeded"} if last else {"n": index},
                    )
                committed[seq] = time.time()
                await asyncio.sleep(args.interval_ms / 1000)
        outputs = []
        for client in clients:
            assert client.stdout is not None
            line = await asyncio.to_thread(client.stdout.readline)
            outputs.append(json.loads(line)["results"])
            await asyncio.to_thread(client.wait, 30)
        rss_peak = peak_rss_mb(progress.process.pid)
        await pool.close()
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
        if progress is not None:
            progress.stop()
        admin = await asyncpg.connect(admin_dsn)
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
        if stop_pg is not None:
            await asyncio.to_thread(stop_pg)
    expected = list(range(1, args.events + 2))
    latencies = []
    complete = 0
    subscribers = [sub for output in outputs for sub in output]
    for received in subscribers:
        if [seq for seq, _ in received] == expected:
            complete += 1
        latencies.extend(arrived - committed[seq] for seq, arrived in received)
    ordered = sorted(x * 1000 for x in latencies)
    return {
        "subscribers": len(subscribers),
        "events_per_subscriber": len(expected),
        "subscribers_with_every_event_once_in_order": complete,
        "deliveries": len(ordered),
        "latency_p50_ms": round(percentile(ordered, 50), 2),
        "latency_p95_ms": round(percentile(ordered, 95), 2),
        "latency_p99_ms": round(percentile(ordered, 99), 2),
        "latency_max_ms": round(ordered[-1], 2),
        "progress_rss_idle_mb": round(rss_idle or 0, 1),
        "progress_peak_rss_mb": round(rss_peak or 0, 1),
        "interval_ms": args.interval_ms,
        "postgres": "external" if server else "embedded",
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        return _client_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--events", type=int, default=40)
    parser.add_argument("--interval-ms", type=float, default=100)
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    figures = asyncio.run(run(args))
    print(
        f"progress fan-out: {figures['subscribers']} gRPC subscribers of one execution, "
        "one progress process"
    )
    for key, value in figures.items():
        print(f"  {key:45} {value}")
    ok = (
        figures["subscribers_with_every_event_once_in_order"] == figures["subscribers"]
        and figures["subscribers"] == args.subscribers
    )
    print(
        f"  targets: p95 <= 50 ms {'met' if figures['latency_p95_ms'] <= 50 else 'MISSED'}, "
        f"peak RSS <= 150 MB {'met' if figures['progress_peak_rss_mb'] <= 150 else 'MISSED'}"
    )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
