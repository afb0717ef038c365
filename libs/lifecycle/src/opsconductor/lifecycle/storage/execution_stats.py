"""Observed step durations, which refine the handlers' own estimates (DESIGN.md §3 "Mode")."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from opsconductor.lifecycle.storage.execution_records import PoolOrConnection, connection
from opsconductor.lifecycle.storage.queries import query

_P95 = query("step_duration_p95")


class ObservedDurations:
    """p95 of succeeded steps per action over a recent window, cached for ``ttl`` seconds.

    An action needs ``min_samples`` recent runs before its p95 counts: a single slow outlier
    should not push every later plan into the background.
    """

    def __init__(
        self,
        pool: PoolOrConnection,
        *,
        window_s: float = 86400.0,
        min_samples: int = 20,
        ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._window_s = window_s
        self._min_samples = min_samples
        self._ttl = ttl
        self._clock = clock
        self._cache: dict[str, tuple[float, int]] = {}

    async def p95_ms(self, actions: Iterable[str]) -> dict[str, int]:
        """Observed p95 (ms) of each action that has enough recent samples."""
        now = self._clock()
        wanted = set(actions)
        stale = sorted(a for a in wanted if a not in self._cache or self._cache[a][0] <= now)
        if stale:
            async with connection(self._pool) as conn:
                rows = await conn.fetch(_P95, stale, self._window_s, self._min_samples)
            found = {row["action"]: int(row["p95"]) for row in rows}
            for action in stale:
                self._cache[action] = (now + self._ttl, found.get(action, 0))
        return {a: self._cache[a][1] for a in wanted if self._cache[a][1] > 0}
