"""``python -m opsconductor.lifecycle.storage.migrate``: what ``make migrate`` runs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from opsconductor.lifecycle.storage.migrate import (
    applied_versions,
    discover,
    find_migrations_dir,
    main,
    migrate_up,
)

UNREACHABLE_DSN = "postgresql://postgres:s3cret-pw@127.0.0.1:1/postgres"
_DATABASE_VARIABLES = ("DATABASE_URL", "OPSC_DATABASE_URL", "OPSC_MIGRATIONS_DIR")
ALL_VERSIONS = [m.version for m in discover(find_migrations_dir())]


async def _run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in _DATABASE_VARIABLES}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "opsconductor.lifecycle.storage.migrate", *args],
        env={**clean, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _log_lines(stdout: str) -> list[dict[str, Any]]:
    """Every stdout line is one JSON log record."""
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


async def test_cli_up_migrates_an_empty_database_from_database_url(
    empty_db_dsn: str, tmp_path: Path
) -> None:
    # Run from an unrelated folder: the migrations are found from the package, not the cwd.
    result = await _run_cli("up", env={"DATABASE_URL": empty_db_dsn}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    applied = [r for r in _log_lines(result.stdout) if r["event"] == "migration_applied"]
    assert [r["version"] for r in applied] == ALL_VERSIONS
    assert all(r["service"] == "migrate" and r["level"] == "info" for r in applied)
    assert {r["logger"] for r in applied} == {"opsconductor.lifecycle.storage.migrate"}
    assert await applied_versions(empty_db_dsn) == ALL_VERSIONS

    again = await _run_cli("up", env={"DATABASE_URL": empty_db_dsn})
    assert again.returncode == 0, again.stderr
    assert not [r for r in _log_lines(again.stdout) if r["event"] == "migration_applied"]


async def test_cli_down_reverts_the_given_number_of_steps_with_dsn_option(db_dsn: str) -> None:
    result = await _run_cli("down", "--steps", "2", "--dsn", db_dsn)
    assert result.returncode == 0, result.stderr
    reverted = [
        r["version"] for r in _log_lines(result.stdout) if r["event"] == "migration_reverted"
    ]
    assert reverted == ALL_VERSIONS[:-3:-1]
    assert await applied_versions(db_dsn) == ALL_VERSIONS[:-2]


async def test_cli_opsc_database_url_takes_precedence(empty_db_dsn: str) -> None:
    env = {"DATABASE_URL": UNREACHABLE_DSN, "OPSC_DATABASE_URL": empty_db_dsn}
    result = await _run_cli("up", env=env)
    assert result.returncode == 0, result.stderr
    assert await applied_versions(empty_db_dsn) == ALL_VERSIONS


async def test_cli_unreachable_database_exits_nonzero_with_one_line_and_no_traceback() -> None:
    result = await _run_cli("up", env={"DATABASE_URL": UNREACHABLE_DSN})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("migrate: error: cannot connect to the database")
    assert "s3cret-pw" not in result.stderr + result.stdout


async def test_cli_without_database_url_says_what_to_set() -> None:
    result = await _run_cli("up")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "migrate: error: no database configured: set DATABASE_URL (or OPSC_DATABASE_URL) "
        "or pass --dsn"
    )


# In-process runs of main(), on a worker thread because main() runs its own event loop.


async def test_main_status_lists_applied_and_pending_migrations(
    empty_db_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from structlog.testing import capture_logs

    monkeypatch.delenv("OPSC_DATABASE_URL", raising=False)
    monkeypatch.setenv("DATABASE_URL", empty_db_dsn)
    await migrate_up(empty_db_dsn)
    assert await asyncio.to_thread(main, ["down", "--steps", "1"]) == 0
    with capture_logs() as logs:
        assert await asyncio.to_thread(main, ["status"]) == 0
    states = [(e["version"], e["state"]) for e in logs if e["event"] == "migration_status"]
    assert states == [(v, "applied") for v in ALL_VERSIONS[:-1]] + [(ALL_VERSIONS[-1], "pending")]


async def test_main_reports_a_domain_error_as_exit_status_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await asyncio.to_thread(main, ["up", "--dsn", UNREACHABLE_DSN, "--dir", str(tmp_path)])
    assert code == 1
    assert capsys.readouterr().err.startswith("migrate: error: cannot connect to the database")


def test_main_without_a_database_returns_usage_status(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in _DATABASE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert main(["up"]) == 2
    assert "set DATABASE_URL" in capsys.readouterr().err


@pytest.mark.parametrize("steps", ["0", "-1", "x"])
def test_main_rejects_non_positive_steps(steps: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["down", "--steps", steps, "--dsn", UNREACHABLE_DSN])
    assert caught.value.code == 2
    assert "--steps" in capsys.readouterr().err
