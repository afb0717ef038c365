"""Migration 0005 carries the flag changes audited before it (``feature_flags_updated`` events of
the system tenant) into ``feature_flag_changes``, so the history starts at the beginning."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import asyncpg

from opsconductor.lifecycle.storage.migrate import discover, find_migrations_dir, migrate_up


def _folder_up_to(tmp_path: Path, version: int) -> Path:
    folder = tmp_path / f"upto-{version}"
    folder.mkdir()
    for path in find_migrations_dir().glob("*.sql"):
        if int(path.name.split("_", 1)[0]) <= version:
            shutil.copy(path, folder / path.name)
    return folder


async def test_old_flag_events_become_history_rows(empty_db_dsn: str, tmp_path: Path) -> None:
    assert any(m.version == 5 for m in discover(find_migrations_dir()))
    await migrate_up(empty_db_dsn, _folder_up_to(tmp_path, 4))
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        await conn.execute(
            "INSERT INTO execution_events (execution_id, tenant_id, actor_id, seq, type, payload) "
            "VALUES (NULL, '_system', 'ann', 0, 'feature_flags_updated', $1::jsonb)",
            json.dumps(
                {
                    "changes": {"stage_e_enabled": True, "enabled_tenants": ["internal"]},
                    "previous": {"stage_e_enabled": False, "enabled_tenants": []},
                }
            ),
        )
    finally:
        await conn.close()
    await migrate_up(empty_db_dsn, _folder_up_to(tmp_path, 5))
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        rows = await conn.fetch(
            "SELECT flag, old_value::text, new_value::text, changed_by FROM feature_flag_changes "
            "ORDER BY flag"
        )
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [
        ("enabled_tenants", "[]", '["internal"]', "ann"),
        ("stage_e_enabled", "false", "true", "ann"),
    ]
