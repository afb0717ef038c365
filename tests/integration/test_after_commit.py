"""after_commit: bookkeeping runs once the outermost transaction commits, never on a rollback."""

from __future__ import annotations

import asyncpg
import pytest
from structlog.testing import capture_logs

from opsconductor.lifecycle.storage.execution_records import after_commit, transaction


class Boom(Exception):
    pass


async def test_callbacks_run_after_the_outermost_commit_only(db_pool: asyncpg.Pool) -> None:
    ran: list[str] = []
    async with transaction(db_pool) as conn:
        after_commit(conn, lambda: ran.append("outer"))
        async with transaction(conn) as nested:
            after_commit(nested, lambda: ran.append("nested"))
        assert ran == []  # a savepoint released is not a commit
    assert ran == ["outer", "nested"]


async def test_a_rolled_back_transaction_or_savepoint_drops_its_callbacks(
    db_pool: asyncpg.Pool,
) -> None:
    ran: list[str] = []

    async def failing_transaction(db: object, name: str) -> None:
        async with transaction(db) as conn:  # type: ignore[arg-type]
            after_commit(conn, lambda: ran.append(name))
            raise Boom

    with pytest.raises(Boom):
        await failing_transaction(db_pool, "rolled back")
    async with transaction(db_pool) as conn:
        with pytest.raises(Boom):
            await failing_transaction(conn, "savepoint rolled back")
        after_commit(conn, lambda: ran.append("kept"))
    assert ran == ["kept"]


async def test_outside_a_transaction_it_runs_at_once_and_a_failure_is_only_logged(
    db_pool: asyncpg.Pool,
) -> None:
    ran: list[str] = []

    def failing() -> None:
        raise RuntimeError("bookkeeping bug")

    async with db_pool.acquire() as conn:
        after_commit(conn, lambda: ran.append("now"))
    assert ran == ["now"]
    with capture_logs() as logs:
        async with transaction(db_pool) as conn:
            after_commit(conn, failing)
            after_commit(conn, lambda: ran.append("after the failing one"))
    assert ran == ["now", "after the failing one"]
    assert [e["event"] for e in logs] == ["after_commit_callback_failed"]
