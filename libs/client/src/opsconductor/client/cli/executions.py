"""``opsctl`` commands on executions: submit (and watch), preview, get, list, cancel."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import click
from rich.live import Live
from rich.table import Table

from opsconductor.client.cli import exit_codes
from opsconductor.client.cli.main import Cli, pass_cli, run_async
from opsconductor.client.cli.plan_file import load_plan_file
from opsconductor.client.cli.render import Column, Output, jsonable
from opsconductor.client.client import ExecutionClient
from opsconductor.client.models import Execution, ExecutionEvent
from opsconductor.contract.errors import SubscriberLaggedError

__all__ = ["EXECUTION_COLUMNS", "register", "watch_execution"]

_STATUSES = (
    "pending",
    "awaiting_approval",
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "rejected",
)

EXECUTION_COLUMNS: list[Column] = [
    ("execution", lambda e: e.execution_id),
    ("status", lambda e: e.status + (" (timed out)" if e.timed_out else "")),
    ("mode", lambda e: e.execution_mode),
    ("level", lambda e: e.approval_level),
    ("plan", lambda e: (e.plan or {}).get("name")),
    ("actor", lambda e: e.actor_id),
    ("created", lambda e: e.created_at),
    ("record-only", lambda e: e.record_only),
]


def _client(app: Cli) -> ExecutionClient:
    conn = app.connection
    return ExecutionClient(conn.api, conn.require_token(), timeout=conn.timeout_s, tls=conn.tls)


def _summary(execution: Execution) -> str:
    text = f"execution {execution.execution_id} {execution.status}"
    if execution.timed_out:
        text += " (timed out)"
    if execution.duration_ms:
        text += f" in {execution.duration_ms} ms"
    if execution.error_class:
        text += f": {execution.error_class}"
        if execution.error_message:
            text += f" {execution.error_message}"
    return text


def show_execution(out: Output, execution: Execution) -> None:
    """An execution as fields, then its steps as a table (or JSON)."""
    if out.json:
        out.emit(execution)
        return
    out.fields(execution, skip=("steps", "plan", "result_summary"))
    if execution.steps:
        out.line("")
        out.emit(list(execution.steps), _STEP_COLUMNS)


_STEP_COLUMNS: list[Column] = [
    ("step", lambda s: s.step_id),
    ("action", lambda s: s.action),
    ("status", lambda s: s.status),
    ("attempt", lambda s: s.attempt),
    ("ms", lambda s: s.duration_ms),
    ("error", lambda s: f"{s.error_class} {s.error_message}".strip()),
]


def _steps_table(execution: Execution) -> Table:
    table = Table(title=_summary(execution), title_justify="left", box=None, pad_edge=False)
    for name, _ in _STEP_COLUMNS:
        table.add_column(name.upper())
    for step in execution.steps:
        table.add_row(*(str(get(step) or "-") for _, get in _STEP_COLUMNS))
    return table


async def watch_execution(
    client: ExecutionClient,
    execution: Execution,
    out: Output,
    *,
    interval_s: float = 0.5,
    give_up_after_s: float | None = None,
) -> tuple[Execution, bool]:
    """Poll ``GetExecution`` until the execution ends, drawing its steps live; returns the
    last state and whether it ended (False: ``give_up_after_s`` ran out first)."""
    started = time.monotonic()
    tenant = execution.tenant_id

    def expired() -> bool:
        return give_up_after_s is not None and time.monotonic() - started >= give_up_after_s

    if out.json:
        while not execution.is_terminal and not expired():
            await asyncio.sleep(interval_s)
            execution = await client.get(execution.execution_id, tenant_id=tenant)
        return execution, execution.is_terminal
    with Live(_steps_table(execution), console=out.console, auto_refresh=False) as live:
        while not execution.is_terminal and not expired():
            await asyncio.sleep(interval_s)
            execution = await client.get(execution.execution_id, tenant_id=tenant)
            live.update(_steps_table(execution), refresh=True)
    return execution, execution.is_terminal


def _exit_for(execution: Execution) -> int:
    return exit_codes.for_execution(execution.status, timed_out=execution.timed_out)


@click.command()
@click.argument("plan_file", type=click.Path(path_type=Path))
@click.option("--watch", is_flag=True, help="Follow the steps live until the execution ends.")
@click.option(
    "--mode",
    type=click.Choice(["immediate", "background"]),
    help="Ask for a mode (a long plan cannot be forced immediate).",
)
@click.option("--priority", type=click.IntRange(0, 100), help="0 urgent, 50 normal, 100 bulk.")
@click.option("--approval-id", help="Submit against an approval granted earlier.")
@click.option(
    "--watch-timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Stop watching after this many seconds (exit 7).",
)
@pass_cli
def submit(
    app: Cli,
    plan_file: Path,
    watch: bool,
    mode: str | None,
    priority: int | None,
    approval_id: str | None,
    watch_timeout: float | None,
) -> int:
    """Submit PLAN_FILE (YAML or JSON) and print the execution.

    The exit code reflects the final status when the execution has ended (0 succeeded, 3 failed,
    4 cancelled, 5 timed out, 6 rejected); with --watch it waits for that end.
    """
    plan = load_plan_file(plan_file)
    tenant = app.connection.require_tenant()

    async def go() -> int:
        async with _client(app) as client:
            execution = await client.submit(
                plan,
                tenant_id=tenant,
                requested_mode=mode,
                priority=priority,
                approval_id=approval_id,
            )
            if execution.deduplicated:
                app.out.note(f"deduplicated: {execution.execution_id} was submitted before")
            if watch:
                execution, ended = await watch_execution(
                    client, execution, app.out, give_up_after_s=watch_timeout
                )
                if app.out.json:
                    app.out.emit(execution)
                if not ended:
                    app.out.note(f"gave up watching: {_summary(execution)}")
                    return exit_codes.WATCH_GAVE_UP
                return _exit_for(execution)
            if app.out.json:
                app.out.emit(execution)
            else:
                app.out.line(_summary(execution))
                if execution.status == "awaiting_approval":
                    app.out.line(
                        f"approval {execution.approval_id} (level {execution.approval_level}): "
                        f"opsctl approvals show {execution.approval_id}"
                    )
            return _exit_for(execution)

    return run_async(go)


@click.command()
@click.argument("plan_file", type=click.Path(path_type=Path))
@click.option("--mode", type=click.Choice(["immediate", "background"]))
@pass_cli
def preview(app: Cli, plan_file: Path, mode: str | None) -> int:
    """What submitting PLAN_FILE would decide (mode, approval level, timeouts), running nothing."""
    plan = load_plan_file(plan_file)
    tenant = app.connection.require_tenant()

    async def go() -> int:
        async with _client(app) as client:
            app.out.emit(await client.preview(plan, tenant_id=tenant, requested_mode=mode))
        return exit_codes.OK

    return run_async(go)


@click.command()
@click.argument("execution_id")
@click.option("--watch", is_flag=True, help="Follow it live until it ends; exit by its status.")
@click.option(
    "--watch-timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Stop watching after this many seconds (exit 7).",
)
@pass_cli
def get(app: Cli, execution_id: str, watch: bool, watch_timeout: float | None) -> int:
    """Show one execution and its steps (exit 0 for any status it has); with --watch, follow it
    until it ends and exit by its final status, as submit --watch does."""
    tenant = app.connection.require_tenant()

    async def go() -> int:
        async with _client(app) as client:
            execution = await client.get(execution_id, tenant_id=tenant)
            if not watch:
                show_execution(app.out, execution)
                return exit_codes.OK
            execution, ended = await watch_execution(
                client, execution, app.out, give_up_after_s=watch_timeout
            )
        if app.out.json:
            app.out.emit(execution)
        if not ended:
            app.out.note(f"gave up watching: {_summary(execution)}")
            return exit_codes.WATCH_GAVE_UP
        return _exit_for(execution)

    return run_async(go)


@click.command(name="list")
@click.option("--status", "statuses", multiple=True, type=click.Choice(_STATUSES))
@click.option("--mode", type=click.Choice(["immediate", "background"]))
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@pass_cli
def list_(app: Cli, statuses: tuple[str, ...], mode: str | None, limit: int) -> int:
    """List the tenant's executions, newest first."""
    tenant = app.connection.require_tenant()

    async def go() -> list[Execution]:
        found: list[Execution] = []
        async with _client(app) as client:
            async for execution in client.iter_executions(
                tenant_id=tenant, statuses=statuses, execution_mode=mode, page_size=min(limit, 200)
            ):
                found.append(execution)
                if len(found) >= limit:
                    break
        return found

    app.out.emit(run_async(go), EXECUTION_COLUMNS)
    return exit_codes.OK


@click.command()
@click.argument("execution_id")
@click.option("--reason", default="", help="Why (recorded with the cancellation).")
@pass_cli
def cancel(app: Cli, execution_id: str, reason: str) -> int:
    """Cancel an execution (idempotent): running steps finish, later steps are skipped."""
    tenant = app.connection.require_tenant()

    async def go() -> Execution:
        async with _client(app) as client:
            return await client.cancel(execution_id, tenant_id=tenant, reason=reason)

    execution = run_async(go)
    if app.out.json:
        app.out.emit(execution)
    else:
        pending = "" if execution.is_terminal else " (cancellation requested)"
        app.out.line(_summary(execution) + pending)
    return exit_codes.OK


_EVENT_COLUMNS: list[Column] = [
    ("seq", lambda e: e.seq),
    ("time", lambda e: e.created_at),
    ("type", lambda e: e.type),
    ("actor", lambda e: e.actor_id),
    ("payload", lambda e: json.dumps(e.payload, sort_keys=True)[:200]),
]


def _progress_client(app: Cli) -> ExecutionClient:
    conn = app.connection
    return ExecutionClient(
        conn.progress, conn.require_token(), timeout=conn.timeout_s, tls=conn.tls
    )


@click.command()
@click.argument("execution_id")
@click.option("--follow", "-f", is_flag=True, help="Stay and print events live until the end.")
@click.option("--after", "after_seq", type=click.IntRange(min=0), default=0, help="After seq N.")
@click.option("--type", "types", multiple=True, help="Only events of this type (repeatable).")
@pass_cli
def events(
    app: Cli, execution_id: str, follow: bool, after_seq: int, types: tuple[str, ...]
) -> int:
    """The events of an execution in order (ProgressService); --follow streams them live until
    execution_completed, resuming by itself if the stream is cut (-o json: one object a line)."""
    tenant = app.connection.require_tenant()

    async def listed() -> list[ExecutionEvent]:
        found: list[ExecutionEvent] = []
        token = ""
        async with _progress_client(app) as client:
            while True:
                page, token = await client.list_events(
                    tenant_id=tenant,
                    execution_id=execution_id,
                    types=types,
                    after_seq=after_seq,
                    page_size=200,
                    page_token=token,
                )
                found.extend(page)
                if not token:
                    return found

    if not follow:
        app.out.emit(run_async(listed), _EVENT_COLUMNS)
        return exit_codes.OK

    async def followed() -> int:
        position = after_seq
        async with _progress_client(app) as client:
            while True:
                try:
                    async for event in client.stream_events(
                        execution_id, tenant_id=tenant, after_seq=position
                    ):
                        position = event.seq
                        if not types or event.type in types:
                            _print_event(app.out, event)
                        if event.type == "execution_completed":
                            return exit_codes.OK
                    return exit_codes.OK
                except SubscriberLaggedError:
                    continue  # cut off for reading slowly: resume after the last event shown

    return run_async(followed)


def _print_event(out: Output, event: ExecutionEvent) -> None:
    if out.json:
        sys.stdout.write(json.dumps(jsonable(event), sort_keys=True) + "\n")
        sys.stdout.flush()
        return
    when = event.created_at.strftime("%H:%M:%S.%f")[:-3] if event.created_at else "-"
    payload = json.dumps(event.payload, sort_keys=True)
    out.line(f"{event.seq:>4} {when} {event.type:<24} {event.actor_id or '-'} {payload[:300]}")


def register(group: click.Group) -> None:
    for command in (submit, preview, get, list_, cancel, events):
        group.add_command(command)
