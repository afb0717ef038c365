"""docs/rollout.md, run: every ``console`` command of the page, in order, as one shell session
against a live stack (api, worker, approvals, progress; the shared Redis under a prefix of its
own; a database of this module starting, like a fresh installation, with Stage E off).

A command that exits non-zero stops the session and fails the test with its output. Afterwards
the test checks what the procedure must have left: the internal tenant's record-only executions
called no handler (their steps hold ``would_run``), the flag history names the admin for every
change, Stage E is back on with the schema whole.
"""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from opsconductor.lifecycle.storage.flags import SYSTEM_TENANT, update_flags
from opsconductor.lifecycle.storage.migrate import discover, find_migrations_dir
from opsconductor.lifecycle.storage.role_bindings import bind_role
from tests.deploy.runbooks import page_blocks

from .conftest import running_stack, token
from .stack import Stack

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "rollout.md"
BIN = Path(sys.executable).parent


def page_commands() -> list[str]:
    return [c for b in page_blocks(PAGE) if b.language == "console" for c in b.commands()]


@pytest.fixture(scope="module")
async def stack(e2e_dsn: str, e2e_pool: asyncpg.Pool, redis_url: str) -> AsyncIterator[Stack]:
    async with running_stack(
        e2e_dsn,
        redis_url,
        with_approvals=True,
        with_progress=True,
        OPSC_CONSUMER_POLL_INTERVAL_S="0.05",
    ) as running:
        yield running


def test_every_stage_of_the_page_is_a_command() -> None:
    """Each stage of the procedure has commands, and they are opsctl's (or the migrations')."""
    text = PAGE.read_text()
    for stage in ("Stage 0", "Stage 1", "Stage 2", "Stage 3", "Stage 4", "Stage 5", "Rollback"):
        assert f"## {stage}" in text
    commands = page_commands()
    assert len(commands) > 30
    for command in commands:
        first = command.split()[0]
        assert first in {"opsctl", "export", "python", "python3"}, command


# The whole procedure is ~45 opsctl processes in a row: more than the default per-test limit
# on a loaded machine.
@pytest.mark.timeout(420)
async def test_the_rollout_page_runs_against_a_live_stack(
    stack: Stack, e2e_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    internal, acme = f"internal-{secrets.token_hex(3)}", f"acme-{secrets.token_hex(3)}"
    admin = f"rollout-admin-{secrets.token_hex(3)}"
    await bind_role(e2e_pool, SYSTEM_TENANT, admin, "admin", created_by="e2e")
    for tenant in (internal, acme):
        await bind_role(e2e_pool, tenant, "olga", "deployer", created_by="e2e")
        await bind_role(e2e_pool, tenant, "abe", "approver", created_by="e2e")
    # A fresh installation: the migrations' defaults (Stage E off, nobody in, level 0).
    await update_flags(
        e2e_pool,
        {
            "stage_e_enabled": False,
            "all_tenants_enabled": False,
            "enabled_tenants": [],
            "record_only_tenants": [],
            "max_approval_level": 0,
        },
        by="e2e",
    )
    (tmp_path / "docs").symlink_to(ROOT / "docs")  # the page's paths, from a scratch folder
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPSC_", "PG"))}
    env = {
        **base,
        "PATH": f"{BIN}{os.pathsep}{base.get('PATH', '')}",
        "HOME": str(tmp_path),
        "OPSC_API_ADDR": stack.address("api"),
        "OPSC_APPROVALS_ADDR": stack.address("approvals"),
        "OPSC_PROGRESS_ADDR": stack.address("progress"),
        "OPSC_TENANT": SYSTEM_TENANT,
        "OPSC_TOKEN": token(admin, SYSTEM_TENANT),
        "OPSC_TIMEOUT": "20",
        "OPSC_DATABASE_URL": stack.dsn,
        "OPSC_LOG_JSON": "true",
        "INTERNAL": internal,
        "INTERNAL_TOKEN": token("olga", internal),
        "APPROVER_TOKEN": token("abe", internal),
        "ACME": acme,
        "ACME_TOKEN": token("olga", acme),
    }
    commands = page_commands()
    script = ["set -o pipefail"]
    for index, command in enumerate(commands):
        script.append(f"echo {shlex.quote(f'>>> {index}: {command[:60]}')} >&2")
        script.append(f"{command} || exit $((100 + {index}))")
    started = time.monotonic()
    result = subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", "\n".join(script)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        failed = result.returncode - 100
        which = commands[failed] if 0 <= failed < len(commands) else "(the shell)"
        pytest.fail(
            f"`{which}` failed (exit {result.returncode}, {time.monotonic() - started:.1f} s)"
            f"\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
        )

    # Record-only: the internal tenant's executions before stage 4 called no handler.
    rows = await e2e_pool.fetch(
        "SELECT e.plan_snapshot->'plan'->>'name' AS plan, e.record_only, s.result "
        "FROM executions e JOIN execution_steps s ON s.execution_id = e.id "
        "WHERE e.tenant_id = $1 ORDER BY e.created_at",
        internal,
    )
    recorded = [r for r in rows if r["record_only"]]
    assert {r["plan"] for r in recorded} == {
        "check-web",
        "restart-web",
        "deploy-web",
        "patch-prod-db",
    }
    assert all(r["result"]["record_only"] is True for r in recorded)
    assert all("would_run" in r["result"] for r in recorded)
    real = [r for r in rows if not r["record_only"]]
    assert [r["plan"] for r in real] == ["check-db"]
    # Every flag change of the page is on record under the admin.
    changed_by = {
        r["changed_by"]
        for r in await e2e_pool.fetch("SELECT changed_by FROM feature_flag_changes")
        if r["changed_by"] != "e2e"
    }
    assert changed_by == {admin}
    flags = {r["name"]: r["value"] for r in await e2e_pool.fetch("SELECT * FROM feature_flags")}
    assert flags["stage_e_enabled"] is True
    assert flags["dispatch_paused"] is False
    latest = await e2e_pool.fetchval("SELECT max(version) FROM schema_migrations")
    assert latest == discover(find_migrations_dir())[-1].version
