"""``opsctl`` end to end: the installed console script as a subprocess against real services
(api, worker, approvals, progress, a real Redis), configured the way an operator is — the
``OPSC_*`` environment, no config file.

Each command's exit code and output are what a script would rely on: ``submit --watch`` of a
background plan ends with its final status; approvals are decided; a dead-lettered job is
requeued; flags are set and their history listed; ``shadow-report`` finds the one mismatch; a
bad plan file and a dead server are each one line on stderr with their exit code.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from opsc_test_actions.probe import read_ledger

from opsconductor.client import ExecutionClient
from opsconductor.lifecycle.queue import dlq
from opsconductor.lifecycle.queue.redis_queue import RedisQueue, create_redis_client
from opsconductor.lifecycle.storage.execution_leases import fail_lost_execution
from opsconductor.lifecycle.storage.flags import SYSTEM_TENANT, update_flags
from opsconductor.lifecycle.storage.role_bindings import bind_role

from .approvals_support import RUNBOOK
from .background import background_plan, stack_env
from .conftest import Tenant, running_stack, token
from .inspection import wait_until
from .plans import plan, probe_step
from .stack import Stack

pytestmark = pytest.mark.slow

OPSCTL = str(Path(sys.executable).parent / "opsctl")


@pytest.fixture(scope="module")
async def stack(e2e_dsn: str, e2e_pool: asyncpg.Pool, redis_url: str) -> AsyncIterator[Stack]:
    await update_flags(e2e_pool, {"max_approval_level": 3}, by="e2e")
    async with running_stack(
        e2e_dsn,
        redis_url,
        with_approvals=True,
        with_progress=True,
        OPSC_CONSUMER_POLL_INTERVAL_S="0.05",
    ) as running:
        yield running


@pytest.fixture(scope="module")
async def root_actor(e2e_pool: asyncpg.Pool) -> str:
    actor = f"root-{secrets.token_hex(3)}"
    await bind_role(e2e_pool, SYSTEM_TENANT, actor, "admin", created_by="e2e")
    return actor


class Opsctl:
    """Runs ``opsctl`` as ``actor`` of ``tenant`` with the stack's addresses in the env."""

    def __init__(self, stack: Stack, home: Path) -> None:
        self.stack = stack
        self.home = home

    def env(self, actor: str, tenant: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("OPSC_")}
        return {
            **base,
            "HOME": str(self.home),
            "OPSC_API_ADDR": self.stack.address("api"),
            "OPSC_APPROVALS_ADDR": self.stack.address("approvals"),
            "OPSC_PROGRESS_ADDR": self.stack.address("progress"),
            "OPSC_TENANT": tenant,
            "OPSC_TOKEN": token(actor, tenant),
            "OPSC_TIMEOUT": "20",
        }

    def __call__(
        self, *args: str, actor: str, tenant: str, timeout: float = 90
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [OPSCTL, *args],
            env=self.env(actor, tenant),
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@pytest.fixture
def opsctl(stack: Stack, tmp_path: Path) -> Opsctl:
    home = tmp_path / "home"
    home.mkdir()
    return Opsctl(stack, home)


def _plan_file(path: Path, content: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def _json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def test_submit_watch_follows_a_background_plan_to_its_final_status(
    opsctl: Opsctl, tenant: Tenant, tmp_path: Path
) -> None:
    """A background plan is queued, run by the worker and watched to ``succeeded`` (exit 0);
    the JSON of the same command is the final execution; a failed plan exits 3."""
    ledger = tmp_path / "ledger.jsonl"
    path = _plan_file(tmp_path / "plan.yaml", background_plan(ledger, steps=2, hold_s=0.2))
    watched = opsctl("submit", str(path), "--watch", actor="alice", tenant=tenant.id)
    assert watched.returncode == 0, watched.stderr
    assert "succeeded" in watched.stdout
    assert "s1" in watched.stdout
    assert "s2" in watched.stdout
    assert [line["outcome"] for line in read_ledger(ledger)] == ["ok", "ok"]

    again = _plan_file(tmp_path / "again.yaml", background_plan(ledger, steps=1, hold_s=0.1))
    final = _json(
        opsctl("-o", "json", "submit", str(again), "--watch", actor="alice", tenant=tenant.id)
    )
    assert final["status"] == "succeeded"
    assert final["execution_mode"] == "background"
    assert [s["status"] for s in final["steps"]] == ["succeeded"]

    failing = _plan_file(
        tmp_path / "fail.yaml", plan(probe_step("s1", ["host:x"], ledger, fail=True))
    )
    failed = opsctl("submit", str(failing), "--watch", actor="alice", tenant=tenant.id)
    assert failed.returncode == 3, failed.stdout + failed.stderr
    assert "failed" in failed.stdout


async def test_approvals_are_listed_shown_and_approved(
    opsctl: Opsctl, tenant: Tenant, tmp_path: Path
) -> None:
    """alice submits a modify plan (level 1): it waits for approval; bob lists, shows and
    approves it with opsctl and the execution proceeds; a level-2 request shows its runbook."""
    await tenant.bind("bob", "approver")
    ledger = tmp_path / "ledger.jsonl"
    modify = plan(probe_step("restart", ["svc-1"], ledger, action_class="modify", hold_s=0.05))
    submitted = _json(
        opsctl(
            "-o",
            "json",
            "submit",
            str(_plan_file(tmp_path / "m.yaml", modify)),
            actor="alice",
            tenant=tenant.id,
        )
    )
    assert submitted["status"] == "awaiting_approval"
    approval_id = submitted["approval_id"]
    pending = _json(opsctl("-o", "json", "approvals", "list", actor="bob", tenant=tenant.id))
    assert approval_id in [a["approval_id"] for a in pending]
    shown = opsctl("approvals", "show", approval_id, actor="bob", tenant=tenant.id)
    assert shown.returncode == 0, shown.stderr
    assert "restart" in shown.stdout
    approved = opsctl(
        "approvals",
        "approve",
        approval_id,
        "--comment",
        "looks fine",
        actor="bob",
        tenant=tenant.id,
    )
    assert approved.returncode == 0, approved.stderr
    assert "approved by bob" in approved.stdout
    async with tenant.client("alice") as alice:

        async def done() -> str | None:
            execution = await alice.get(submitted["execution_id"], tenant_id=tenant.id)
            return execution.status if execution.is_terminal else None

        assert await wait_until(done, within_s=30, what="the approved execution") == "succeeded"
    twice = opsctl("approvals", "approve", approval_id, actor="bob", tenant=tenant.id)
    assert twice.returncode == 1
    assert "APPROVAL_ALREADY_DECIDED" in _one_line(twice)

    deploy = plan(
        probe_step("deploy", ["web-1"], ledger, action_class="deploy", hold_s=0.05),
        sla="medium",
        runbook_url=RUNBOOK,
    )
    await tenant.bind("dave", "deployer")
    level2 = _json(
        opsctl(
            "-o",
            "json",
            "submit",
            str(_plan_file(tmp_path / "d.yaml", deploy)),
            actor="dave",
            tenant=tenant.id,
        )
    )
    shown = opsctl("approvals", "show", level2["approval_id"], actor="bob", tenant=tenant.id)
    assert f"runbook: {RUNBOOK}" in shown.stdout
    rejected = opsctl("approvals", "reject", level2["approval_id"], actor="bob", tenant=tenant.id)
    assert rejected.returncode == 0, rejected.stderr
    assert "rejected" in rejected.stdout


async def test_a_dead_lettered_job_is_requeued(
    opsctl: Opsctl,
    stack: Stack,
    tenant: Tenant,
    root_actor: str,
    e2e_pool: asyncpg.Pool,
    redis_url: str,
    tmp_path: Path,
) -> None:
    """A job dead-lettered the way the reaper does it is listed and requeued with opsctl: a new
    execution runs the frozen plan to success."""
    async with ExecutionClient(stack.address("api"), token(root_actor, SYSTEM_TENANT)) as root:
        await root.set_drain(True)
        try:
            async with tenant.client("alice") as alice:
                queued = await alice.submit(
                    background_plan(tmp_path / "l.jsonl", steps=1, hold_s=0.05),
                    tenant_id=tenant.id,
                )
        finally:
            await root.set_drain(False)
    job_id = await e2e_pool.fetchval(
        "SELECT id FROM execution_queue WHERE execution_id = $1", queued.execution_id
    )
    # Take it out of the queue before the (resumed) workers can, then dead-letter it.
    redis = create_redis_client(redis_url)
    try:
        await RedisQueue(redis, prefix=stack_env(stack)["OPSC_QUEUE_PREFIX"]).remove(job_id)
    finally:
        await redis.aclose()
    entry = await dlq.move_to_dlq(
        e2e_pool, queued.execution_id, attempts=3, error_class="LEASE_EXPIRED", error_message="x"
    )
    await fail_lost_execution(
        e2e_pool, queued.execution_id, error_class="LEASE_EXPIRED", error_message="x", by="reaper"
    )
    listed = _json(opsctl("-o", "json", "dlq", "list", actor=root_actor, tenant=SYSTEM_TENANT))
    assert str(entry) in [e["dlq_id"] for e in listed]
    requeued = opsctl("dlq", "requeue", str(entry), actor=root_actor, tenant=SYSTEM_TENANT)
    assert requeued.returncode == 0, requeued.stderr
    assert "new execution" in requeued.stdout
    new_id = requeued.stdout.split("new execution ")[1].split()[0]
    async with tenant.client("alice") as alice:

        async def done() -> str | None:
            execution = await alice.get(new_id, tenant_id=tenant.id)
            return execution.status if execution.is_terminal else None

        assert await wait_until(done, within_s=30, what="the requeued execution") == "succeeded"
    again = opsctl("dlq", "requeue", str(entry), actor=root_actor, tenant=SYSTEM_TENANT)
    assert again.returncode == 1
    _one_line(again)


async def test_flags_set_get_and_history(
    opsctl: Opsctl, root_actor: str, e2e_pool: asyncpg.Pool
) -> None:
    """flags set applies name=value, +=, -= in one audited update; history shows who and
    old -> new; a bad assignment is a usage error (exit 2) and changes nothing."""
    try:
        before = _json(opsctl("-o", "json", "flags", "get", actor=root_actor, tenant=SYSTEM_TENANT))
        changed = _json(
            opsctl(
                "-o",
                "json",
                "flags",
                "set",
                "max_approval_level=2",
                "enabled_tenants+=acme",
                "record_only_tenants+=acme",
                actor=root_actor,
                tenant=SYSTEM_TENANT,
            )
        )
        assert changed["max_approval_level"] == 2
        assert "acme" in changed["enabled_tenants"]
        assert changed["record_only_tenants"] == sorted({*before["record_only_tenants"], "acme"})
        removed = _json(
            opsctl(
                "-o",
                "json",
                "flags",
                "set",
                "record_only_tenants-=acme",
                actor=root_actor,
                tenant=SYSTEM_TENANT,
            )
        )
        assert "acme" not in removed["record_only_tenants"]
        history = _json(
            opsctl(
                "-o",
                "json",
                "flags",
                "history",
                "--flag",
                "max_approval_level",
                actor=root_actor,
                tenant=SYSTEM_TENANT,
            )
        )
        assert history[0]["changed_by"] == root_actor
        assert (history[0]["old_value"], history[0]["new_value"]) == (
            before["max_approval_level"],
            2,
        )
        table = opsctl("flags", "history", actor=root_actor, tenant=SYSTEM_TENANT)
        assert root_actor in table.stdout
        assert "record_only_tenants" in table.stdout
        bad = opsctl(
            "flags", "set", "stage_e_enabled=maybe", actor=root_actor, tenant=SYSTEM_TENANT
        )
        assert bad.returncode == 2
        assert "stage_e_enabled takes =true or =false" in bad.stderr
        assert "Traceback" not in bad.stderr
    finally:
        await update_flags(
            e2e_pool,
            {"max_approval_level": 3, "enabled_tenants": [], "record_only_tenants": []},
            by="e2e",
        )


async def test_shadow_report_finds_the_one_mismatch(
    opsctl: Opsctl, tenant: Tenant, root_actor: str, e2e_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """Two plans recorded in record-only; an expected-outcomes file that is right about one and
    wrong about the other's approval level: one MISMATCH line, exit 8. The corrected file:
    exit 0."""
    await update_flags(e2e_pool, {"record_only_tenants": [tenant.id]}, by="e2e")
    try:
        ledger = tmp_path / "ledger.jsonl"
        read = plan(probe_step("check", ["host:web-01"], ledger), name="check-web")
        await tenant.bind("bob", "approver")
        for content in (read,):
            result = opsctl(
                "submit",
                str(_plan_file(tmp_path / "r.yaml", content)),
                "--watch",
                actor="alice",
                tenant=tenant.id,
            )
            assert result.returncode == 0, result.stderr
        restart = plan(
            probe_step("drain", ["host:web-02"], ledger, action_class="modify"),
            probe_step("restart", ["host:web-02"], ledger, action_class="modify"),
            name="restart-web",
        )
        waiting = _json(
            opsctl(
                "-o",
                "json",
                "submit",
                str(_plan_file(tmp_path / "m.yaml", restart)),
                actor="alice",
                tenant=tenant.id,
            )
        )
        assert (
            opsctl(
                "approvals", "approve", waiting["approval_id"], actor="bob", tenant=tenant.id
            ).returncode
            == 0
        )
        assert read_ledger(ledger) == [], "record-only ran a handler"
        expected = {
            "plans": [
                {
                    "name": "check-web",
                    "mode": "immediate",
                    "approval_level": 0,
                    "targets": ["host:web-01"],
                    "steps": ["check"],
                    "record_only": True,
                },
                {
                    "name": "restart-web",
                    "approval_level": 2,  # wrong: a modify plan needs level 1
                    "targets": ["host:web-02"],
                    "steps": [{"id": "drain", "action": "probe"}, "restart"],
                },
            ]
        }
        wrong = tmp_path / "expected.yaml"
        wrong.write_text(yaml.safe_dump(expected))

        async def recorded() -> bool:
            async with tenant.client("alice") as alice:
                run = await alice.get(waiting["execution_id"], tenant_id=tenant.id)
            return run.is_terminal

        await wait_until(recorded, within_s=30, what="the approved execution to end")
        report = opsctl(
            "shadow-report",
            "--expected",
            str(wrong),
            "--since",
            "1h",
            actor="alice",
            tenant=tenant.id,
        )
        assert report.returncode == 8, report.stdout + report.stderr
        mismatches = [line for line in report.stdout.splitlines() if line.startswith("MISMATCH")]
        assert len(mismatches) == 1, report.stdout
        assert "restart-web" in mismatches[0]
        assert "approval_level 1, expected 2" in mismatches[0]
        assert "ok       check-web" in report.stdout

        expected["plans"][1]["approval_level"] = 1
        right = tmp_path / "right.yaml"
        right.write_text(yaml.safe_dump(expected))
        clean = opsctl(
            "-o",
            "json",
            "shadow-report",
            "--expected",
            str(right),
            "--since",
            "1h",
            actor="alice",
            tenant=tenant.id,
        )
        assert clean.returncode == 0, clean.stdout + clean.stderr
        assert json.loads(clean.stdout) == {
            "matched": ["check-web", "restart-web"],
            "mismatches": [],
        }
    finally:
        await update_flags(e2e_pool, {"record_only_tenants": []}, by="e2e")


async def test_events_and_audit_verify(opsctl: Opsctl, tenant: Tenant, tmp_path: Path) -> None:
    """events lists an execution's events in order (and --follow ends at its completion);
    audit verify finds its chain intact (exit 0)."""
    path = _plan_file(tmp_path / "p.yaml", plan(probe_step("s1", ["h"], tmp_path / "l.jsonl")))
    done = _json(opsctl("-o", "json", "submit", str(path), actor="alice", tenant=tenant.id))
    listed = _json(
        opsctl("-o", "json", "events", done["execution_id"], actor="ada", tenant=tenant.id)
    )
    types = [e["type"] for e in listed]
    assert types[0] == "execution_started"
    assert types[-1] == "execution_completed"
    followed = opsctl("events", done["execution_id"], "--follow", actor="ada", tenant=tenant.id)
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout.strip().splitlines()[-1].split()[2] == "execution_completed"
    verified = opsctl("audit", "verify", done["execution_id"], actor="ada", tenant=tenant.id)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith("intact:")


async def test_a_bad_plan_file_is_one_line_and_exit_2(
    opsctl: Opsctl, tenant: Tenant, tmp_path: Path
) -> None:
    """A file opsctl cannot turn into a plan, and a plan the service finds invalid: one line on
    stderr naming the field path, exit 2, nothing submitted."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nsla_class: fast\nsteps:\n  - id: s1\n    targets: nope\n")
    result = opsctl("submit", str(broken), actor="alice", tenant=tenant.id)
    assert result.returncode == 2
    assert _one_line(result) == (f"opsctl: error: {broken}: steps[0].action: is required")
    invalid = _plan_file(
        tmp_path / "invalid.yaml",
        plan({"id": "s1", "action": "no-such-action", "action_class": "read", "targets": ["h"]}),
    )
    result = opsctl("submit", str(invalid), actor="alice", tenant=tenant.id)
    assert result.returncode == 2
    line = _one_line(result)
    assert line.startswith("opsctl: error: the service rejected the plan: steps[0].action")
    async with tenant.client("alice") as alice:
        assert (await alice.list_executions(tenant_id=tenant.id))[0] == []


async def test_a_dead_server_is_one_line_and_non_zero(opsctl: Opsctl, tenant: Tenant) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = opsctl("--api", f"127.0.0.1:{port}", "list", actor="alice", tenant=tenant.id)
    assert result.returncode == 1
    assert _one_line(result).startswith("opsctl: error: cannot reach the service")
    assert result.stdout == ""
    no_token = subprocess.run(
        [OPSCTL, "list"],
        env={**opsctl.env("alice", tenant.id), "OPSC_TOKEN": ""},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert no_token.returncode == 2
    assert "no token" in _one_line(no_token)
