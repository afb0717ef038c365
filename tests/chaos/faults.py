"""The fault driver: a seeded schedule of crashes, pauses and outages, carried out and logged.

Kinds::

    kill_worker    SIGKILL a worker; the supervisor starts a new one (its jobs are taken over
                   once their lease runs out)
    pause_worker   SIGSTOP a worker for longer than its lease, then SIGCONT: it comes back as a
                   zombie whose writes must be fenced off
    kill_api       SIGKILL the api; the supervisor starts a new one (callers retry)
    restart_redis  kill Redis and start it again empty on the same port (the reaper rebuilds the
                   queue from ``execution_queue``)
    term_worker    SIGTERM a worker: graceful requeue of its jobs, then the supervisor restarts it

The schedule is a pure function of the seed, the duration and the worker names, so the same
seed replays the same faults at the same offsets. A worker fault names a worker; when that one
runs no background job at the moment and another one does, the fault strikes the busy one
instead (lowest name first), so that crashes and pauses hit work in flight. Each fault is
logged with its UTC time and the pid it struck.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from .stack import LEASE_S, ChaosStack

KINDS = ("kill_worker", "pause_worker", "kill_api", "restart_redis", "term_worker")
#: A pause outlasts the lease, so another worker takes the job over meanwhile, and ends
#: while that one may still run it: the resumed worker's writes must then be fenced off.
PAUSE_S = LEASE_S + 2.0
#: Average seconds between two faults.
MEAN_GAP_S = 7.0


@dataclass(frozen=True)
class Fault:
    at_s: float
    kind: str
    target: str


def build_schedule(seed: int, duration_s: float, workers: list[str]) -> list[Fault]:
    """Faults over ``duration_s`` seconds; every kind at least once (the first five are one
    of each, in a seeded order), then a seeded mix."""
    rng = random.Random(f"faults:{seed}")
    count = max(len(KINDS), int(duration_s / MEAN_GAP_S))
    kinds = list(KINDS)
    rng.shuffle(kinds)
    kinds += [rng.choice(KINDS) for _ in range(count - len(KINDS))]
    gap = duration_s / (count + 1)
    faults = []
    for index, kind in enumerate(kinds):
        at_s = round(gap * (index + 1) + rng.uniform(-gap / 4, gap / 4), 2)
        target = rng.choice(workers) if kind.endswith("_worker") else kind.split("_", 1)[1]
        faults.append(Fault(at_s, kind, target))
    return faults


class FaultDriver:
    """Carries a schedule out against the stack; :attr:`log` records each fault."""

    def __init__(self, stack: ChaosStack) -> None:
        self._stack = stack
        self.log: list[dict[str, Any]] = []
        self._paused: set[int] = set()
        self._busy: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []

    async def run(self, schedule: list[Fault], started: float) -> None:
        try:
            for fault in schedule:
                await asyncio.sleep(max(0.0, started + fault.at_s - time.monotonic()))
                await self._inflict(fault, started)
            await asyncio.gather(*self._tasks)
        finally:
            self.resume_all()

    def resume_all(self) -> None:
        """SIGCONT every worker still paused (a failed run must not leave one stopped)."""
        for pid in list(self._paused):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            self._paused.discard(pid)

    def _record(self, fault: Fault, started: float, **detail: Any) -> None:
        entry = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "offset_s": round(time.monotonic() - started, 2),
            **asdict(fault),
            **detail,
        }
        self.log.append(entry)

    async def _inflict(self, fault: Fault, started: float) -> None:
        supervisor = self._stack.supervisor
        if fault.kind == "restart_redis":
            self._stack.redis.kill()
            self._record(fault, started, action="redis killed")
            await asyncio.sleep(1.0)
            await self._stack.redis.start()
            self._record(fault, started, action="redis started empty")
            return
        if fault.target in self._busy:
            # Still paused from an earlier fault: the schedule stays the same, this one waits.
            self._record(fault, started, action="skipped: target still paused")
            return
        if fault.kind.endswith("_worker"):
            fault = Fault(fault.at_s, fault.kind, await self._busy_worker(fault.target))
        service = supervisor.service(fault.target if fault.kind != "kill_api" else "api")
        if not service.alive:
            self._record(fault, started, action="skipped: restarting")
            return
        pid = service.pid
        if fault.kind in ("kill_worker", "kill_api"):
            os.kill(pid, signal.SIGKILL)
            self._record(fault, started, pid=pid, action="SIGKILL")
        elif fault.kind == "term_worker":
            os.kill(pid, signal.SIGTERM)
            self._record(fault, started, pid=pid, action="SIGTERM")
        elif fault.kind == "pause_worker":
            os.kill(pid, signal.SIGSTOP)
            self._paused.add(pid)
            self._busy.add(fault.target)
            self._record(fault, started, pid=pid, action=f"SIGSTOP for {PAUSE_S:g} s")
            self._tasks.append(asyncio.create_task(self._resume_later(fault, pid, started)))

    async def _busy_worker(self, preferred: str) -> str:
        """``preferred`` if it runs a background job (or none does), else a worker that does."""
        conn = await asyncpg.connect(self._stack.database_url)
        try:
            rows = await conn.fetch(
                "SELECT DISTINCT worker_id FROM executions WHERE status = 'running' "
                "AND execution_mode = 'background' AND lease_token IS NOT NULL"
            )
        finally:
            await conn.close()
        pids = {int(r["worker_id"].rsplit(":", 1)[1]) for r in rows if r["worker_id"]}
        busy = sorted(
            name
            for name in self._stack.workers()
            if name not in self._busy and self._stack.supervisor.service(name).pid in pids
        )
        if not busy or preferred in busy:
            return preferred
        return busy[0]

    async def _resume_later(self, fault: Fault, pid: int, started: float) -> None:
        await asyncio.sleep(PAUSE_S)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        self._paused.discard(pid)
        self._busy.discard(fault.target)
        self._record(fault, started, pid=pid, action="SIGCONT")
