"""Helpers for the schema tests: a valid executions row to start from, and a schema dump."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import pytest

#: A valid executions row; tests override single columns to violate one constraint at a time.
VALID_EXECUTION: dict[str, Any] = {
    "tenant_id": "tenant-a",
    "actor_id": "alice",
    "idempotency_key": "0" * 64,
    "plan_hash": "a" * 64,
    "plan_snapshot": {"name": "restart web", "steps": [{"id": "s1", "action": "noop"}]},
    "plan_snapshot_hash": "b" * 64,
    "execution_mode": "immediate",
    "sla_class": "fast",
    "action_class": "read",
    "timeout_policy_id": "fast_read",
    "timeout_ms": 10_000,
}


async def insert_execution(conn: asyncpg.Connection, **overrides: Any) -> UUID:
    """Insert ``VALID_EXECUTION`` with ``overrides``; return the new id.

    ``conn`` must carry the JSON codecs of ``opsconductor.lifecycle.storage.db``.
    """
    row = {**VALID_EXECUTION, **overrides}
    columns = ", ".join(row)  # keys come from this module and the tests, never from input
    placeholders = ", ".join(f"${i}" for i in range(1, len(row) + 1))
    sql = f"INSERT INTO executions ({columns}) VALUES ({placeholders}) RETURNING id"
    execution_id: UUID = await conn.fetchval(sql, *row.values())
    return execution_id


async def server_major_version(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SHOW server_version_num")) // 10000
    finally:
        await conn.close()


def _pg_dump_candidates() -> list[Path]:
    found = []
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        found.append(Path(next(iter(spec.submodule_search_locations))) / "pginstall/bin/pg_dump")
    on_path = shutil.which("pg_dump")
    if on_path:
        found.append(Path(on_path))
    found.extend(sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_dump")))
    return [path for path in found if path.is_file()]


def _pg_dump_major(path: Path) -> int:
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True, check=True)
    match = re.search(r"\) (\d+)", out.stdout)
    assert match, out.stdout
    return int(match.group(1))


def find_pg_dump(server_major: int) -> Path:
    """The pg_dump closest to the server: the lowest major version that is not older than it."""
    usable = [p for p in _pg_dump_candidates() if _pg_dump_major(p) >= server_major]
    if not usable:
        pytest.fail(f"no pg_dump of version >= {server_major} on this machine")
    return min(usable, key=_pg_dump_major)


# pg_dump output that varies between runs or carries no schema: comments, session settings, the
# \restrict / \unrestrict guard lines (random key) of recent pg_dump releases, and the
# per-column ``pg_attver`` option that the local Postgres 15.20 build stamps on every column
# with a creation-dependent value (pg_dump 15.20 hides it, pg_dump 16.2 prints it).
_NOISE = re.compile(
    r"^(--|SET |SELECT pg_catalog\.set_config|\\restrict |\\unrestrict )"
    r"|^ALTER TABLE ONLY \S+ ALTER COLUMN \S+ SET \(pg_attver=\d+\);$"
)


async def dump_schema(dsn: str) -> str:
    """``pg_dump --schema-only`` of ``dsn`` without comments, settings and blank lines."""
    pg_dump = find_pg_dump(await server_major_version(dsn))
    result = await asyncio.to_thread(
        subprocess.run,
        [str(pg_dump), "--schema-only", "--no-owner", "--no-privileges", f"--dbname={dsn}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return "\n".join(line for line in lines if not _NOISE.match(line))
