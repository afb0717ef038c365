"""The background no-op workload through OpsConductor, saq and pgqueuer on the same servers.

``make bench-peers`` (builds ``bench/.venv-peers`` from ``bench/peers-requirements.txt``, then runs
this with ``--peers-python bench/.venv-peers/bin/python``).

On one Postgres and one Redis (``DATABASE_URL``/``REDIS_URL``, else embedded ones for the whole
run), one after the other:

- **OpsConductor**: ``background_throughput.py`` as ``make bench`` runs it (one-step ``noop`` plans
  submitted with ``requested_mode=background``; 1, then 2 worker processes; each job goes through
  idempotency, the FSM, events, a lease with fencing, a lock, the step).
- **saq** (Redis) and **pgqueuer** (Postgres, a database of its own on the same server): a no-op
  job function, one worker process each with the library's defaults, measured by
  ``_peers_run.py`` the same way: bursts of ``--jobs`` enqueues from 16 concurrent callers while
  the worker consumes, e2e jobs/s = jobs / (last end - first enqueue), then open-loop arrivals
  at 70 % of that rate for queue wait p50/p95; each figure the median of ``--repeat`` runs.

Printed: each figure for every queue, and ours / theirs (for a rate above 1 is better, for a
latency below 1 is better). JSON in ``bench/results/peers.json``.

**The floor of a gRPC submit.** Our jobs are submitted through the api's gRPC service; the
peers' are enqueued by the library in the caller's process. So the run also measures a bare
``grpc.aio`` echo (``_echo.py``: no interceptors, no proto code, a payload the size of a
``SubmitExecutionRequest``) from the same 16 concurrent callers, and prints what one gRPC hop in
front of each peer would leave of its rate when both share the machine's cores: ``1 / (1/echo +
1/peer)`` (their CPU costs per job add up; every rate here is measured saturating the same
cores). That is an upper bound for any design that takes jobs over gRPC, before the api's own
work (authentication, RBAC, idempotency, the FSM, events) is counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import grpc.aio
from _echo import echo_method, wait_echo_ready
from _measure import closed_loop
from _report import machine_line, progress, report, started_result, stop_on_sigterm
from _stack import (
    _DB_PREFIX,
    _REDIS_PREFIX,
    Servers,
    machine,
    run_script,
    servers,
    start_child,
    with_database,
)
from immediate_latency import submit_payload

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUTPUT = BENCH_DIR / "results" / "peers.json"
PEERS = ("saq", "pgqueuer")
#: The concurrent callers of every burst (ours: ``background_throughput.py``'s submitters).
CALLERS = 16


async def echo_rate(args: argparse.Namespace) -> dict[str, Any]:
    """Calls/s of a bare gRPC echo in its own process from ``CALLERS`` concurrent callers."""
    payload = submit_payload()
    with tempfile.TemporaryDirectory(prefix="opsc-bench-echo-") as folder:
        echo_server = await start_child(
            "echo", [sys.executable, str(BENCH_DIR / "_echo.py")], os.environ, Path(folder)
        )
        try:
            await wait_echo_ready(echo_server.address)
            async with grpc.aio.insecure_channel(echo_server.address) as channel:
                echo = echo_method(channel)

                async def call(i: int) -> None:
                    if len(await echo(payload)) != len(payload):
                        raise RuntimeError(f"echo {i}: payload changed on the way")

                await closed_loop(call, 500, CALLERS)  # warm-up
                rates = [
                    (await closed_loop(call, args.echo_calls, CALLERS)).throughput_rps
                    for _ in range(args.repeat)
                ]
        finally:
            echo_server.stop()
    return {"calls_per_s": statistics.median(rates), "payload_bytes": len(payload)}


def floor(echo_per_s: float, peer_per_s: float) -> float:
    """Jobs/s left of ``peer_per_s`` with a gRPC hop costing ``1/echo_per_s`` in front of it."""
    return 1.0 / (1.0 / echo_per_s + 1.0 / peer_per_s)


async def ours(args: argparse.Namespace, found: Servers) -> dict[str, Any]:
    options = ["--repeat", str(args.repeat), "--steady-repeat", str(args.repeat)]
    options += ["--jobs", str(args.jobs), "--log-level", args.log_level]
    doc = await asyncio.to_thread(run_script, "background_throughput.py", found, options)
    out: dict[str, Any] = {"peak_rss_mb": doc["peak_rss_mb"]}
    for r in doc["results"]:
        out[f"{r['workers']}w"] = {
            "e2e_jobs_per_s": r["e2e_jobs_per_s"],
            "queue_wait_p50_ms": r["steady"]["queue_wait"]["p50_ms"],
            "queue_wait_p95_ms": r["steady"]["queue_wait"]["p95_ms"],
            "steady_rate": r["steady"]["achieved_rate"],
        }
    return out


async def peer(args: argparse.Namespace, found: Servers, name: str) -> dict[str, Any]:
    tag = f"{os.getpid()}_{secrets.token_hex(3)}"
    database = f"{_DB_PREFIX}{tag}_pgq"
    admin = await asyncpg.connect(found.postgres_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    argv = [
        args.peers_python,
        str(BENCH_DIR / "_peers_run.py"),
        "--peer",
        name,
        "--redis-url",
        found.redis_url,
        "--dsn",
        with_database(found.postgres_dsn, database),
        # A queue of this run's own (its keys are deleted at the end).
        "--name",
        f"{_REDIS_PREFIX}{tag}",
        "--jobs",
        str(args.peer_jobs),
        "--repeat",
        str(args.repeat),
    ]
    try:
        process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        stdout, _ = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"{name} run failed with exit status {process.returncode}")
        result: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
        return result
    finally:
        admin = await asyncpg.connect(found.postgres_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await admin.close()


def render(result: dict[str, Any]) -> str:
    our = result["ours"]
    rows = (
        ("e2e jobs/s", "e2e_jobs_per_s", "{:.0f}"),
        ("queue wait p50 ms at 70 %", "queue_wait_p50_ms", "{:.1f}"),
        ("queue wait p95 ms at 70 %", "queue_wait_p95_ms", "{:.1f}"),
    )
    head = f"{'figure':<28}{'ours 1w':>9}{'ours 2w':>9}"
    for name in PEERS:
        head += f"{name:>10}{'ours1w/' + name:>17}{'ours2w/' + name:>17}"
    lines = [
        "",
        "Background no-op jobs: OpsConductor vs saq vs pgqueuer, same Postgres and Redis, same run",
        f"  ours    : background_throughput.py, one-step `noop` plans, OPSC_LOG_LEVEL="
        f"{result['log_level']}, 1 and 2 worker processes",
        "  peers   : one worker process each, library defaults (saq concurrency 10, pgqueuer"
        " batch 10),",
        "            a no-op job function; versions pinned in bench/peers-requirements.txt",
        f"  method  : bursts of {result['jobs']} (ours) / {result['peer_jobs']} (peers) from 16"
        " callers (e2e = jobs / (last end - first enqueue)), then open-loop",
        f"            arrivals at 70 % of that rate; each figure the median of {result['repeat']}"
        " runs",
        f"  servers : Postgres {result['postgres']}; Redis {result['redis']}",
        machine_line(result),
        "",
        head,
        "-" * len(head),
    ]
    for label, key, fmt in rows:
        one, two = our["1w"][key], our.get("2w", our["1w"])[key]
        line = f"{label:<28}{fmt.format(one):>9}{fmt.format(two):>9}"
        for name in PEERS:
            theirs = result["peers"][name][key]
            r1 = one / theirs if theirs else float("inf")
            r2 = two / theirs if theirs else float("inf")
            line += f"{fmt.format(theirs):>10}{r1:>17.2f}{r2:>17.2f}"
        lines.append(line)
    lines.append("ours/theirs: for jobs/s above 1 is better, for queue wait below 1 is better")
    echo = result["echo"]["calls_per_s"]
    lines += [
        "",
        f"floor of a gRPC submit: a bare grpc.aio echo ({result['echo']['payload_bytes']} bytes,"
        f" {CALLERS} callers) {echo:.0f} calls/s here; one such hop in",
        "front of a peer leaves 1 / (1/echo + 1/peer) jobs/s, before any work of the api:",
    ]
    best = max(our["1w"]["e2e_jobs_per_s"], our.get("2w", our["1w"])["e2e_jobs_per_s"])
    for name in PEERS:
        bound = floor(echo, result["peers"][name]["e2e_jobs_per_s"])
        lines.append(
            f"  {name:<9} {result['peers'][name]['e2e_jobs_per_s']:>6.0f} -> {bound:>5.0f} jobs/s;"
            f" ours (best of 1w/2w) / that: {best / bound:.2f}"
        )
    for name in PEERS:
        lags = [f"{run['lag_s']:.2f}" for run in result["peers"][name].get("steady", [])]
        lines.append(
            f"{name}: steady phases at {result['peers'][name]['steady_rate']:.0f}/s, last job done"
            f" {' / '.join(lags)} s after the last enqueue (seconds: it fell behind)"
        )
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    stop_on_sigterm()
    result = started_result(
        jobs=args.jobs,
        peer_jobs=args.peer_jobs,
        repeat=args.repeat,
        log_level=args.log_level.upper(),
        peers={},
    )
    async with servers(with_redis=True) as found:
        result["postgres"], result["redis"] = found.postgres, found.redis
        progress("OpsConductor: background path, 1 and 2 workers")
        result["ours"] = await ours(args, found)
        progress("a bare gRPC echo: the cost of one hop")
        result["echo"] = await echo_rate(args)
        for name in PEERS:
            progress(f"{name}: one worker")
            result["peers"][name] = await peer(args, found, name)
    result["machine"] = machine()
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument(
        "--peers-python",
        default=str(BENCH_DIR / ".venv-peers" / "bin" / "python"),
        help="the interpreter of the bench virtualenv holding saq and pgqueuer",
    )
    parser.add_argument("--jobs", type=int, default=400, help="jobs per burst of ours (400)")
    parser.add_argument(
        "--peer-jobs",
        type=int,
        default=3000,
        help="jobs per burst of the peers (3000): at their rates 400 last under a second, start-up"
        " dominates and the 70 %% rate derived from it overloads them",
    )
    parser.add_argument("--echo-calls", type=int, default=5000, help="calls per echo burst (5000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (3)")
    parser.add_argument("--log-level", default="WARNING", help="OPSC_LOG_LEVEL (WARNING)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results")
    args = parser.parse_args(argv)
    if not Path(args.peers_python).exists():
        parser.error(f"{args.peers_python} missing: run `make bench-peers` to build it")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return report("peers", lambda: run(args), render, args.output, failures=(RuntimeError,))


if __name__ == "__main__":
    sys.exit(main())
