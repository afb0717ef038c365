"""The no-op workload through saq and pgqueuer: run by ``bench/peers.py`` in ``bench/.venv-peers``.

Not part of the project's environment: it imports saq and pgqueuer, which live only in the bench
virtualenv ``make bench-peers`` builds (``bench/peers-requirements.txt``), and nothing of
OpsConductor. Two roles, one file:

``--role measure --peer saq|pgqueuer``
    The producer and the clock: starts the peer's worker (this file, ``--role worker``, a process
    of its own, one worker with the library's default concurrency) and measures exactly as
    ``background_throughput.py`` does: ``--repeat`` bursts of ``--jobs`` enqueues from
    ``--submitters`` concurrent callers while the worker consumes (e2e jobs/s = jobs / (last end -
    first enqueue)), then ``--repeat`` open-loop phases of ``--steady-s`` seconds at ``--load`` of
    the median e2e rate: queue wait = start - enqueue, percentiles by linear interpolation, the
    medians over the phases. Prints one JSON document on stdout.

``--role worker``
    Runs the peer's worker; the no-op job records (enqueued, started, ended) epoch seconds (the
    enqueue time travels in the job's payload). Commands on stdin, answers on stdout, one line
    each: ``count`` (jobs done so far), ``dump`` (their timings as JSON, then forgotten).

Both peers' end time is the job function's return (their completion bookkeeping follows it:
saq's ``finish``, pgqueuer's buffered log write), like OpsConductor's ``ended_at``, which is
written before its queue row is deleted and its Redis entry acknowledged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

Timing = tuple[float, float, float]  # enqueued, started, ended (epoch seconds)

DONE: list[Timing] = []
#: Where the worker answers commands: the original stdout (fd 1 then goes to stderr, so nothing
#: a library prints can be mistaken for an answer).
ANSWERS: Any = None


def percentile(ordered: Sequence[float], q: float) -> float:
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# -- worker role -----------------------------------------------------------------------------------


async def serve_commands() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = line.decode().strip()
        if command == "count":
            answer = str(len(DONE))
        elif command == "dump":
            answer = json.dumps(DONE)
            DONE.clear()
        else:
            answer = json.dumps({"error": f"unknown command {command!r}"})
        ANSWERS.write(answer + "\n")
        ANSWERS.flush()


async def saq_worker(args: argparse.Namespace) -> None:
    from saq import Queue, Worker

    async def noop(ctx: Any, *, enq: float) -> None:
        started = time.time()
        DONE.append((enq, started, time.time()))

    queue = Queue.from_url(args.redis_url, name=args.name)
    worker = Worker(queue, functions=[("noop", noop)])
    commands = asyncio.create_task(serve_commands())
    run = asyncio.create_task(worker.start())
    await commands  # stdin closed: the measurement is over
    await worker.stop()
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    await queue.disconnect()


async def pgqueuer_worker(args: argparse.Namespace) -> None:
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries

    conn = await asyncpg.connect(args.dsn)
    manager = QueueManager(Queries(AsyncpgDriver(conn)))

    @manager.entrypoint("noop")
    async def noop(job: Job) -> None:
        started = time.time()
        enq = float((job.payload or b"0").decode())
        DONE.append((enq, started, time.time()))

    commands = asyncio.create_task(serve_commands())
    run = asyncio.create_task(manager.run())
    await commands
    manager.shutdown.set()
    await asyncio.wait_for(asyncio.gather(run, return_exceptions=True), 30)
    await conn.close()


# -- measure role ----------------------------------------------------------------------------------


class Worker:
    """The peer's worker process and its command pipe."""

    def __init__(self, args: argparse.Namespace) -> None:
        argv = [sys.executable, os.path.abspath(__file__), "--role", "worker", "--peer", args.peer]
        argv += ["--redis-url", args.redis_url, "--dsn", args.dsn, "--name", args.name]
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sys.stderr
        )
        self.lock = asyncio.Lock()

    async def ask(self, command: str) -> str:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        async with self.lock:
            self.process.stdin.write(f"{command}\n".encode())
            self.process.stdin.flush()
            line = await asyncio.to_thread(self.process.stdout.readline)
        if not line:
            raise RuntimeError(f"{self.process.args[4]} worker exited")
        return line.decode()

    async def wait_done(self, jobs: int, within_s: float = 300.0) -> list[Timing]:
        deadline = time.monotonic() + within_s
        while int(await self.ask("count")) < jobs:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{jobs} jobs not done within {within_s} s")
            await asyncio.sleep(0.05)
        return [tuple(t) for t in json.loads(await self.ask("dump"))]  # type: ignore[misc]

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


async def saq_producer(args: argparse.Namespace) -> tuple[Callable[[], Awaitable[None]], Any]:
    from saq import Queue

    queue = Queue.from_url(args.redis_url, name=args.name)
    await queue.connect()

    async def submit() -> None:
        await queue.enqueue("noop", enq=time.time())

    async def close() -> None:
        keys = [k async for k in queue.redis.scan_iter(match=f"saq:{args.name}:*", count=1000)]
        keys += [k async for k in queue.redis.scan_iter(match=f"saq:job:{args.name}:*")]
        for start in range(0, len(keys), 500):
            await queue.redis.delete(*keys[start : start + 500])
        await queue.disconnect()

    return submit, close


async def pgqueuer_producer(args: argparse.Namespace) -> tuple[Callable[[], Awaitable[None]], Any]:
    import asyncpg
    from pgqueuer.db import AsyncpgPoolDriver
    from pgqueuer.queries import Queries

    pool = await asyncpg.create_pool(args.dsn, min_size=args.submitters, max_size=args.submitters)
    queries = Queries(AsyncpgPoolDriver(pool))

    async def submit() -> None:
        await queries.enqueue("noop", str(time.time()).encode())

    async def close() -> None:
        await pool.close()

    return submit, close


async def closed_loop(submit: Callable[[], Awaitable[None]], jobs: int, callers: int) -> None:
    remaining = iter(range(jobs))

    async def caller() -> None:
        for _ in remaining:
            await submit()

    await asyncio.gather(*(caller() for _ in range(min(callers, jobs))))


async def open_loop(submit: Callable[[], Awaitable[None]], rate: float, seconds: float) -> int:
    count = max(int(rate * seconds), 1)
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for i in range(count):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(submit()))
    await asyncio.gather(*tasks)
    return count


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    if args.peer == "pgqueuer":
        import asyncpg
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries

        conn = await asyncpg.connect(args.dsn)
        try:
            await Queries(AsyncpgDriver(conn)).install()
        finally:
            await conn.close()
    make = saq_producer if args.peer == "saq" else pgqueuer_producer
    submit, close = await make(args)
    worker = Worker(args)
    try:
        await closed_loop(submit, args.warmup, args.submitters)
        await worker.wait_done(args.warmup)
        bursts = []
        for _ in range(args.repeat):
            await closed_loop(submit, args.jobs, args.submitters)
            timings = await worker.wait_done(args.jobs)
            span = max(t[2] for t in timings) - min(t[0] for t in timings)
            bursts.append(len(timings) / span)
        e2e = statistics.median(bursts)
        rate = args.load * e2e
        steady = []
        for _ in range(args.repeat):
            count = await open_loop(submit, rate, args.steady_s)
            timings = await worker.wait_done(count)
            waits = sorted((t[1] - t[0]) * 1000 for t in timings)
            steady.append(
                {
                    "jobs": count,
                    "p50_ms": percentile(waits, 50),
                    "p95_ms": percentile(waits, 95),
                    # How long the worker needed after the last enqueue: seconds mean it fell
                    # behind the arrival rate (the waits then measure a growing backlog).
                    "lag_s": max(t[2] for t in timings) - max(t[0] for t in timings),
                }
            )
    finally:
        worker.stop()
        await close()
    return {
        "peer": args.peer,
        "e2e_jobs_per_s": e2e,
        "bursts": bursts,
        "steady_rate": rate,
        "queue_wait_p50_ms": statistics.median(s["p50_ms"] for s in steady),
        "queue_wait_p95_ms": statistics.median(s["p95_ms"] for s in steady),
        "steady": steady,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--role", choices=["measure", "worker"], default="measure")
    parser.add_argument("--peer", choices=["saq", "pgqueuer"], required=True)
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--dsn", default="")
    parser.add_argument("--name", default="opsc-bench-peer", help="saq queue name")
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--submitters", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steady-s", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=0.7)
    parser.add_argument("--warmup", type=int, default=50)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "worker":
        global ANSWERS
        ANSWERS = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        asyncio.run(saq_worker(args) if args.peer == "saq" else pgqueuer_worker(args))
        return 0
    print(json.dumps(asyncio.run(measure(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
