"""Fan-out of one execution's events to many live subscribers of one progress process.

    python bench/progress_fanout.py [--transport grpc|sse] [--subscribers 1000] [--events 40]
        [--interval-ms 100] [--repeat 3] [--client raw|grpcio] [--profile DIR]

What it does: its own database (``DATABASE_URL``'s server, or an embedded Postgres), one
execution, one ``python -m opsconductor.progress`` process; ``--subscribers`` subscribers of
``StreamEvents`` (gRPC) or of the SSE route, spread over ``--client-processes`` client
processes, all subscribed before the first event. This process then commits ``--events``
events plus ``execution_completed``, one per ``--interval-ms``, noting the wall-clock time each
commit returned; every subscriber notes when each event arrived. Delivery latency = arrival -
commit (same machine, same clock).

The subscribers share the machine's cores with the process they measure, so by default they
are as light as can be (``--client raw``, :mod:`_fanout_clients`: the wire protocol from an
``asyncio.Protocol``, one timestamp per socket read, decoded after the run). ``--client
grpcio`` uses grpc.aio stubs instead (protobuf decoded and a coroutine resumed per message:
its own cost shows up in the latency).

Printed: every subscriber got every event exactly once in order (or how many did not), p50 /
p95 / p99 / max delivery latency over all (subscriber, event) pairs, the progress process's
peak RSS (``VmHWM``) and its CPU time per delivery (less sensitive to the machine's load than
latency); with ``--repeat`` each run's figures and their median. Targets (issue 11): p95 <= 50
ms, peak RSS <= 150 MB at 1 000 subscribers. ``--output`` writes the figures as JSON;
``--profile DIR`` records every process with py-spy (not a dependency: ``pip install py-spy``
into the venv) as collapsed stacks in ``DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
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

from _fanout_clients import run_clients
from _measure import percentile
from _stack import (
    ChildProcess,
    _start_embedded_postgres,
    cpu_seconds,
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
#: How long a client process waits for its streams to end after the last commit.
_CLIENT_END_TIMEOUT_S = 60
ACTOR = "bench-viewer"
AUDIENCE = "opsconductor-execution"


# -- the client processes ---------------------------------------------------------------------


async def _grpcio_subscribers(address: str, token: str, execution_id: str, count: int) -> None:
    """``--client grpcio``: ``count`` grpc.aio subscribers (protobuf decoded per message)."""
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
    print(json.dumps({"results": results, "errors": []}), flush=True)
    for channel in channels:
        await channel.close(None)


async def _raw_subscribers(
    transport: str, address: str, token: str, execution_id: str, count: int
) -> None:
    """``--client raw``: the wire protocol from a Protocol, decoded after the run."""
    host, _, port = address.rpartition(":")
    ready, connections = await run_clients(
        transport, host, int(port), token, TENANT, execution_id, count
    )
    print(json.dumps({"ready": True}), flush=True)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_CLIENT_END_TIMEOUT_S):
            await ready.all_ended.wait()
    for conn in connections:
        conn.close()
    results = [stream for conn in connections for stream in conn.results()]
    errors = [e for conn in connections for e in getattr(conn, "errors", [])]
    print(json.dumps({"results": results, "errors": errors}), flush=True)


def _client_main(argv: list[str]) -> int:
    client, transport, address, token, execution_id, count = argv
    if client == "grpcio":
        asyncio.run(_grpcio_subscribers(address, token, execution_id, int(count)))
    else:
        asyncio.run(_raw_subscribers(transport, address, token, execution_id, int(count)))
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
    """One measurement (a fresh database, progress process and subscribers)."""
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
    profilers: list[subprocess.Popen[bytes]] = []
    http_port_file = work / "progress.http.port"
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
                "OPSC_HTTP_PORT_FILE": str(http_port_file),
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
        if args.transport == "sse":
            address = f"127.0.0.1:{int(http_port_file.read_text())}"
        else:
            address = progress.address
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
                        args.client,
                        args.transport,
                        address,
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
        if args.profile:
            profilers = _start_profilers(
                args.profile,
                {"progress": progress.process.pid}
                | {f"client{i}": c.pid for i, c in enumerate(clients)},
            )
        # Every subscriber is live (its stream replayed nothing: no event yet). Now commit.
        cpu_before = cpu_seconds(progress.process.pid)
        measure_started = time.monotonic()
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
        errors: list[str] = []
        for client in clients:
            assert client.stdout is not None
            line = await asyncio.to_thread(client.stdout.readline)
            if not line:
                raise RuntimeError("a client process died before reporting")
            reported = json.loads(line)
            outputs.append(reported["results"])
            errors.extend(reported["errors"])
            await asyncio.to_thread(client.wait, 30)
        cpu_after = cpu_seconds(progress.process.pid)
        measured_s = time.monotonic() - measure_started
        rss_peak = peak_rss_mb(progress.process.pid)
        await pool.close()
    finally:
        _stop_profilers(profilers)
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
        # The run's folder (logs, port files, the embedded Postgres's ~40 MB of data).
        shutil.rmtree(work, ignore_errors=True)
    expected = list(range(1, args.events + 2))
    latencies: list[float] = []
    complete = 0
    subscribers = [sub for output in outputs for sub in output]
    for received in subscribers:
        if [seq for seq, _ in received] == expected:
            complete += 1
        latencies.extend(arrived - committed[seq] for seq, arrived in received)
    ordered = sorted(x * 1000 for x in latencies) or [float("nan")]
    cpu = (cpu_after or 0) - (cpu_before or 0)
    return {
        "transport": args.transport,
        "client": args.client,
        "subscribers": len(subscribers),
        "events_per_subscriber": len(expected),
        "subscribers_with_every_event_once_in_order": complete,
        "deliveries": len(latencies),
        "client_errors": len(errors),
        "latency_p50_ms": round(percentile(ordered, 50), 2),
        "latency_p95_ms": round(percentile(ordered, 95), 2),
        "latency_p99_ms": round(percentile(ordered, 99), 2),
        "latency_max_ms": round(ordered[-1], 2),
        "progress_cpu_share": round(cpu / measured_s, 3) if measured_s else None,
        # Less sensitive to the machine's load than latency: the fan-out's CPU per delivery.
        "progress_cpu_us_per_delivery": round(cpu * 1e6 / len(latencies), 1) if latencies else None,
        "progress_rss_idle_mb": round(rss_idle or 0, 1),
        "progress_peak_rss_mb": round(rss_peak or 0, 1),
        "interval_ms": args.interval_ms,
        "postgres": "external" if server else "embedded",
        "load_before": _load(),
    }


def _load() -> str:
    """The 1/5/15-minute load average (the machine is shared: note it next to each figure)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _start_profilers(directory: Path, pids: dict[str, int]) -> list[subprocess.Popen[bytes]]:
    """``py-spy record`` of each process (collapsed stacks in ``directory``), if installed."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise RuntimeError("--profile needs py-spy (pip install py-spy into the venv)")
    directory.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(pid),
                "--rate",
                "250",
                "--format",
                "raw",
                "--nonblocking",
                "-o",
                str(directory / f"{name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]


def _stop_profilers(profilers: list[subprocess.Popen[bytes]]) -> None:
    for profiler in profilers:
        if profiler.poll() is None:
            profiler.send_signal(signal.SIGINT)
    for profiler in profilers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            profiler.wait(30)


_MEDIAN_OF = (
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "progress_peak_rss_mb",
    "progress_cpu_us_per_delivery",
)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        return _client_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--events", type=int, default=40)
    parser.add_argument("--interval-ms", type=float, default=100)
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--transport", choices=("grpc", "sse"), default="grpc")
    parser.add_argument(
        "--client",
        choices=("raw", "grpcio"),
        default="raw",
        help="raw: the wire protocol from an asyncio.Protocol (light); grpcio: grpc.aio stubs",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs; the median is reported")
    parser.add_argument("--profile", type=Path, help="py-spy every process into this folder")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.transport == "sse" and args.client == "grpcio":
        parser.error("--client grpcio speaks gRPC only")
    runs = []
    for index in range(args.repeat):
        figures = asyncio.run(run(args))
        runs.append(figures)
        print(
            f"  run {index + 1}: p50 {figures['latency_p50_ms']} ms, p95 "
            f"{figures['latency_p95_ms']} ms, peak RSS {figures['progress_peak_rss_mb']} MB, "
            f"complete {figures['subscribers_with_every_event_once_in_order']}, "
            f"CPU {figures['progress_cpu_us_per_delivery']} us/delivery, "
            f"load {figures['load_before']}",
            file=sys.stderr,
        )
    figures = dict(runs[-1])
    for key in _MEDIAN_OF:
        figures[key] = statistics.median(run[key] for run in runs)
    figures["runs"] = len(runs)
    figures["complete_in_every_run"] = all(
        r["subscribers_with_every_event_once_in_order"] == args.subscribers
        and r["subscribers"] == args.subscribers
        for r in runs
    )
    print(
        f"progress fan-out: {figures['subscribers']} {args.transport} subscribers of one "
        f"execution, one progress process ({args.client} clients; median of {len(runs)} runs)"
    )
    for key, value in figures.items():
        print(f"  {key:45} {value}")
    print(
        f"  targets: p95 <= 50 ms {'met' if figures['latency_p95_ms'] <= 50 else 'MISSED'}, "
        f"peak RSS <= 150 MB {'met' if figures['progress_peak_rss_mb'] <= 150 else 'MISSED'}"
    )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"median": figures, "runs": runs}, indent=2) + "\n")
    return 0 if figures["complete_in_every_run"] else 1


if __name__ == "__main__":
    sys.exit(main())
