"""Every ``console`` command of docs/runbooks/, run against a live stack, in page order.

One stack (api and worker as real processes; the shared Redis under a prefix of its
own; a database of this module) serves every runbook. Each runbook runs as one shell session —
exports carry from one command to the next, as at an operator's terminal — after a scenario
that gives it something to act on (a dead-lettered job, a queued execution, a stale lock, a
denial), with the connection settings the runbooks' README documents. A command that exits
non-zero fails the test with its output, so a runbook cannot drift from the code.

Where no ``opsctl`` is installed (the client distribution ships it, so in this project's venv it
always is), its commands are left out and the last test is skipped naming every one of them;
the other commands still run.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

import asyncpg
import pytest

from opsconductor.client import ExecutionClient
from opsconductor.lifecycle.queue import dlq
from opsconductor.lifecycle.queue.redis_queue import RedisQueue, create_redis_client
from opsconductor.lifecycle.storage.execution_leases import fail_lost_execution
from opsconductor.lifecycle.storage.flags import SYSTEM_TENANT, update_flags
from opsconductor.lifecycle.storage.migrate import discover, find_migrations_dir
from opsconductor.lifecycle.storage.role_bindings import bind_role
from tests.deploy.runbooks import console_commands, runbook_names

from .background import background_plan, stack_env
from .conftest import PLANTED_SECRET, running_stack, token
from .plans import plan, probe_step
from .stack import Stack

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
#: The order the runbooks run in: rollback last (it reverts and re-applies a migration).
ORDER = [name for name in runbook_names() if name != "rollback"] + ["rollback"]


@dataclass
class Scenario:
    """What a runbook works on: extra environment for its shell, and a check afterwards."""

    env: dict[str, str] = field(default_factory=dict)
    check: Callable[[], Awaitable[None]] | None = None


@dataclass
class Live:
    stack: Stack
    pool: asyncpg.Pool
    redis_url: str
    tenant: str
    home: Path

    @property
    def queue_prefix(self) -> str:
        return stack_env(self.stack)["OPSC_QUEUE_PREFIX"]

    def env(self) -> dict[str, str]:
        """The operator's environment (docs/runbooks/README.md)."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("OPSC", "PG"))}
        return {
            **base,
            "PATH": f"{BIN}{os.pathsep}{base.get('PATH', '')}",
            "HOME": str(self.home),  # no operator config file of the machine's user
            "OPSC_API_ADDR": self.stack.address("api"),
            "OPSC_PROGRESS_ADDR": self.stack.address("progress"),
            "OPSC_TENANT": SYSTEM_TENANT,
            "OPSC_TOKEN": token("ops-admin", SYSTEM_TENANT),
            "OPSC_TIMEOUT": "20",
            "DATABASE_URL": self.stack.dsn,
            "REDIS_URL": self.redis_url,
            "OPSC_QUEUE_PREFIX": self.queue_prefix,
            "OPSC_DATABASE_URL": self.stack.dsn,
            "OPSC_REDIS_URL": self.redis_url,
            "OPSC_LOG_JSON": "true",
            "NS": "opsconductor",
            "API_PORT": str(self.stack.services["api"].port),
            "TENANT": self.tenant,
            "TENANT_TOKEN": token("alice", self.tenant),
        }

    def client(self, actor: str = "alice") -> ExecutionClient:
        return ExecutionClient(self.stack.address("api"), token(actor, self.tenant))

    def root(self) -> ExecutionClient:
        return ExecutionClient(self.stack.address("api"), token("ops-admin", SYSTEM_TENANT))


@pytest.fixture(scope="module")
async def live(e2e_dsn: str, e2e_pool: asyncpg.Pool, redis_url: str) -> AsyncIterator[Live]:
    tenant = f"t-{secrets.token_hex(4)}"
    await bind_role(e2e_pool, SYSTEM_TENANT, "ops-admin", "admin", created_by="e2e")
    await bind_role(e2e_pool, tenant, "alice", "operator", created_by="e2e")
    await bind_role(e2e_pool, tenant, "ada", "admin", created_by="e2e")
    # `opsctl events` reads the progress service; no runbook needs the approvals service.
    async with running_stack(e2e_dsn, redis_url, with_progress=True) as stack:
        with tempfile.TemporaryDirectory(prefix="opsc-runbooks-") as home:
            yield Live(stack, e2e_pool, redis_url, tenant, Path(home))


def run_runbook(name: str, env: dict[str, str], cwd: Path) -> None:
    """The runbook's console commands as one shell session; fail on the first that fails.

    Without an ``opsctl`` on the PATH its commands are left out and listed in ``NOT_RUN``
    (reported by the last test), and the others still run.
    """
    commands = console_commands(name)
    if shutil.which("opsctl", path=env["PATH"]) is None:
        NOT_RUN.extend(f"{name}: {c}" for c in commands if c.startswith("opsctl"))
        commands = [c for c in commands if not c.startswith("opsctl")]
    script = ["set -o pipefail"]
    for index, command in enumerate(commands):
        script.append(f"echo '>>> {index}'")
        script.append(f"{command} || exit $((100 + {index}))")
    started = time.monotonic()
    result = subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", "\n".join(script)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        failed = result.returncode - 100
        which = commands[failed] if 0 <= failed < len(commands) else "(the shell)"
        pytest.fail(
            f"{name}: `{which}` failed (exit status of the script {result.returncode}, "
            f"{time.monotonic() - started:.1f} s)\n--- stdout\n{result.stdout[-3000:]}"
            f"\n--- stderr\n{result.stderr[-3000:]}"
        )


# --------------------------------------------------------------------------------------------------
# Scenarios: something for each runbook to act on, made through the real services and code paths


async def _queued_background(live: Live, tmp_path: Path) -> UUID:
    """A background execution that stays queued: dispatch drained first."""
    async with live.root() as root:
        await root.set_drain(True)
    tmp_path.mkdir(parents=True, exist_ok=True)
    async with live.client() as alice:
        long = background_plan(tmp_path / "ledger.jsonl", steps=1, hold_s=0.1)
        queued = await alice.submit(long, tenant_id=live.tenant, requested_mode="background")
    assert queued.status == "queued"
    return queued.execution_id


async def scenario_dlq(live: Live, tmp_path: Path) -> Scenario:
    """A dead-lettered job, moved the way the reaper moves one whose last lease expired."""
    execution_id = await _queued_background(live, tmp_path)
    job_id = await live.pool.fetchval(
        "SELECT id FROM execution_queue WHERE execution_id = $1", execution_id
    )
    entry = await dlq.move_to_dlq(
        live.pool, execution_id, attempts=3, error_class="LEASE_EXPIRED", error_message="drill"
    )
    await fail_lost_execution(
        live.pool, execution_id, error_class="LEASE_EXPIRED", error_message="drill", by="reaper"
    )
    redis = create_redis_client(live.redis_url)
    try:
        await RedisQueue(redis, prefix=live.queue_prefix).remove(job_id)
    finally:
        await redis.aclose()

    async def requeued() -> None:
        row = await live.pool.fetchrow("SELECT requeued_by FROM execution_dlq WHERE id = $1", entry)
        assert row["requeued_by"] == "ops-admin"

    return Scenario({"DLQ_ID": str(entry)}, requeued)


async def scenario_execution_stuck(live: Live, tmp_path: Path) -> Scenario:
    execution_id = await _queued_background(live, tmp_path)

    async def cancelled() -> None:
        status = await live.pool.fetchval(
            "SELECT status FROM executions WHERE id = $1", execution_id
        )
        assert status == "cancelled"

    return Scenario({"EXEC_ID": str(execution_id)}, cancelled)


async def scenario_stale_lock(live: Live, tmp_path: Path) -> Scenario:
    """Two locks left by a finished execution: one expired (the reaper's), one not yet."""
    async with live.client() as alice:
        tmp_path.mkdir(parents=True, exist_ok=True)
        short = plan(probe_step("s1", ["host:web-01"], tmp_path / "ledger.jsonl"))
        done = await alice.submit(short, tenant_id=live.tenant)
    assert done.status == "succeeded"
    for suffix, expiry in (("expired", "- interval '1 minute'"), ("held", "+ interval '1 hour'")):
        await live.pool.execute(
            "INSERT INTO execution_locks (lock_key, tenant_id, target_ref, action, owner_token, "
            "owner_execution_id, acquired_at, expires_at) VALUES ($1, $2, $3, 'probe', "
            f"gen_random_uuid(), $4, now() - interval '2 minutes', now() {expiry})",
            f"lock:v1:{live.tenant}:host:{suffix}:probe",
            live.tenant,
            f"host:{suffix}",
            done.execution_id,
        )

    async def released() -> None:
        left = await live.pool.fetchval(
            "SELECT count(*) FROM execution_locks WHERE owner_execution_id = $1", done.execution_id
        )
        assert left == 0

    return Scenario({}, released)


async def scenario_rbac_violation_burst(live: Live, tmp_path: Path) -> Scenario:
    """A real denial: mallory of another tenant reads this tenant's executions."""
    mallory = ExecutionClient(live.stack.address("api"), token("mallory", "t-elsewhere"))
    async with mallory:
        with pytest.raises(PermissionError):
            await mallory.list_executions(tenant_id=live.tenant)
    await bind_role(live.pool, live.tenant, "mallory", "viewer", created_by="e2e")

    async def revoked() -> None:
        left = await live.pool.fetchval(
            "SELECT count(*) FROM role_bindings WHERE principal = 'mallory'"
        )
        assert left == 0

    return Scenario({"ACTOR": "mallory"}, revoked)


async def scenario_secret_leak(live: Live, tmp_path: Path) -> Scenario:
    assert PLANTED_SECRET  # the worker's resolvable secret; plans refer to it by name only
    return Scenario({"SECRET_REF": "env:E2E_DB_PASSWORD"})


SCENARIOS = {
    "dlq": scenario_dlq,
    "execution-stuck": scenario_execution_stuck,
    "stale-lock": scenario_stale_lock,
    "rbac-violation-burst": scenario_rbac_violation_burst,
    "secret-leak": scenario_secret_leak,
}


async def _reset(live: Live) -> None:
    """What one runbook leaves must not change the next: dispatch on, Stage E on."""
    async with live.root() as root:
        await root.set_drain(False)
    await update_flags(live.pool, {"stage_e_enabled": True, "all_tenants_enabled": True}, by="e2e")


#: ``opsctl`` commands that could not run because no ``opsctl`` is installed (see below).
NOT_RUN: list[str] = []


@pytest.mark.parametrize("runbook", ORDER)
async def test_runbook_commands_run_against_a_live_stack(
    live: Live, tmp_path: Path, runbook: str
) -> None:
    make = SCENARIOS.get(runbook)
    scenario = await make(live, tmp_path) if make else Scenario()
    tmp_path.mkdir(exist_ok=True)
    try:
        run_runbook(runbook, {**live.env(), **scenario.env}, tmp_path)
        if scenario.check is not None and shutil.which("opsctl", path=live.env()["PATH"]):
            await scenario.check()
    finally:
        await _reset(live)
    if runbook == "rollback":
        # The page ends by migrating forward again: the schema is whole.
        latest = await live.pool.fetchval("SELECT max(version) FROM schema_migrations")
        assert latest == discover(find_migrations_dir())[-1].version


def test_every_opsctl_command_of_the_runbooks_ran() -> None:
    """Runs after the runbooks: says which opsctl commands were left out, if any."""
    if NOT_RUN:
        pytest.skip(
            f"opsctl is not installed: {len(NOT_RUN)} runbook commands did not run: "
            + "; ".join(NOT_RUN)
        )
