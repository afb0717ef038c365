"""Feature flags of the rollout (DESIGN.md §7): Stage E on/off, tenants, record-only, approvals.

Flags are rows of ``feature_flags`` (name → JSON value). Every change is validated, written in
one transaction with a ``feature_flags_updated`` audit event (tenant ``_system``) and announced on
the ``feature_flags_changed`` channel. Readers on hot paths use :class:`FlagCache`: a short TTL
(2 s by default, so turning Stage E off refuses new submissions within seconds) and, once
:meth:`FlagCache.start` has run, immediate invalidation by that notification.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Final

import structlog

from opsconductor.common.errors import InvalidArgumentError, StorageError
from opsconductor.lifecycle.storage.events import append_event
from opsconductor.lifecycle.storage.execution_records import PoolOrConnection, transaction
from opsconductor.lifecycle.storage.queries import query

__all__ = [
    "FLAGS_CHANNEL",
    "FLAG_NAMES",
    "SYSTEM_TENANT",
    "FeatureFlags",
    "FlagCache",
    "load_flags",
    "update_flags",
]

log = structlog.get_logger(__name__)

#: NOTIFY channel announcing that flags changed (payload: the comma-separated flag names).
FLAGS_CHANNEL: Final = "feature_flags_changed"
#: Tenant id under which events that belong to no tenant (flag changes) are filed.
SYSTEM_TENANT: Final = "_system"
MAX_APPROVAL_LEVEL: Final = 3
MAX_TENANT_ID: Final = 100

_SELECT = query("load_flags")
_LOCK_ALL = query("lock_flags")
_NOTIFY = query("notify")
_UPSERT = query("upsert_flags")


@dataclass(frozen=True)
class FeatureFlags:
    """The rollout switches; the defaults are the dark-launch state (Stage E off)."""

    stage_e_enabled: bool = False
    all_tenants_enabled: bool = False
    enabled_tenants: frozenset[str] = frozenset()
    record_only_tenants: frozenset[str] = frozenset()
    max_approval_level: int = 0
    dispatch_paused: bool = False

    def tenant_enabled(self, tenant_id: str) -> bool:
        """Whether ``tenant_id`` may submit executions: Stage E on, and the tenant let in."""
        return self.stage_e_enabled and (
            self.all_tenants_enabled or tenant_id in self.enabled_tenants
        )

    def record_only(self, tenant_id: str) -> bool:
        """Whether ``tenant_id``'s executions are recorded without calling any automation."""
        return tenant_id in self.record_only_tenants


#: Every flag name, in declaration order.
FLAG_NAMES: Final = tuple(f.name for f in fields(FeatureFlags))
_BOOL_FLAGS = frozenset({"stage_e_enabled", "all_tenants_enabled", "dispatch_paused"})
_TENANT_SET_FLAGS = frozenset({"enabled_tenants", "record_only_tenants"})


def _parse_flag(name: str, value: object) -> Any:
    """The typed value of flag ``name``; :class:`InvalidArgumentError` when it is not valid."""
    if name in _BOOL_FLAGS:
        if isinstance(value, bool):
            return value
        raise InvalidArgumentError("feature flag must be a boolean", flag=name)
    if name in _TENANT_SET_FLAGS:
        if isinstance(value, list | tuple | set | frozenset) and all(
            isinstance(t, str) and 0 < len(t) <= MAX_TENANT_ID for t in value
        ):
            return frozenset(value)
        raise InvalidArgumentError(
            f"feature flag must be a list of tenant ids (1-{MAX_TENANT_ID} characters)", flag=name
        )
    if name == "max_approval_level":
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and 0 <= value <= MAX_APPROVAL_LEVEL
        ):
            return value
        raise InvalidArgumentError(
            f"feature flag must be an integer from 0 to {MAX_APPROVAL_LEVEL}", flag=name
        )
    raise InvalidArgumentError("unknown feature flag", flag=name[:100], known=", ".join(FLAG_NAMES))


def _to_json(value: object) -> object:
    """The JSON form a parsed flag value is stored in (tenant sets as sorted lists)."""
    if isinstance(value, frozenset):
        return sorted(value)
    return value


def _flags_from_rows(rows: list[Mapping[str, Any]]) -> FeatureFlags:
    values: dict[str, Any] = {}
    for row in rows:
        name = row["name"]
        if name not in FLAG_NAMES:
            # A newer release may have added a flag this one does not know: ignore it.
            log.warning("feature_flag_unknown", flag=name)
            continue
        try:
            values[name] = _parse_flag(name, row["value"])
        except InvalidArgumentError as exc:
            raise StorageError("a stored feature flag holds an invalid value", flag=name) from exc
    return replace(FeatureFlags(), **values)


async def load_flags(db: PoolOrConnection) -> FeatureFlags:
    """The current flags (defaults for any flag with no row)."""
    async with transaction(db) as conn:
        rows = await conn.fetch(_SELECT)
    return _flags_from_rows(rows)


async def update_flags(
    db: PoolOrConnection, changes: Mapping[str, object], *, by: str
) -> FeatureFlags:
    """Validate and apply ``changes`` (flag name → new value) atomically; return the new flags.

    Any unknown name or ill-typed value rejects the whole update with
    :class:`InvalidArgumentError` before anything is written. The change is audited by a
    ``feature_flags_updated`` event (tenant ``_system``, actor ``by``, previous and new values)
    and announced on :data:`FLAGS_CHANNEL`.
    """
    parsed = {name: _parse_flag(name, value) for name, value in changes.items()}
    async with transaction(db) as conn:
        # Lock the rows so concurrent updates serialise and the audited "previous" is exact.
        before = _flags_from_rows(await conn.fetch(_LOCK_ALL))
        if not parsed:
            return before
        names = sorted(parsed)
        await conn.execute(_UPSERT, {n: _to_json(parsed[n]) for n in names}, by)
        after = replace(before, **parsed)
        await append_event(
            conn,
            tenant_id=SYSTEM_TENANT,
            execution_id=None,
            actor_id=by,
            type="feature_flags_updated",
            payload={
                "changes": {n: _to_json(parsed[n]) for n in names},
                "previous": {n: _to_json(getattr(before, n)) for n in names},
            },
        )
        await conn.execute(_NOTIFY, FLAGS_CHANNEL, ",".join(names))
    log.info("feature_flags_updated", flags=names, by=by)
    return after


class FlagCache:
    """Flags read at most once per ``ttl`` seconds, and again right after a change is announced.

    ``get`` is safe to call from many tasks: one reload at a time, the others wait for it. A
    reload that raced with a change notification is returned but not cached.
    """

    def __init__(
        self,
        pool: Any,
        *,
        ttl: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._ttl = ttl
        self._clock = clock
        self._flags: FeatureFlags | None = None
        self._expires_at = 0.0
        self._generation = 0
        self._lock = asyncio.Lock()
        self._listener: Any = None

    async def get(self) -> FeatureFlags:
        """The flags, from the cache while fresh, else reloaded from Postgres."""
        if self._flags is not None and self._clock() < self._expires_at:
            return self._flags
        async with self._lock:
            if self._flags is not None and self._clock() < self._expires_at:
                return self._flags
            generation = self._generation
            flags = await load_flags(self._pool)
            self._flags = flags
            if generation == self._generation:
                self._expires_at = self._clock() + self._ttl
            return flags

    def invalidate(self) -> None:
        """Forget the cached flags: the next :meth:`get` reloads them."""
        self._generation += 1
        self._expires_at = 0.0

    async def start(self) -> None:
        """LISTEN on :data:`FLAGS_CHANNEL` on a dedicated pool connection until :meth:`close`."""
        if self._listener is not None:
            return
        conn = await self._pool.acquire()
        try:
            await conn.add_listener(FLAGS_CHANNEL, self._on_notify)
        except BaseException:
            await self._pool.release(conn)
            raise
        self._listener = conn

    async def close(self) -> None:
        """Stop listening and give the connection back to the pool."""
        conn, self._listener = self._listener, None
        if conn is None:
            return
        try:
            await conn.remove_listener(FLAGS_CHANNEL, self._on_notify)
        finally:
            await self._pool.release(conn)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        log.debug("feature_flags_invalidated", flags=payload)
        self.invalidate()
