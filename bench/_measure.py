"""Measurement primitives shared by benchmarks: closed-loop load, latency statistics, CPU time.

- :func:`closed_loop` drives ``concurrency`` coroutines that each send their next request as soon
  as the previous one is answered, and times every call on its own.
- :class:`Stats` summarises a batch (mean, p50/p95/p99 by linear interpolation, throughput);
  :func:`median_stats` combines repetitions statistic by statistic.
- :class:`CpuMeter` reads user+system CPU time of named process groups from ``/proc`` around a
  batch, plus whatever the rest of the machine used meanwhile (``other``: noise).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from _stack import cpu_seconds, machine_busy_seconds

#: CPU the rest of the machine used during a batch (other processes, Postgres' background
#: writers, kernel work not charged to a process): noise when it is large.
OTHER = "other"

Call = Callable[[int], Awaitable[None]]
"""One request: ``call(i)`` sends request number ``i`` and returns once it is answered."""

PidSource = Callable[[], Awaitable[Mapping[str, Sequence[int]]]]
"""Process ids per group, asked afresh at every snapshot (e.g. database backends)."""

CpuSnapshot = dict[str, dict[int, float]]


@dataclass(frozen=True)
class Stats:
    """Summary of one measured batch; latencies in milliseconds."""

    count: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    throughput_rps: float


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of sorted values, linear between closest ranks."""
    if not ordered:
        raise ValueError("no values")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(latencies_s: Sequence[float], wall_s: float) -> Stats:
    """Stats of latencies given in seconds, over a batch that took ``wall_s``."""
    ordered = sorted(x * 1000 for x in latencies_s)
    return Stats(
        count=len(ordered),
        mean_ms=statistics.fmean(ordered),
        p50_ms=percentile(ordered, 50),
        p95_ms=percentile(ordered, 95),
        p99_ms=percentile(ordered, 99),
        min_ms=ordered[0],
        max_ms=ordered[-1],
        throughput_rps=len(ordered) / wall_s,
    )


def median_stats(runs: Sequence[Stats]) -> Stats:
    """Field by field median over repetitions (count: the per-repetition count)."""
    values: dict[str, Any] = {
        f.name: statistics.median(getattr(r, f.name) for r in runs) for f in fields(Stats)
    }
    values["count"] = runs[0].count
    return Stats(**values)


async def closed_loop(call: Call, requests: int, concurrency: int) -> Stats:
    """``requests`` calls of ``call(i)`` from ``concurrency`` coroutines; each call timed alone."""
    latencies: list[float] = []
    indexes = iter(range(requests))  # shared: each index is handed out exactly once

    async def client() -> None:
        for i in indexes:
            started = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(concurrency, requests))))
    return summarize(latencies, time.perf_counter() - started)


class CpuMeter:
    """CPU seconds of process groups, read from ``/proc`` (Linux; zeros elsewhere).

    ``fixed``: pids per group known up front; ``dynamic``: asked at every snapshot (a process that
    appears during a batch counts from zero; one that exits during it is lost). ``groups`` fixes
    the order of the result; ``other`` is added to it.
    """

    def __init__(
        self,
        groups: Sequence[str],
        fixed: Mapping[str, Sequence[int]],
        dynamic: PidSource | None = None,
    ) -> None:
        self.groups = tuple(groups)
        self._fixed = dict(fixed)
        self._dynamic = dynamic

    async def snapshot(self) -> CpuSnapshot:
        pids = dict(self._fixed)
        if self._dynamic is not None:
            pids |= await self._dynamic()
        machine = machine_busy_seconds()
        snap: CpuSnapshot = {OTHER: {0: machine} if machine is not None else {}}
        for group, group_pids in pids.items():
            snap[group] = {}
            for pid in group_pids:
                seconds = cpu_seconds(pid)
                if seconds is not None:
                    snap[group][pid] = seconds
        return snap

    def per_request_ms(
        self, before: CpuSnapshot, after: CpuSnapshot, requests: int
    ) -> dict[str, float]:
        """CPU milliseconds per request of each group (and ``other``) between two snapshots."""
        spent = {
            group: sum(s - before.get(group, {}).get(pid, 0.0) for pid, s in pids.items())
            for group, pids in after.items()
        }
        if spent.get(OTHER):
            ours = sum(v for g, v in spent.items() if g != OTHER)
            spent[OTHER] = max(spent[OTHER] - ours, 0.0)
        return {g: spent.get(g, 0.0) * 1000 / requests for g in (*self.groups, OTHER)}


def median_cpu(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Group by group median of per-request CPU over repetitions."""
    groups = list(dict.fromkeys(g for r in runs for g in r))
    return {g: statistics.median(r.get(g, 0.0) for r in runs) for g in groups}
