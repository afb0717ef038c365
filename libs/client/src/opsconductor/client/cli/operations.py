"""``opsctl`` commands for operators: approvals, the dead-letter queue, dispatch, feature flags,
development tokens and the shadow report of a record-only rollout."""

from __future__ import annotations

import asyncio
import json
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from opsconductor.client.approvals import Approval, ApprovalClient
from opsconductor.client.cli import exit_codes
from opsconductor.client.cli.dev_token import (
    DEFAULT_AUDIENCE,
    DEFAULT_KEY_FILE,
    mint_dev_token,
    read_dev_key,
)
from opsconductor.client.cli.main import Cli, pass_cli, run_async
from opsconductor.client.cli.render import Column
from opsconductor.client.cli.shadow import compare, load_expected, recorded_executions
from opsconductor.client.client import ExecutionClient
from opsconductor.client.models import DlqEntry, FeatureFlags, FlagChange
from opsconductor.contract.errors import NotFoundError

__all__ = ["register"]

SYSTEM_TENANT = "_system"


def _admin(app: Cli) -> ExecutionClient:
    conn = app.connection
    return ExecutionClient(conn.api, conn.require_token(), timeout=conn.timeout_s, tls=conn.tls)


def _approvals(app: Cli) -> ApprovalClient:
    conn = app.connection
    return ApprovalClient(
        conn.approvals, conn.require_token(), timeout=conn.timeout_s, tls=conn.tls
    )


# -- approvals ------------------------------------------------------------------------------

_APPROVAL_COLUMNS: list[Column] = [
    ("approval", lambda a: a.approval_id),
    ("execution", lambda a: a.execution_id),
    ("level", lambda a: a.level),
    ("step", lambda a: a.step_id),
    ("state", lambda a: a.state),
    ("requested-by", lambda a: a.requested_by),
    ("expires", lambda a: a.expires_at),
    ("runbook", lambda a: a.runbook_url if a.level >= 2 else None),
]


@click.group()
def approvals() -> None:
    """Approval requests: list the pending ones, inspect, approve or reject."""


@approvals.command(name="list")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@pass_cli
def approvals_list(app: Cli, limit: int) -> int:
    """Pending approval requests of the tenant, oldest first."""
    tenant = app.connection.require_tenant()

    async def go() -> list[Approval]:
        found: list[Approval] = []
        token = ""
        async with _approvals(app) as client:
            while len(found) < limit:
                page, token = await client.list_pending_approvals(
                    tenant_id=tenant, page_size=min(limit, 100), page_token=token
                )
                found.extend(page)
                if not token:
                    break
        return found[:limit]

    app.out.emit(run_async(go), _APPROVAL_COLUMNS)
    return exit_codes.OK


def _show_approval(app: Cli, approval: Approval) -> None:
    if app.out.json:
        app.out.emit(approval)
        return
    app.out.fields(approval, skip=("plan",))
    if approval.level >= 2:
        # Level 2 (plan review) and 3 (per step) are decided against the plan's runbook.
        app.out.line(f"runbook: {approval.runbook_url or '(the plan names none)'}")
    plan = approval.plan or {}
    for step in plan.get("steps", ()):
        targets = ", ".join(t.get("ref", "") for t in step.get("targets", ()))
        app.out.line(
            f"  step {step.get('id')}: {step.get('action')} ({step.get('action_class')}) "
            f"on {targets}"
        )


@approvals.command(name="show")
@click.argument("approval_id")
@pass_cli
def approvals_show(app: Cli, approval_id: str) -> int:
    """One approval request: what it covers, its state and, for level 2/3, the runbook."""
    tenant = app.connection.require_tenant()

    async def go() -> Approval:
        async with _approvals(app) as client:
            return await client.get_approval(approval_id, tenant_id=tenant)

    _show_approval(app, run_async(go))
    return exit_codes.OK


def _decided(app: Cli, approval: Approval) -> int:
    if app.out.json:
        app.out.emit(approval)
    else:
        what = f"step {approval.step_id} of " if approval.step_id else ""
        app.out.line(
            f"approval {approval.approval_id} ({what}execution {approval.execution_id}) "
            f"{approval.state} by {approval.decided_by}"
        )
    return exit_codes.OK


@approvals.command(name="approve")
@click.argument("approval_id")
@click.option("--comment", default="", help="Recorded with the decision.")
@pass_cli
def approvals_approve(app: Cli, approval_id: str, comment: str) -> int:
    """Grant a request: the execution proceeds (no second submit)."""
    tenant = app.connection.require_tenant()

    async def go() -> Approval:
        async with _approvals(app) as client:
            return await client.approve(approval_id, tenant_id=tenant, comment=comment)

    return _decided(app, run_async(go))


@approvals.command(name="reject")
@click.argument("approval_id")
@click.option("--comment", default="", help="Recorded with the decision.")
@pass_cli
def approvals_reject(app: Cli, approval_id: str, comment: str) -> int:
    """Refuse a request: the execution ends rejected."""
    tenant = app.connection.require_tenant()

    async def go() -> Approval:
        async with _approvals(app) as client:
            return await client.reject(approval_id, tenant_id=tenant, comment=comment)

    return _decided(app, run_async(go))


@approvals.command(name="approve-step")
@click.argument("execution_id")
@click.argument("step_id")
@click.option("--comment", default="", help="Recorded with the decision.")
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
    default=0,
    help="Seconds to wait for the worker to ask for this step (it asks when it reaches it).",
)
@pass_cli
def approvals_approve_step(
    app: Cli, execution_id: str, step_id: str, comment: str, wait_s: float
) -> int:
    """Grant one step of a level-3 execution: it runs that step, then waits again."""
    tenant = app.connection.require_tenant()

    async def go() -> Approval:
        deadline = asyncio.get_running_loop().time() + wait_s
        async with _approvals(app) as client:
            while True:
                try:
                    return await client.approve_step(
                        execution_id, step_id, tenant_id=tenant, comment=comment
                    )
                except NotFoundError:
                    # Not asked yet: the worker opens a step's request when it reaches it.
                    if asyncio.get_running_loop().time() >= deadline:
                        raise
                    await asyncio.sleep(0.25)

    return _decided(app, run_async(go))


# -- dead-letter queue ----------------------------------------------------------------------

_DLQ_COLUMNS: list[Column] = [
    ("dlq", lambda d: d.dlq_id),
    ("execution", lambda d: d.execution_id),
    ("tenant", lambda d: d.tenant_id),
    ("attempts", lambda d: d.attempts),
    ("error", lambda d: d.error_class),
    ("message", lambda d: d.error_message[:80]),
    ("created", lambda d: d.created_at),
]


@click.group()
def dlq() -> None:
    """The dead-letter queue: executions whose last attempt failed."""


@dlq.command(name="list")
@click.option("--all-tenants", is_flag=True, help="Every tenant's entries (system admins).")
@click.option("--error-class", default="", help="Only entries of this error class.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@pass_cli
def dlq_list(app: Cli, all_tenants: bool, error_class: str, limit: int) -> int:
    """Open dead-letter entries, newest first (the tenant's, or --all-tenants)."""
    tenant = "" if all_tenants else app.connection.require_tenant()
    if tenant == SYSTEM_TENANT:
        tenant = ""  # a system admin's own tenant holds no executions: mean "every tenant"

    async def go() -> list[DlqEntry]:
        found: list[DlqEntry] = []
        token = ""
        async with _admin(app) as client:
            while len(found) < limit:
                page, token = await client.list_dlq_entries(
                    tenant_id=tenant,
                    error_class=error_class,
                    page_size=min(limit, 100),
                    page_token=token,
                )
                found.extend(page)
                if not token:
                    break
        return found[:limit]

    app.out.emit(run_async(go), _DLQ_COLUMNS)
    return exit_codes.OK


@dlq.command(name="requeue")
@click.argument("dlq_id")
@pass_cli
def dlq_requeue(app: Cli, dlq_id: str) -> int:
    """Re-run a dead-lettered execution as a new execution with a fresh attempt budget."""

    async def go() -> Any:
        async with _admin(app) as client:
            return await client.requeue_dlq_entry(dlq_id)

    result = run_async(go)
    if app.out.json:
        app.out.emit(result)
    else:
        app.out.line(
            f"requeued {result.entry.dlq_id}: new execution {result.execution_id} "
            f"(job {result.job_id})"
        )
    return exit_codes.OK


# -- queue ----------------------------------------------------------------------------------


@click.group()
def queue() -> None:
    """The background queue: gauges, and stopping or resuming dispatch."""


@queue.command(name="stats")
@pass_cli
def queue_stats(app: Cli) -> int:
    """Ready jobs per priority, leased, delayed, DLQ size, oldest wait, whether drained."""

    async def go() -> Any:
        async with _admin(app) as client:
            return await client.get_queue_stats()

    stats = run_async(go)
    if app.out.json:
        app.out.emit({**_plain(stats), "ready": stats.ready})
        return exit_codes.OK
    by_priority = ", ".join(f"p{p}={n}" for p, n in sorted(stats.ready_by_priority.items()))
    app.out.fields(
        {
            "ready": f"{stats.ready}" + (f" ({by_priority})" if by_priority else ""),
            "leased": stats.leased,
            "delayed": stats.delayed,
            "dlq_size": stats.dlq_size,
            "oldest_ready_age_seconds": round(stats.oldest_ready_age_seconds, 3),
            "dispatch_paused": stats.dispatch_paused,
        }
    )
    return exit_codes.OK


def _plain(value: Any) -> dict[str, Any]:
    from opsconductor.client.cli.render import jsonable

    data: dict[str, Any] = jsonable(value)
    return data


def _set_drain(app: Cli, drain: bool) -> int:
    async def go() -> bool:
        async with _admin(app) as client:
            return await client.set_drain(drain)

    paused = run_async(go)
    if app.out.json:
        app.out.emit({"dispatch_paused": paused})
    else:
        app.out.line(
            "dispatch paused: workers take no new jobs (running ones finish)"
            if paused
            else "dispatch resumed"
        )
    return exit_codes.OK


@queue.command(name="drain")
@pass_cli
def queue_drain(app: Cli) -> int:
    """Stop dispatching queued jobs (leases already granted finish). Audited."""
    return _set_drain(app, True)


@queue.command(name="undrain")
@pass_cli
def queue_undrain(app: Cli) -> int:
    """Resume dispatching queued jobs. Audited."""
    return _set_drain(app, False)


# -- feature flags --------------------------------------------------------------------------

_BOOL_FLAGS = ("stage_e_enabled", "all_tenants_enabled", "dispatch_paused")
_LIST_FLAGS = ("enabled_tenants", "record_only_tenants")
_INT_FLAGS = ("max_approval_level",)
_ASSIGNMENT = re.compile(r"^([a-z_]+)(\+=|-=|=)(.*)$")
_TRUE = {"true", "on", "yes", "1"}
_FALSE = {"false", "off", "no", "0"}


@click.group()
def flags() -> None:
    """Feature flags of the Stage E rollout (every change audited)."""


def _show_flags(app: Cli, value: FeatureFlags) -> None:
    app.out.emit(value) if app.out.json else app.out.fields(value)


@flags.command(name="get")
@pass_cli
def flags_get(app: Cli) -> int:
    """Print every flag."""

    async def go() -> FeatureFlags:
        async with _admin(app) as client:
            return await client.get_feature_flags()

    _show_flags(app, run_async(go))
    return exit_codes.OK


def parse_assignments(assignments: tuple[str, ...], current: FeatureFlags | None) -> dict[str, Any]:
    """``name=value`` / ``list+=item`` / ``list-=item`` → the changes to send.

    ``+=``/``-=`` (tenant lists only) apply to ``current``; a list is set whole with
    ``name=a,b`` (``name=`` empties it). Raises ``click.BadParameter`` naming the assignment.
    """
    changes: dict[str, Any] = {}
    for text in assignments:
        match = _ASSIGNMENT.match(text)
        if match is None:
            raise click.BadParameter(f"{text!r}: expected NAME=VALUE, NAME+=TENANT or NAME-=TENANT")
        name, op, raw = match.groups()
        if name in _BOOL_FLAGS:
            if op != "=" or raw.lower() not in _TRUE | _FALSE:
                raise click.BadParameter(f"{text!r}: {name} takes =true or =false")
            changes[name] = raw.lower() in _TRUE
        elif name in _INT_FLAGS:
            if op != "=" or not raw.isdigit():
                raise click.BadParameter(f"{text!r}: {name} takes =0, =1, =2 or =3")
            changes[name] = int(raw)
        elif name in _LIST_FLAGS:
            items = [t.strip() for t in raw.split(",") if t.strip()]
            if op == "=":
                changes[name] = sorted(set(items))
                continue
            if not items:
                raise click.BadParameter(f"{text!r}: name the tenant to add or remove")
            base = set(changes.get(name, getattr(current, name, ()) if current else ()))
            changes[name] = sorted(base | set(items) if op == "+=" else base - set(items))
        else:
            known = ", ".join((*_BOOL_FLAGS, *_LIST_FLAGS, *_INT_FLAGS))
            raise click.BadParameter(f"{text!r}: unknown flag {name!r} (flags: {known})")
    return changes


@flags.command(name="set")
@click.argument("assignments", nargs=-1, required=True)
@pass_cli
def flags_set(app: Cli, assignments: tuple[str, ...]) -> int:
    """Change flags: stage_e_enabled=false, enabled_tenants+=acme, record_only_tenants-=acme,
    max_approval_level=1, enabled_tenants=a,b ... One audited update for all of them."""

    async def go() -> FeatureFlags:
        async with _admin(app) as client:
            needs_current = any("+=" in a or "-=" in a for a in assignments)
            current = await client.get_feature_flags() if needs_current else None
            changes = parse_assignments(assignments, current)
            return await client.update_feature_flags(**changes)

    _show_flags(app, run_async(go))
    return exit_codes.OK


@flags.command(name="history")
@click.option("--flag", default="", help="Only the changes of this flag.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@pass_cli
def flags_history(app: Cli, flag: str, limit: int) -> int:
    """Every change of the flags, newest first: when, who, flag, old -> new."""

    async def go() -> list[FlagChange]:
        found: list[FlagChange] = []
        token = ""
        async with _admin(app) as client:
            while len(found) < limit:
                page, token = await client.list_flag_changes(
                    flag=flag, page_size=min(limit, 200), page_token=token
                )
                found.extend(page)
                if not token:
                    break
        return found[:limit]

    def shown(value: Any) -> str:
        return "(default)" if value is None else json.dumps(value)

    app.out.emit(
        run_async(go),
        [
            ("when", lambda c: c.changed_at),
            ("who", lambda c: c.changed_by),
            ("flag", lambda c: c.flag),
            ("old", lambda c: shown(c.old_value)),
            ("new", lambda c: shown(c.new_value)),
        ],
    )
    return exit_codes.OK


# -- audit chain ----------------------------------------------------------------------------


@click.group()
def audit() -> None:
    """The tamper-evident event chain of executions."""


@audit.command(name="verify")
@click.argument("execution_id")
@pass_cli
def audit_verify(app: Cli, execution_id: str) -> int:
    """Recompute EXECUTION_ID's event chain: exit 0 when intact, 8 naming the first broken link
    (an event altered, missing or unchained)."""
    tenant = app.connection.require_tenant()

    async def go() -> Any:
        async with _admin(app) as client:
            return await client.verify_audit_chain(execution_id, tenant_id=tenant)

    verdict = run_async(go)
    if app.out.json:
        app.out.emit(verdict)
    elif verdict.intact:
        app.out.line(
            f"intact: {verdict.events_checked} of {verdict.events_expected} events verified, "
            f"head {verdict.head_hash}"
        )
    else:
        app.out.line(
            f"BROKEN at seq {verdict.broken_seq} ({verdict.problem}): {verdict.detail} "
            f"({verdict.events_checked} of {verdict.events_expected} events verified before it)"
        )
    return exit_codes.OK if verdict.intact else exit_codes.MISMATCH


# -- development tokens ---------------------------------------------------------------------

_TTL = re.compile(r"^(\d+)([smhd]?)$")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _ttl_seconds(text: str) -> int:
    match = _TTL.match(text)
    if match is None or int(match.group(1)) <= 0:
        raise click.BadParameter(f"{text!r}: a duration such as 900, 15m, 12h or 1d")
    return int(match.group(1)) * _TTL_UNITS[match.group(2)]


@click.command()
@click.option("--actor", default="dev-admin", show_default=True, help="The token's subject.")
@click.option("--tenant", "token_tenant", help="The token's tenant [default: --tenant, or dev].")
@click.option("--ttl", default="12h", show_default=True, help="Lifetime: 900, 15m, 12h, 1d.")
@click.option(
    "--key-file",
    "key_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"HS256 key [$OPSC_DEV_KEY_FILE, or {DEFAULT_KEY_FILE}].",
)
@click.option("--audience", default=DEFAULT_AUDIENCE, show_default=True)
@pass_cli
def token(
    app: Cli,
    actor: str,
    token_tenant: str | None,
    ttl: str,
    key_file: Path | None,
    audience: str,
) -> int:
    """Mint a development token from the local stack's key (make run); refuses without it."""
    path = key_file or Path(os.environ.get("OPSC_DEV_KEY_FILE") or DEFAULT_KEY_FILE)
    key = read_dev_key(path)
    tenant = token_tenant or app.flags.get("tenant") or os.environ.get("OPSC_TENANT") or "dev"
    minted = mint_dev_token(
        key, actor=actor, tenant=tenant, ttl_s=_ttl_seconds(ttl), audience=audience
    )
    if app.out.json:
        app.out.emit({"token": minted, "actor": actor, "tenant": tenant})
    else:
        click.echo(minted)
    return exit_codes.OK


# -- shadow report --------------------------------------------------------------------------

_SINCE = re.compile(r"^(\d+)([smhd])$")


def _when(text: str | None, now: datetime) -> datetime | None:
    if not text:
        return None
    match = _SINCE.match(text)
    if match:
        return now - timedelta(seconds=int(match.group(1)) * _TTL_UNITS[match.group(2)])
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: an ISO 8601 time or a duration ago (30m, 24h, 7d)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@click.command(name="shadow-report")
@click.option(
    "--expected",
    "expected_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="YAML/JSON file of expected outcomes per plan name.",
)
@click.option(
    "--since", default="24h", show_default=True, help="Start: ISO time or 30m/24h/7d ago."
)
@click.option("--until", "until", default=None, help="End: ISO time or a duration ago (now).")
@pass_cli
def shadow_report(app: Cli, expected_file: Path, since: str, until: str | None) -> int:
    """Compare the executions recorded in a period with the expected outcome of each plan
    (mode, approval level, targets, steps, record-only); print mismatches, exit 8 if any."""
    expected = load_expected(expected_file)
    tenant = app.connection.require_tenant(expected.tenant)
    now = datetime.now(UTC)
    start, end = _when(since, now), _when(until, now) or now

    async def go() -> Any:
        async with _admin(app) as client:
            return await recorded_executions(client, tenant=tenant, since=start, until=end)

    recorded = run_async(go)
    report = compare(expected, recorded)
    if app.out.json:
        app.out.emit(report)
    else:
        app.out.line(
            f"tenant {tenant}: {len(recorded)} execution(s) from {start:%Y-%m-%d %H:%M:%S} to "
            f"{end:%Y-%m-%d %H:%M:%S} UTC, {len(expected.plans)} expected plan(s), "
            f"{len(report.mismatches)} mismatch(es)"
        )
        for mismatch in report.mismatches:
            app.out.line(f"MISMATCH {mismatch}")
        for name in report.matched:
            app.out.line(f"ok       {name}")
    return exit_codes.MISMATCH if report.mismatches else exit_codes.OK


def register(group: click.Group) -> None:
    for command in (approvals, dlq, queue, flags, audit, token, shadow_report):
        group.add_command(command)
