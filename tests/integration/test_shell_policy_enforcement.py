"""The tenant's shell policy, enforced twice: the api refuses at submit (nothing written, the
denial audited) and the worker refuses again when the api is bypassed (finding 1 of issue 8).

Real Postgres, the api's real ``Submissions`` and the worker's real ``ExecutionRunner`` running
the real ``shell`` action in its real sandbox.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import asyncpg
import pytest

from opsconductor.actions.registry import default_registry
from opsconductor.api.logic.submission import Submissions, SubmitRequest
from opsconductor.client.worker import WorkerClient
from opsconductor.common.approval_policy import ApprovalPolicy
from opsconductor.common.auth import Principal
from opsconductor.common.hashing import plan_hash
from opsconductor.common.plan import parse_plan, to_wire_dict
from opsconductor.common.secret_catalogue import SecretCatalogue
from opsconductor.common.secrets import EnvSecretProvider, SecretResolver
from opsconductor.common.tenant_policy import TenantPolicies, TenantPolicyDeniedError
from opsconductor.lifecycle.facade import PostgresRedisLifecycle
from opsconductor.lifecycle.storage.audit import list_rbac_violations
from opsconductor.lifecycle.storage.cancellation import CancelSignals
from opsconductor.lifecycle.storage.execution_reads import get_execution
from opsconductor.lifecycle.storage.execution_stats import ObservedDurations
from opsconductor.lifecycle.storage.executions import NewExecution, create_execution
from opsconductor.lifecycle.storage.flags import FlagCache, update_flags
from opsconductor.lifecycle.storage.policies import load_timeout_policies
from opsconductor.lifecycle.storage.role_bindings import bind_role
from opsconductor.policy.enforcement import SecretUseDeniedError
from opsconductor.policy.rbac import Authorizer, RbacPolicy
from opsconductor.worker.logic.runner import ExecutionRunner

LOCKED = "tenant-locked"  # no shell (the packaged default)
ALLOWED = "tenant-shell"  # shell with /usr/bin/touch allow-listed
POLICY = TenantPolicies.from_document(
    {
        "tenants": {
            ALLOWED: {
                "shell": {"enabled": True, "executables": ["/usr/bin/touch"], "network": False}
            }
        }
    }
)

#: The tenant's API token may be given to /usr/bin/env only.
SECRET_VALUE = "worker-recheck-" + uuid4().hex
CATALOGUE = SecretCatalogue.from_document(
    {"tenants": {ALLOWED: {"env:API_TOKEN": {"shell": ["/usr/bin/env"]}}}}
)


@pytest.fixture
def marker_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="opsc-policy-test-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def shell_plan(argv: list[str], **params: Any) -> dict[str, Any]:
    return {
        "name": "policy-" + uuid4().hex[:8],
        "sla_class": "fast",
        "steps": [
            {
                "id": "run",
                "action": "shell",
                "action_class": "modify",
                "targets": [{"ref": "host:policy"}],
                "params": {"argv": argv, **params},
            }
        ],
    }


@pytest.fixture
async def submissions(db_pool: asyncpg.Pool) -> AsyncIterator[Submissions]:
    await update_flags(
        db_pool,
        {"stage_e_enabled": True, "all_tenants_enabled": True, "max_approval_level": 1},
        by="test",
    )
    for tenant in (LOCKED, ALLOWED):
        await bind_role(db_pool, tenant, "mallory", "operator", created_by="test")
    worker = WorkerClient("127.0.0.1:9")  # never reached: modify plans wait for an approval
    try:
        yield Submissions(
            pool=db_pool,
            authorizer=Authorizer(db_pool, RbacPolicy.load(), tier="api"),
            actions=default_registry(),
            flags=FlagCache(db_pool),
            policies=await load_timeout_policies(db_pool),
            approval_policy=ApprovalPolicy.load(),
            observed=ObservedDurations(db_pool),
            worker=worker,
            lifecycle=PostgresRedisLifecycle(db_pool, None),
            dedup_window=timedelta(hours=24),
            tenant_policies=POLICY,
            secret_catalogue=CATALOGUE,
        )
    finally:
        await worker.close()


async def count_executions(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM executions"))


@pytest.mark.parametrize(
    ("tenant", "plan", "field"),
    [
        (LOCKED, shell_plan(["/usr/bin/touch", "/tmp/x"]), "steps[0].params"),
        (ALLOWED, shell_plan(["/usr/bin/id"]), "steps[0].params.argv[0]"),
        (ALLOWED, shell_plan(["touch", "/tmp/x"]), "steps[0].params.argv[0]"),
        (ALLOWED, shell_plan(["/bin/sh", "-c", "touch /tmp/x"]), "steps[0].params.argv[0]"),
        (
            ALLOWED,
            shell_plan(["/usr/bin/touch", "/tmp/x"], env_allow=["HOSTNAME"]),
            "steps[0].params.env_allow[0]",
        ),
    ],
)
async def test_the_api_refuses_what_the_policy_forbids_and_writes_nothing_but_the_audit(
    submissions: Submissions,
    db_pool: asyncpg.Pool,
    tenant: str,
    plan: dict[str, Any],
    field: str,
) -> None:
    principal = Principal(actor_id="mallory", tenant_id=tenant)
    with pytest.raises(TenantPolicyDeniedError) as info:
        await submissions.submit(principal, "", SubmitRequest(tenant_id=tenant, plan=plan))
    assert info.value.reason == "TENANT_POLICY_DENIED"
    assert info.value.details["field"] == field
    assert field in info.value.message
    assert "/tmp/x" not in info.value.message  # names the path, never the submitted value
    assert await count_executions(db_pool) == 0
    [violation] = await list_rbac_violations(db_pool, tenant)
    assert violation.reason == "TENANT_POLICY"
    assert violation.tier == "api"
    assert violation.actor_id == "mallory"
    assert [v["field"] for v in violation.payload["violations"]] == [field]


async def test_an_allowed_step_is_accepted(submissions: Submissions, db_pool: asyncpg.Pool) -> None:
    """The control: the same kind of plan passes when the policy allows it."""
    principal = Principal(actor_id="mallory", tenant_id=ALLOWED)
    plan = shell_plan(["/usr/bin/touch", "/tmp/x"])
    result = await submissions.submit(principal, "", SubmitRequest(tenant_id=ALLOWED, plan=plan))
    assert result.execution.status == "awaiting_approval"  # modify: level 1
    assert await count_executions(db_pool) == 1


async def _bypassed_execution(pool: asyncpg.Pool, tenant: str, plan_doc: dict[str, Any]) -> Any:
    """An execution written straight to Postgres, as if the api had been bypassed or lenient."""
    plan = parse_plan(plan_doc)
    record, _ = await create_execution(
        pool,
        NewExecution(
            tenant_id=tenant,
            actor_id="mallory",
            request_id=None,
            idempotency_key=hashlib.sha256(uuid4().bytes).hexdigest(),
            plan_hash=plan_hash(plan),
            plan_snapshot={"plan": to_wire_dict(plan), "resolved": {}},
            plan_snapshot_hash="b" * 64,
            execution_mode="immediate",
            sla_class="fast",
            action_class="modify",
            approval_level=0,
            priority=50,
            timeout_policy_id="fast_modify",
            timeout_ms=10_000,
            estimated_duration_ms=1000,
            record_only=False,
            steps=[("run", 0, "shell", "modify")],
        ),
        dedup_window=timedelta(hours=24),
    )
    return record


@pytest.fixture
async def runner(db_pool: asyncpg.Pool, db_dsn: str) -> AsyncIterator[ExecutionRunner]:
    signals = CancelSignals(db_dsn)
    await signals.start()
    try:
        yield ExecutionRunner(
            lifecycle=PostgresRedisLifecycle(db_pool, None),
            pool=db_pool,
            handlers=default_registry(),
            secrets=SecretResolver([]),
            cancel_signals=signals,
            policies=await load_timeout_policies(db_pool),
            worker_id="worker-policy",
            tenant_policies=POLICY,
        )
    finally:
        await signals.stop()


@pytest.mark.parametrize(
    ("tenant", "program"),
    [(LOCKED, "/usr/bin/touch"), (ALLOWED, "/bin/sh")],
)
async def test_the_worker_refuses_even_when_the_api_is_bypassed(
    runner: ExecutionRunner, db_pool: asyncpg.Pool, marker_dir: Path, tenant: str, program: str
) -> None:
    marker = marker_dir / "pwned"
    argv = [program, str(marker)] if program.endswith("touch") else [program, "-c", f"> {marker}"]
    record = await _bypassed_execution(db_pool, tenant, shell_plan(argv))
    with pytest.raises(TenantPolicyDeniedError):
        await runner.run(record)
    assert not marker.exists()
    final = await get_execution(db_pool, tenant, record.id)
    assert final.status == "failed"
    assert final.error_class == "TENANT_POLICY_DENIED"
    assert [s.status for s in final.steps] == ["skipped"]
    [violation] = await list_rbac_violations(db_pool, tenant)
    assert (violation.reason, violation.tier, violation.execution_id) == (
        "TENANT_POLICY",
        "worker",
        record.id,
    )


async def test_an_allowed_step_runs_in_the_sandbox_through_the_worker(
    runner: ExecutionRunner, db_pool: asyncpg.Pool, marker_dir: Path
) -> None:
    """The control, end to end in the worker: bwrap sandbox, the host's /tmp is not its /tmp."""
    marker = marker_dir / "made"
    record = await _bypassed_execution(
        db_pool, ALLOWED, shell_plan(["/usr/bin/touch", str(marker)])
    )
    final = await runner.run(record)
    assert final.status == "failed"  # the host directory does not exist inside the sandbox
    assert not marker.exists()
    assert final.steps[0].result is not None
    assert "No such file or directory" in final.steps[0].result["stderr"]
    ok = await _bypassed_execution(db_pool, ALLOWED, shell_plan(["/usr/bin/touch", "/tmp/made"]))
    assert (await runner.run(ok)).status == "succeeded"


# -- the secret catalogue, enforced by the worker too (finding 2 of issue 8) ------------------


@pytest.fixture
async def secret_runner(db_pool: asyncpg.Pool, db_dsn: str) -> AsyncIterator[ExecutionRunner]:
    signals = CancelSignals(db_dsn)
    await signals.start()
    environ = {"OPSC_SECRET_TENANT_SHELL__API_TOKEN": SECRET_VALUE}
    try:
        yield ExecutionRunner(
            lifecycle=PostgresRedisLifecycle(db_pool, None),
            pool=db_pool,
            handlers=default_registry(),
            secrets=SecretResolver([EnvSecretProvider(environ)], CATALOGUE),
            cancel_signals=signals,
            policies=await load_timeout_policies(db_pool),
            worker_id="worker-secrets",
            tenant_policies=POLICY,
        )
    finally:
        await signals.stop()


async def test_the_worker_refuses_a_secret_use_the_catalogue_does_not_allow(
    secret_runner: ExecutionRunner, db_pool: asyncpg.Pool, marker_dir: Path
) -> None:
    """The api bypassed: a step giving the token to a program it is not catalogued for is
    refused before the first step (nothing runs), the execution fails SECRET_USE_DENIED, and
    the worker tier audits it."""
    marker = marker_dir / "leaked"
    record = await _bypassed_execution(
        db_pool,
        ALLOWED,
        shell_plan(["/usr/bin/touch", str(marker)], env={"T": {"$secret": "env:API_TOKEN"}}),
    )
    with pytest.raises(SecretUseDeniedError):
        await secret_runner.run(record)
    assert not marker.exists()
    final = await get_execution(db_pool, ALLOWED, record.id)
    assert (final.status, final.error_class) == ("failed", "SECRET_USE_DENIED")
    assert [s.status for s in final.steps] == ["skipped"]
    [violation] = await list_rbac_violations(db_pool, ALLOWED)
    assert (violation.reason, violation.tier, violation.execution_id) == (
        "SECRET_USE_DENIED",
        "worker",
        record.id,
    )
    assert SECRET_VALUE not in repr(final)


async def test_the_api_refuses_it_at_submit_with_nothing_written(
    db_pool: asyncpg.Pool, submissions: Submissions
) -> None:
    """The same plan through the api's real Submissions with the catalogue: PERMISSION_DENIED
    naming the field, no execution row, one audited denial under the tenant."""
    principal = Principal(actor_id="mallory", tenant_id=ALLOWED)
    plan = shell_plan(["/usr/bin/touch", "/tmp/x"], env={"T": {"$secret": "env:API_TOKEN"}})
    with pytest.raises(SecretUseDeniedError) as refused:
        await submissions.submit(principal, "", SubmitRequest(tenant_id=ALLOWED, plan=plan))
    assert refused.value.details["field"] == "steps[0].params.env.T"
    assert await count_executions(db_pool) == 0
    [violation] = await list_rbac_violations(db_pool, ALLOWED)
    assert (violation.reason, violation.tier) == ("SECRET_USE_DENIED", "api")
