"""Finding 1 of issue 8 replayed against running services: a level-1 ``shell`` plan, approved
by a colleague, tries to steal the worker's database DSN and JWT signing key, read its files
and reach its gRPC port. It now runs, but in the sandbox, and gets none of it; a tenant whose
policy leaves ``shell`` off is refused at submit with nothing written.

The services read a tenant policy file (``OPSC_TENANT_POLICY_FILE``) that enables ``shell``
with interpreters for every tenant but one. The step's output is shifted by one letter inside
the sandbox (``tr``), so the result masker cannot hide a leak from the assertions.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from opsconductor.client import PermissionDeniedError

from . import inspection
from .approvals_support import wait_status, with_approvers
from .conftest import PLANTED_SECRET, Tenant, running_stack
from .inspection import rbac_violations, tenant_row_counts
from .plans import plan
from .stack import HS256_KEY, Stack

LOCKED_TENANT = "t-shell-locked"
POLICY = {
    "defaults": {
        "shell": {
            "enabled": True,
            "executables": ["/bin/sh", "/usr/bin/bash"],
            "allow_interpreters": True,
        }
    },
    "tenants": {LOCKED_TENANT: {"shell": {"enabled": False}}},
}


def shifted(text: str) -> str:
    """What ``tr a-zA-Z0-9 b-zaB-ZA1-90`` makes of ``text``."""
    return text.translate(
        str.maketrans(
            "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
            "bcdefghijklmnopqrstuvwxyzaBCDEFGHIJKLMNOPQRSTUVWXYZA1234567890",
        )
    )


@pytest.fixture(scope="module")
async def stack(e2e_dsn: str, e2e_pool: asyncpg.Pool, redis_url: str) -> AsyncIterator[Stack]:
    """api, worker and approvals service reading the module's tenant policy file."""
    from opsconductor.lifecycle.storage.flags import update_flags

    await update_flags(e2e_pool, {"max_approval_level": 1}, by="e2e")
    policy_file = Path(tempfile.mkdtemp(prefix="opsc-e2e-policy-")) / "tenant_policy.yaml"
    policy_file.write_text(json.dumps(POLICY))  # JSON is YAML
    async with running_stack(
        e2e_dsn, redis_url, with_approvals=True, tenant_policy_file=policy_file
    ) as running:
        yield running


module_end_checks = inspection.module_end_checks
pytestmark = pytest.mark.usefixtures("module_end_checks")


def shell_plan(script: str) -> dict[str, object]:
    step = {
        "id": "steal",
        "action": "shell",
        "action_class": "modify",
        "targets": [{"ref": "host:worker"}],
        "params": {"argv": ["/usr/bin/bash", "-c", script]},
    }
    return plan(step)


async def test_an_approved_shell_step_gets_nothing_of_the_worker(
    tenant: Tenant, stack: Stack, e2e_pool: asyncpg.Pool, e2e_dsn: str
) -> None:
    await with_approvers(tenant)
    key_file = stack.log_dir / ".devstack" / "jwt-hs256.key"  # as make run plants it
    key_file.parent.mkdir(exist_ok=True)
    key_file.touch(mode=0o600)
    key_file.write_text(HS256_KEY)
    worker_port = stack.services["worker"].port
    script = (
        "{ id; cat /proc/$PPID/environ; cat /proc/1/environ; "
        "for p in /proc/[0-9]*; do cat $p/environ; done; env; "
        f"cat {key_file} {stack.log_dir}/worker.log; cat $(readlink /proc/$PPID/cwd)/Makefile; "
        f"echo x > /dev/tcp/127.0.0.1/{worker_port} && echo WORKER-REACHED; }} 2>&1 "
        "| tr '\\0' '\\n' | tr a-zA-Z0-9 b-zaB-ZA1-90"
    )
    async with tenant.client("alice") as client:
        submitted = await client.submit(shell_plan(script), tenant_id=tenant.id)
        assert submitted.status == "awaiting_approval"
        async with tenant.approvals("bob") as approvals:
            await approvals.approve(submitted.approval_id or "", tenant_id=tenant.id)
        done = await wait_status(client, submitted, "succeeded", "failed")
    result = await e2e_pool.fetchval(
        "SELECT result::text FROM execution_steps WHERE execution_id = $1", done.execution_id
    )
    assert done.status == "succeeded", result
    output = json.loads(result)["stdout"]
    assert shifted("uid=2") in output  # the script ran, as a sandbox uid
    database = e2e_dsn.rsplit("/", 1)[1]
    stolen_names = ("OPSC_DATABASE_URL", "OPSC_JWT_HS256_KEY", "OPSC_REDIS_URL")
    for stolen in (HS256_KEY, database, PLANTED_SECRET, "WORKER-REACHED", *stolen_names):
        assert shifted(stolen) not in output, stolen
        assert stolen not in output, stolen


async def test_a_tenant_without_shell_is_refused_at_submit_with_nothing_written(
    stack: Stack, e2e_pool: asyncpg.Pool
) -> None:
    locked = Tenant(id=LOCKED_TENANT, stack=stack, pool=e2e_pool)
    await locked.bind("alice", "operator")
    async with locked.client("alice") as client:
        with pytest.raises(PermissionDeniedError) as info:
            await client.submit(shell_plan("id"), tenant_id=LOCKED_TENANT)
    assert "steps[0].params" in str(info.value)
    assert "shell.enabled" in str(info.value)
    counts = await tenant_row_counts(e2e_pool, LOCKED_TENANT)
    assert counts["executions"] == 0
    assert counts["approvals"] == 0
    [denial] = await rbac_violations(e2e_pool, LOCKED_TENANT, "alice")
    assert (denial["reason"], denial["tier"]) == ("TENANT_POLICY", "api")
