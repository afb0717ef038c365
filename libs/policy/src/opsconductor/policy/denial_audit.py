"""A per-principal budget on the ``rbac_violation`` rows denials write, with repeats aggregated.

Every denial is audited, but one principal must not be able to write thousands of rows a second
(a viewer looping over made-up tenant names did exactly that). So, per principal (the tenant it
authenticated for and its actor id), within a window of ``window_s`` seconds:

* the first ``burst`` denials are written at once, one row each, as before — the first denial
  of a window is never held back or dropped;
* later ones are counted in memory, grouped by (targeted tenant, reason, tier, resource), and
  when the window ends one *summary* row per group is written: an ordinary ``rbac_violation``
  row whose payload is the group's first denial plus ``aggregated: true``, ``count``,
  ``first_seen`` and ``last_seen`` (UTC ISO times);
* a principal holds at most ``max_groups`` groups per window; denials beyond them are counted
  in one overflow group filed under the principal's *own* tenant (``requested_tenant`` then
  says ``"(various)"``), so invented tenant names cannot multiply rows either.

So a principal writes at most ``burst + max_groups + 1`` rows per window, whatever it sends. The
metric and the log line of each denial are untouched (cheap, and nothing is lost there).

Summaries pending when the process stops are written by :meth:`DenialAuditLimiter.flush`
(the services' shutdown calls it); a process killed outright loses at most one window of counts,
never a first row.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final
from uuid import UUID

import structlog

__all__ = ["DEFAULT_BURST", "DEFAULT_WINDOW_S", "DenialAuditLimiter", "DenialRecord"]

log = structlog.get_logger(__name__)

DEFAULT_BURST: Final = 10
DEFAULT_WINDOW_S: Final = 60.0
DEFAULT_MAX_GROUPS: Final = 20
#: Principals tracked at once; the oldest window is flushed early beyond this.
MAX_PRINCIPALS: Final = 10_000


@dataclass(frozen=True)
class DenialRecord:
    """One denial to audit: filed under ``tenant_id`` (the targeted tenant, already storable)."""

    tenant_id: str
    actor_tenant: str
    actor_id: str
    execution_id: UUID | None
    payload: Mapping[str, Any]


Writer = Callable[[DenialRecord], Awaitable[None]]


@dataclass
class _Group:
    first: DenialRecord
    count: int = 0
    first_seen: datetime = field(default_factory=lambda: datetime.now(UTC))
    last_seen: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass
class _Window:
    started: float
    written: int = 0
    groups: dict[tuple[str, ...], _Group] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None


class DenialAuditLimiter:
    """Writes denials through ``write`` within each principal's budget (module docstring)."""

    def __init__(
        self,
        write: Writer,
        *,
        burst: int = DEFAULT_BURST,
        window_s: float = DEFAULT_WINDOW_S,
        max_groups: int = DEFAULT_MAX_GROUPS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or window_s <= 0 or max_groups < 1:
            raise ValueError("burst and max_groups must be >= 1 and window_s > 0")
        self._write = write
        self._burst = burst
        self._window_s = window_s
        self._max_groups = max_groups
        self._clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}
        self._flushes: set[asyncio.Task[None]] = set()

    async def record(self, denial: DenialRecord) -> None:
        """Write ``denial`` now if the principal's budget allows, else count it for a summary."""
        key = (denial.actor_tenant, denial.actor_id)
        now = self._clock()
        window = self._windows.get(key)
        if window is not None and now - window.started >= self._window_s:
            self._spawn_flush(key)
            window = None
        if window is None:
            if len(self._windows) >= MAX_PRINCIPALS:
                self._spawn_flush(next(iter(self._windows)))
            window = self._windows[key] = _Window(started=now)
        if window.written < self._burst:
            window.written += 1
            await self._write(denial)
            return
        self._aggregate(key, window, denial)

    def _aggregate(self, key: tuple[str, str], window: _Window, denial: DenialRecord) -> None:
        payload = denial.payload
        group_key: tuple[str, ...] = (
            denial.tenant_id,
            str(payload.get("reason", "")),
            str(payload.get("tier", "")),
            str(payload.get("resource", "")),
        )
        if group_key not in window.groups and len(window.groups) >= self._max_groups:
            group_key = ("(overflow)",)
            if group_key not in window.groups:
                denial = DenialRecord(
                    tenant_id=denial.actor_tenant,
                    actor_tenant=denial.actor_tenant,
                    actor_id=denial.actor_id,
                    execution_id=None,
                    payload={**payload, "requested_tenant": "(various)"},
                )
        group = window.groups.get(group_key)
        if group is None:
            group = window.groups[group_key] = _Group(first=denial)
        group.count += 1
        group.last_seen = datetime.now(UTC)
        if window.timer is None:
            delay = max(self._window_s - (self._clock() - window.started), 0.0)
            loop = asyncio.get_running_loop()
            window.timer = loop.call_later(delay, self._spawn_flush, key)

    def _spawn_flush(self, key: tuple[str, str]) -> None:
        window = self._windows.pop(key, None)
        if window is None:
            return
        if window.timer is not None:
            window.timer.cancel()
        if not window.groups:
            return
        task = asyncio.ensure_future(self._write_summaries(window))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _write_summaries(self, window: _Window) -> None:
        for group in window.groups.values():
            first = group.first
            summary = DenialRecord(
                tenant_id=first.tenant_id,
                actor_tenant=first.actor_tenant,
                actor_id=first.actor_id,
                execution_id=None,
                payload={
                    **first.payload,
                    "aggregated": True,
                    "count": group.count,
                    "first_seen": group.first_seen.isoformat(),
                    "last_seen": group.last_seen.isoformat(),
                    "window_s": self._window_s,
                },
            )
            try:
                await self._write(summary)
            except Exception:
                log.exception("rbac_violation_summary_failed", actor_id=first.actor_id)

    async def flush(self) -> None:
        """Write every pending summary now (at shutdown) and wait for writes in progress."""
        for key in list(self._windows):
            self._spawn_flush(key)
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
