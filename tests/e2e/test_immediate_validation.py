"""Bad input is refused at the door: INVALID_ARGUMENT with the offending field, nothing written.

Also background-sized plans on this Redis-less stack: never run immediately, refused as
QUEUE_UNAVAILABLE, nothing written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from opsc_test_actions import read_ledger

from opsconductor.client import ExecutionClient, PlanValidationError, QueueUnavailableError

from . import inspection
from .conftest import Tenant
from .inspection import tenant_row_counts
from .plans import plan, probe_step

module_end_checks = inspection.module_end_checks
pytestmark = pytest.mark.usefixtures("module_end_checks")


def _valid(ledger: Path) -> dict[str, Any]:
    return plan(probe_step("check", ["srv-1"], ledger))


def _without_name(ledger: Path) -> dict[str, Any]:
    data = _valid(ledger)
    del data["name"]
    return data


def _with_step(ledger: Path, **changes: Any) -> dict[str, Any]:
    data = _valid(ledger)
    data["steps"][0].update(changes)
    return data


def _with_params(ledger: Path, **params: Any) -> dict[str, Any]:
    data = _valid(ledger)
    data["steps"][0]["params"].update(params)
    return data


#: case -> (plan builder, field path of the violation, actor submitting it)
BAD_PLANS: dict[str, tuple[Callable[[Path], dict[str, Any]], str, str]] = {
    "missing_name": (_without_name, "name", "alice"),
    "blank_name": (lambda ledger: {**_valid(ledger), "name": "   "}, "name", "alice"),
    "no_steps": (lambda ledger: {**_valid(ledger), "steps": []}, "steps", "alice"),
    "unknown_action": (
        lambda ledger: _with_step(ledger, action="no-such-action"),
        "steps[0].action",
        "alice",
    ),
    "oversize_params": (
        lambda ledger: _with_params(ledger, emit="x" * (64 * 1024 + 1)),
        "steps[0].params",
        "alice",
    ),
    "bad_param_type": (
        lambda ledger: _with_params(ledger, hold_s="soon"),
        "steps[0].params.hold_s",
        "alice",
    ),
    "empty_targets": (lambda ledger: _with_step(ledger, targets=[]), "steps[0].targets", "alice"),
    # deploy under the fast SLA has no timeout policy: invalid input, reported before any
    # approval gating or deploy authorization (dave may deploy; alice may not).
    "sla_action_combination_deployer": (
        lambda ledger: plan(
            {"id": "ship", "action": "noop", "action_class": "deploy", "targets": [{"ref": "a"}]},
            sla="fast",
        ),
        "sla_class",
        "dave",
    ),
    "sla_action_combination_operator": (
        lambda ledger: plan(
            {"id": "ship", "action": "noop", "action_class": "deploy", "targets": [{"ref": "a"}]},
            sla="fast",
        ),
        "sla_class",
        "alice",
    ),
    "nul_in_target_ref": (
        lambda ledger: _with_step(ledger, targets=[{"ref": "srv\x001"}]),
        "steps[0].targets[0].ref",
        "alice",
    ),
    "control_chars_in_target_ref": (
        lambda ledger: _with_step(ledger, targets=[{"ref": "srv-\x1b[2J\x07"}]),
        "steps[0].targets[0].ref",
        "alice",
    ),
    "control_chars_in_name": (
        lambda ledger: {**_valid(ledger), "name": "deploy\r\nInjected: yes"},
        "name",
        "alice",
    ),
    # Literal credentials (issue 8, finding 9): refused before anything is stored or returned.
    "literal_authorization_header": (
        lambda ledger: plan(
            {
                "id": "call",
                "action": "http",
                "action_class": "read",
                "targets": [{"ref": "api"}],
                "params": {
                    "url": "https://api.example/v1",
                    "headers": {"Authorization": "Bearer s3cr3t-literal-token"},
                },
            }
        ),
        "steps[0].params.headers.Authorization",
        "alice",
    ),
    "bearer_token_in_any_header": (
        lambda ledger: plan(
            {
                "id": "call",
                "action": "http",
                "action_class": "read",
                "targets": [{"ref": "api"}],
                "params": {
                    "url": "https://api.example/v1",
                    "headers": {"X-Forward": "bearer s3cr3t-literal-token"},
                },
            }
        ),
        "steps[0].params.headers.X-Forward",
        "alice",
    ),
    "literal_password_nested_in_params": (
        lambda ledger: _with_params(ledger, config={"db": {"DB_Password": "hunter2hunter2"}}),
        "steps[0].params.config.db.DB_Password",
        "alice",
    ),
    "control_chars_in_step_id": (
        lambda ledger: _with_step(ledger, id="step\x00one"),
        "steps[0].id",
        "alice",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
async def test_bad_plan_is_invalid_argument_naming_the_field_and_writes_nothing(
    case: str, tenant: Tenant, ledger: Path, e2e_pool: asyncpg.Pool
) -> None:
    """Each malformed plan gets INVALID_ARGUMENT (PlanValidationError) with a violation on the
    right field path, from SubmitExecution and PreviewPlan alike; no row of the tenant is
    written (not even an event) and nothing runs."""
    build, field, actor = BAD_PLANS[case]
    before = await tenant_row_counts(e2e_pool, tenant.id)
    async with tenant.client(actor) as client:
        with pytest.raises(PlanValidationError) as submitted:
            await client.submit(build(ledger), tenant_id=tenant.id)
        with pytest.raises(PlanValidationError) as previewed:
            await client.preview(build(ledger), tenant_id=tenant.id)
    for error in (submitted.value, previewed.value):
        fields = [v.field for v in error.violations]
        assert field in fields, (case, error.violations)
        assert all(v.description for v in error.violations)
    assert await tenant_row_counts(e2e_pool, tenant.id) == before
    assert read_ledger(ledger) == []


@pytest.mark.parametrize("priority", [-1, 101])
async def test_priority_outside_0_to_100_is_invalid(
    priority: int, tenant: Tenant, ledger: Path, e2e_pool: asyncpg.Pool
) -> None:
    """Priority must be 0 (urgent) to 100 (bulk): -1 and 101 are INVALID_ARGUMENT on field
    ``priority``; nothing written, nothing run."""
    before = await tenant_row_counts(e2e_pool, tenant.id)
    async with tenant.client("alice") as client:
        with pytest.raises(PlanValidationError) as refused:
            await client.submit(_valid(ledger), tenant_id=tenant.id, priority=priority)
    assert [v.field for v in refused.value.violations] == ["priority"]
    assert await tenant_row_counts(e2e_pool, tenant.id) == before
    assert read_ledger(ledger) == []


async def _first_page_token(client: ExecutionClient, tenant: Tenant, ledger: Path) -> str:
    for _ in range(2):
        await client.submit(_valid(ledger), tenant_id=tenant.id)
    page, token = await client.list_executions(tenant_id=tenant.id, page_size=1)
    assert len(page) == 1
    assert token
    return token


async def test_bad_page_token_is_invalid_argument_on_field_page_token(
    tenant: Tenant, ledger: Path
) -> None:
    """ListExecutions refuses a token it did not issue, and a real token reused with other
    filters, with INVALID_ARGUMENT on ``page_token``."""
    async with tenant.client("alice") as client:
        token = await _first_page_token(client, tenant, ledger)
        for kwargs in (
            {"page_token": "garbage!"},
            {"page_token": token[:-4] + "AAAA"},
            {"page_token": token, "statuses": ["failed"]},
        ):
            with pytest.raises(PlanValidationError) as refused:
                await client.list_executions(tenant_id=tenant.id, page_size=1, **kwargs)
            assert [v.field for v in refused.value.violations] == ["page_token"], kwargs


@pytest.mark.parametrize(
    ("params", "requested_mode"),
    [({"estimate_ms": 60_000}, None), ({}, "background")],
    ids=["estimated_60s", "asked_for_background"],
)
async def test_background_plans_never_run_immediately_and_leave_nothing_without_redis(
    params: dict[str, Any],
    requested_mode: str | None,
    tenant: Tenant,
    ledger: Path,
    e2e_pool: asyncpg.Pool,
) -> None:
    """A plan estimated over 10 s (or explicitly asking for background) is never run on the
    immediate path: with this stack's Redis unreachable it is refused UNAVAILABLE /
    QUEUE_UNAVAILABLE with nothing written (no phantom execution keeping its idempotency
    key) and nothing run; PreviewPlan says "background"."""
    plan_ = plan(probe_step("long", ["srv-1"], ledger, **params))
    before = await tenant_row_counts(e2e_pool, tenant.id)
    async with tenant.client("alice") as client:
        preview = await client.preview(plan_, tenant_id=tenant.id, requested_mode=requested_mode)
        for _ in range(2):  # the same submit again: still refused, still nothing kept
            with pytest.raises(QueueUnavailableError):
                await client.submit(plan_, tenant_id=tenant.id, requested_mode=requested_mode)
    assert preview.execution_mode == "background"
    assert await tenant_row_counts(e2e_pool, tenant.id) == before
    assert read_ledger(ledger) == []
