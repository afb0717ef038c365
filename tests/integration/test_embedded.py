"""Embedded dev servers: usable by asyncpg and by other processes, restartable, never orphaned."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from opsconductor.devstack.embedded import (
    EmbeddedServerError,
    _process_alive,
    start_postgres,
    start_redis,
)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: as root, Postgres runs as the `pgserver` user, which cannot traverse
    # pytest's 0700 base folder.
    folder = Path(tempfile.mkdtemp(prefix="opsc-embedded-test-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _psql() -> str:
    found = shutil.which("psql")
    assert found, "psql (libpq client) is needed to prove other processes can connect"
    return found


def _run_and_crash(script: str) -> int:
    """Run ``script`` in a child interpreter that is then SIGKILLed (no atexit, no cleanup).

    The script prints ``PID=<pid>`` of the server it started; that pid is returned.
    """
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as child:
        assert child.stdout is not None
        for line in child.stdout:  # the child's log lines come first
            if line.startswith("PID="):
                break
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert line.startswith("PID="), "the child did not start its server"
    return int(line.removeprefix("PID="))


async def test_postgres_dsn_works_for_asyncpg_and_for_libpq_subprocesses(data_dir: Path) -> None:
    server = await asyncio.to_thread(start_postgres, data_dir / "pg")
    try:
        conn = await asyncpg.connect(server.dsn)
        try:
            assert await conn.fetchval("SELECT current_user") == "postgres"
        finally:
            await conn.close()
        psql = await asyncio.to_thread(
            subprocess.run,
            [_psql(), server.dsn, "-Atc", "SELECT 40 + 2"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert psql.stdout.strip() == "42", psql.stderr
    finally:
        await asyncio.to_thread(server.stop)
    assert not _process_alive(server.pid)


def test_second_start_shares_the_server_until_the_last_handle_stops(data_dir: Path) -> None:
    first = start_postgres(data_dir / "pg")
    second = start_postgres(data_dir / "pg")
    try:
        assert (second.pid, second.dsn) == (first.pid, first.dsn)
        first.stop()
        first.stop()  # idempotent: does not release the second handle
        assert _process_alive(second.pid)
    finally:
        second.stop()
    assert not _process_alive(first.pid)

    again = start_postgres(data_dir / "pg")  # the cluster survives a stop
    try:
        assert again.pid != first.pid
        assert _process_alive(again.pid)
    finally:
        again.stop()


def test_postgres_left_by_a_crashed_process_is_adopted_then_stopped(data_dir: Path) -> None:
    orphan = _run_and_crash(
        f"""
        from pathlib import Path
        from opsconductor.devstack.embedded import start_postgres
        server = start_postgres(Path({str(data_dir / "pg")!r}))
        print("PID=" + str(server.pid), flush=True)
        import time; time.sleep(60)
        """
    )
    assert _process_alive(orphan)
    server = start_postgres(data_dir / "pg")
    try:
        assert server.pid == orphan
    finally:
        server.stop()
    assert not _process_alive(orphan)


def test_postgres_restarted_meanwhile_is_stopped_too(data_dir: Path) -> None:
    """Finding 11 of issue 8: the postmaster crashed and was started again behind the handle's
    back (a new pid in ``postmaster.pid``). Stopping the handle must not fail (pgserver tries to
    kill the dead pid it recorded and raises ``psutil.NoSuchProcess``) and must stop the
    postmaster that runs the folder now, not leave it running."""
    server = start_postgres(data_dir / "pg")  # imports pgserver, quieting its import warning
    from pgserver._commands import pg_ctl

    restarted: int | None = None
    try:
        os.kill(server.pid, signal.SIGKILL)
        assert _wait_gone(server.pid)
        # The same options as pgserver's start: no TCP, the same socket folder.
        socket_dir = (server.data_dir / "postmaster.opts").read_text().split('"-k" "')[1]
        options = f'-h "" -k {socket_dir.split(chr(34))[0]}'
        argv = ["-w", "-l", str(server.data_dir / "log"), "-o", options]
        deadline = time.monotonic() + 20
        while True:  # the dead postmaster's children take a moment to release shared memory
            try:
                pg_ctl([*argv, "start"], pgdata=server.data_dir, user="pgserver", timeout=30)
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        restarted = int((server.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        assert restarted != server.pid
        assert _process_alive(restarted)
    finally:
        server.stop()
    assert restarted is not None
    assert not _process_alive(restarted), "the restarted postmaster was left running"


def _wait_gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while _process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_redis_starts_on_a_free_port_and_restarts_on_the_same_port(data_dir: Path) -> None:
    import redis

    server = start_redis(data_dir / "redis")
    try:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        assert client.ping() is True
        client.close()
    finally:
        server.stop()
    server.stop()  # idempotent
    assert not _process_alive(server.pid)

    again = start_redis(data_dir / "redis", port=server.port)
    try:
        assert again.url == server.url
        with pytest.raises(EmbeddedServerError, match="did not start"):
            start_redis(data_dir / "other", port=server.port)  # port taken
    finally:
        again.stop()


def test_redis_left_by_a_crashed_process_is_replaced(data_dir: Path) -> None:
    orphan = _run_and_crash(
        f"""
        from pathlib import Path
        from opsconductor.devstack.embedded import start_redis
        server = start_redis(Path({str(data_dir / "redis")!r}))
        print("PID=" + str(server.pid), flush=True)
        import time; time.sleep(60)
        """
    )
    assert _process_alive(orphan)
    server = start_redis(data_dir / "redis")
    try:
        assert not _process_alive(orphan)
        assert server.pid != orphan
    finally:
        server.stop()
