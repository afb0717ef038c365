"""The ``shell`` action: runs one allow-listed program from an argv list, in a sandbox.

Params::

    argv                 [program, arg, ...] (required). Never a shell string: nothing is
                         interpreted, so ``;`` or ``$(...)`` in an argument is literal text.
                         ``argv[0]`` is an absolute path the tenant's policy allow-lists
                         (``shell.executables``); ``["/bin/sh", "-c", script]`` only where the
                         policy allows interpreters. Secret references are refused here (argv
                         is visible in ``ps``).
    env                  {NAME: value} set for the child; a value may be a secret reference;
                         loader variables (``LD_*``, ``GCONV_PATH``) are refused
    env_allow            [NAME, ...] worker variables passed through, besides PATH, LANG,
                         LC_ALL and TZ; each must be in the policy's ``shell.env_allow``, and
                         the worker's own settings (``OPSC_*``, ``DATABASE_URL``,
                         ``REDIS_URL``) are always refused
    cwd                  absolute working directory inside the sandbox (default: its /tmp)
    timeout_s            limit in seconds (default 60, at most 3600), further capped by the
                         step's remaining budget
    expected_exit_codes  default [0]

The tenant policy (`opsconductor.common.tenant_policy.ShellPolicy`) is checked at submit by the
api and again here, before anything starts: shell off unless enabled, the executable
allow-list, interpreters, pass-through variables. The program then runs in the step's
`~opsconductor.actions.sandbox.Sandbox` (own uid, no view of the worker's processes,
files, environment or service ports, resource limits); if the sandbox cannot be built the
step fails with ``SANDBOX_UNAVAILABLE`` and nothing runs.

The child starts a new session (``start_new_session``), so it leads a process group holding
everything it spawns. On timeout or cancellation that whole group gets SIGTERM, then SIGKILL
after a grace period, so no grandchild outlives the step; the same happens to processes still
holding the output pipes after the child itself exits. The child's environment is built from
scratch (allow-list plus ``env``) with ``OPSC_IDEMPOTENCY_KEY`` set to the step's key.

Output: up to 64 KiB of each stream is kept (the end, where errors are), then masked and cut
so that the result stays within the 10 KiB limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from opsconductor.actions.base import (
    ActionContext,
    ActionFailedError,
    ActionResult,
    ActionTimeoutError,
    decode_output,
    fit_text,
    record_only_result,
)
from opsconductor.actions.params import ParamReader, require_text
from opsconductor.actions.sandbox import Sandbox, SandboxedCommand
from opsconductor.common.errors import FieldViolation
from opsconductor.common.plan import ActionClass
from opsconductor.common.tenant_policy import (
    TenantPolicy,
    TenantPolicyDeniedError,
    is_worker_variable,
)

__all__ = ["DEFAULT_ENV_ALLOW", "IDEMPOTENCY_ENV", "ShellAction"]

log = structlog.get_logger(__name__)

DEFAULT_ENV_ALLOW = ("PATH", "LANG", "LC_ALL", "TZ")
IDEMPOTENCY_ENV = "OPSC_IDEMPOTENCY_KEY"
#: Variables that make the dynamic loader run other code inside an allow-listed program.
_LOADER_VARIABLES = re.compile(r"LD_.*|GCONV_PATH|LOCPATH|HOSTALIASES|RESOLV_HOST_CONF")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_MAX_ARGV = 256
_MAX_ARG_LENGTH = 8192
_MAX_ENV = 128
_DEFAULT_TIMEOUT_S = 60.0
_MAX_TIMEOUT_S = 3600.0
#: Bytes kept per stream (the last ones); the rest is read and dropped so the child never blocks.
CAPTURE_BYTES = 64 * 1024
#: Share of the 10 KiB result for each stream's excerpt.
_STREAM_EXCERPT_BYTES = 4500
#: Of a failure message: the end of stderr.
_ERROR_TAIL_BYTES = 1024
_READ_CHUNK = 16 * 1024
#: After the child exits, how long leftover processes may keep its output pipes open.
_PIPE_GRACE_S = 0.5
_POLL_S = 0.02
#: How long SIGKILLed processes may take to disappear (uninterruptible I/O can delay it).
_KILL_WAIT_S = 5.0


@dataclass(frozen=True)
class _Command:
    argv: list[str]
    env: Mapping[str, Any]
    env_allow: tuple[str, ...]
    cwd: str | None
    timeout_s: float
    expected: frozenset[int]


def _parse(params: Mapping[str, Any]) -> tuple[_Command, ParamReader]:
    reader = ParamReader(
        params, allowed={"argv", "env", "env_allow", "cwd", "timeout_s", "expected_exit_codes"}
    )
    argv: list[str] | None = None
    if isinstance(params.get("argv"), str):
        reader.add("argv", "must be a list of strings, not a shell string (use sh -c explicitly)")
    else:
        argv = reader.string_list("argv", required=True, max_items=_MAX_ARGV)
        if argv is not None and not argv:
            reader.add("argv", "must name a program")
        if argv and any(not arg or "\x00" in arg for arg in argv[:1]):
            reader.add("argv[0]", "must be a program name or path")
        if argv and any("\x00" in arg or len(arg) > _MAX_ARG_LENGTH for arg in argv):
            reader.add("argv", f"arguments are at most {_MAX_ARG_LENGTH} characters, no NUL")
    env = reader.mapping("env")
    if len(env) > _MAX_ENV:
        reader.add("env", f"at most {_MAX_ENV} variables")
    for name, value in env.items():
        if not _ENV_NAME.fullmatch(name):
            reader.add("env", "variable names are letters, digits and underscores")
        elif name == IDEMPOTENCY_ENV:
            reader.add(f"env.{name}", "is set by the worker and cannot be given")
        elif _LOADER_VARIABLES.fullmatch(name.upper()):
            reader.add(f"env.{name}", "loader variables cannot be set for a step")
        else:
            checked = reader.text_value(value, f"env.{name}", secret_ok=True)
            if isinstance(checked, str) and "\x00" in checked:
                reader.add(f"env.{name}", "must not contain NUL")
    env_allow = reader.string_list("env_allow", max_items=_MAX_ENV, max_length=128) or []
    for name in env_allow:
        if not _ENV_NAME.fullmatch(name):
            reader.add("env_allow", "variable names are letters, digits and underscores")
        elif is_worker_variable(name):
            reader.add(
                "env_allow", "the worker's own settings (OPSC_*, DATABASE_URL, ...) stay private"
            )
    cwd = reader.text("cwd")
    timeout_s = reader.number(
        "timeout_s",
        default=_DEFAULT_TIMEOUT_S,
        minimum=0,
        maximum=_MAX_TIMEOUT_S,
        exclusive_minimum=True,
    )
    expected = _expected_codes(reader)
    command = _Command(
        argv=argv or [],
        env=env,
        env_allow=tuple(env_allow),
        cwd=cwd if isinstance(cwd, str) else None,
        timeout_s=timeout_s or _DEFAULT_TIMEOUT_S,
        expected=expected,
    )
    return command, reader


def _expected_codes(reader: ParamReader) -> frozenset[int]:
    value = reader.params.get("expected_exit_codes", [0])
    if (
        not isinstance(value, list)
        or not value
        or len(value) > 256
        or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value)
    ):
        reader.add("expected_exit_codes", "must be a non-empty list of exit codes (0-255)")
        return frozenset({0})
    return frozenset(value)


class _Capture:
    """Drains one output pipe, keeping only its last ``CAPTURE_BYTES`` bytes."""

    def __init__(self, stream: asyncio.StreamReader | None) -> None:
        self.data = bytearray()
        self.total = 0
        self.task = asyncio.ensure_future(self._drain(stream))

    async def _drain(self, stream: asyncio.StreamReader | None) -> None:
        if stream is None:  # pragma: no cover - always piped here
            return
        while chunk := await stream.read(_READ_CHUNK):
            self.total += len(chunk)
            self.data += chunk
            if len(self.data) > CAPTURE_BYTES:
                del self.data[: len(self.data) - CAPTURE_BYTES]

    def text(self) -> str:
        text = decode_output(bytes(self.data))
        if self.total > len(self.data):
            # The cut may have split a line (and a secret in it): drop the partial first line.
            _, newline, rest = text.partition("\n")
            text = rest if newline else text
        return text


def _group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still runs (zombies awaiting a reaper do not)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a member changed identity: assume it runs
        return True
    proc = Path("/proc")
    if not proc.is_dir():  # pragma: no cover - not Linux: cannot tell zombies apart
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may contain spaces and parentheses).
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _wait_until_gone(pgid: int, timeout_s: float) -> bool:
    """Poll until group ``pgid`` has no live process; False if ``timeout_s`` passed first."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not _group_alive(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL_S)


async def terminate_group(pgid: int, *, grace_s: float = 2.0) -> None:
    """SIGTERM process group ``pgid``, then SIGKILL whatever remains after ``grace_s``.

    Returns once no process of the group runs (SIGKILL is delivered asynchronously, so that
    is waited for too, up to a bound).
    """
    _signal_group(pgid, signal.SIGTERM)
    if await _wait_until_gone(pgid, grace_s):
        return
    _signal_group(pgid, signal.SIGKILL)
    log.warning("process_group_killed", pgid=pgid, grace_s=grace_s)
    if not await _wait_until_gone(pgid, _KILL_WAIT_S):  # pragma: no cover - kernel stuck (D state)
        log.error("process_group_survived_kill", pgid=pgid)


async def _wait_exit(process: asyncio.subprocess.Process) -> int:
    """The child's exit status as soon as it exits.

    Not ``process.wait()``: on Python 3.11 that also waits until every holder of the output
    pipes (grandchildren in the background) has closed them.
    """
    # Polling (20 ms) because asyncio signals the exit to its protocol only, not to Process.
    while process.returncode is None:  # noqa: ASYNC110
        await asyncio.sleep(_POLL_S)
    return process.returncode


def _close_transport(process: asyncio.subprocess.Process) -> None:
    # asyncio offers no public way to give up on a subprocess's pipes.
    transport = getattr(process, "_transport", None)
    if transport is not None:  # pragma: no branch - always set while the process object lives
        transport.close()


class ShellAction:
    """Runs a program (see the module docstring for params and behaviour).

    ``environ`` is where passed-through variables come from (default: the worker's live
    environment); ``kill_grace_s`` is the wait between SIGTERM and SIGKILL; ``sandbox``
    builds each step's sandbox (default: one configured by ``OPSC_SANDBOX_*``, made at the
    first run, so the api, which never runs steps, reads no sandbox settings).
    """

    name = "shell"
    min_action_class = ActionClass.MODIFY

    def __init__(
        self,
        *,
        environ: Mapping[str, str] | None = None,
        kill_grace_s: float = 2.0,
        sandbox: Sandbox | None = None,
    ) -> None:
        self._environ = environ
        self._kill_grace_s = kill_grace_s
        self._sandbox = sandbox

    def estimate_ms(self, params: Mapping[str, Any], target_count: int) -> int:
        """One second: a typical short command."""
        return 1000

    def validate(self, params: Mapping[str, Any]) -> list[FieldViolation]:
        """Check argv, env, env_allow, cwd, timeout and exit codes."""
        return _parse(params)[1].violations

    def secret_destination(self, params: Mapping[str, Any]) -> str | None:
        """The program (``argv[0]``): what the secret catalogue must allow secrets to reach."""
        argv = params.get("argv")
        return argv[0] if isinstance(argv, list) and argv and isinstance(argv[0], str) else None

    def policy_violations(
        self, params: Mapping[str, Any], policy: TenantPolicy
    ) -> list[FieldViolation]:
        """What the tenant's ``shell`` policy refuses in a step with ``params``."""
        argv = params.get("argv")
        env_allow = params.get("env_allow")
        return policy.shell.step_violations(
            argv[0] if isinstance(argv, list) and argv else None,
            env_allow if isinstance(env_allow, list) else [],
        )

    @property
    def sandbox(self) -> Sandbox:
        """The sandbox steps run in (made from ``OPSC_SANDBOX_*`` on first use)."""
        if self._sandbox is None:
            self._sandbox = Sandbox()
        return self._sandbox

    def _child_env(self, command: _Command, ctx: ActionContext) -> dict[str, str]:
        source = os.environ if self._environ is None else self._environ
        env = {
            name: source[name]
            for name in (*DEFAULT_ENV_ALLOW, *command.env_allow)
            if name in source
        }
        for name, value in command.env.items():
            env[name] = require_text(value, f"params.env.{name}")
        env[IDEMPOTENCY_ENV] = ctx.idempotency_key
        return env

    async def run(self, ctx: ActionContext) -> ActionResult:
        """Run the program; fail on an unexpected exit code; stop its group on timeout/cancel."""
        command, reader = _parse(ctx.params)
        reader.raise_if_invalid()
        # Defense in depth: whatever the api decided, this tenant's policy is checked here.
        refused = self.policy_violations(ctx.params, ctx.tenant_policy)
        if refused:
            raise TenantPolicyDeniedError(
                f"refused by the tenant policy: {refused[0]}", field=refused[0].field
            )
        if ctx.record_only:
            return record_only_result(
                {
                    "action": self.name,
                    "argv": command.argv,
                    "env_names": sorted(command.env),
                    "env_allow": list(command.env_allow),
                    "cwd": command.cwd,
                }
            )
        timeout_s = max(0.0, min(command.timeout_s, ctx.timeout_s))
        started = time.monotonic()
        async with self.sandbox.enter(
            command.argv, cwd=command.cwd, policy=ctx.tenant_policy.shell
        ) as sandboxed:
            try:
                process = await self._spawn(command, sandboxed, ctx)
            except OSError as exc:
                raise ActionFailedError(
                    f"could not start {command.argv[0]}: {exc.strerror or type(exc).__name__}",
                    error_class=type(exc).__name__,
                ) from exc
            outcome = await self._supervise(process, ctx, timeout_s)
        return self._result(
            command, process, outcome, (timeout_s, timeout_s >= ctx.timeout_s), started
        )

    async def _spawn(
        self, command: _Command, sandboxed: SandboxedCommand, ctx: ActionContext
    ) -> asyncio.subprocess.Process:
        """Start the child in a new session; a cancellation meanwhile still stops its group.

        Shielded: cancelled mid-spawn, asyncio would kill only the child and then wait for its
        pipes, which the child's own children keep open for as long as they run.
        """
        spawning = asyncio.ensure_future(
            asyncio.create_subprocess_exec(
                *sandboxed.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._child_env(command, ctx),
                cwd=sandboxed.cwd,
                start_new_session=True,
            )
        )
        try:
            return await asyncio.shield(spawning)
        except asyncio.CancelledError:
            with contextlib.suppress(OSError):
                process = await spawning
                await terminate_group(process.pid, grace_s=self._kill_grace_s)
            raise

    async def _supervise(
        self, process: asyncio.subprocess.Process, ctx: ActionContext, timeout_s: float
    ) -> tuple[str, _Capture, _Capture]:
        """Wait for exit, timeout or cancellation; leave no process of the group behind."""
        pgid = process.pid  # a session leader's group id is its pid
        stdout, stderr = _Capture(process.stdout), _Capture(process.stderr)
        exited = asyncio.ensure_future(_wait_exit(process))
        cancelled = asyncio.ensure_future(ctx.cancel_event.wait())
        outcome = "exited"
        try:
            await asyncio.wait(
                {exited, cancelled}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if not exited.done():
                outcome = "cancelled" if cancelled.done() else "timed_out"
                log.info("shell_group_stopping", pgid=pgid, why=outcome)
                await terminate_group(pgid, grace_s=self._kill_grace_s)
            readers = {stdout.task, stderr.task}
            _, pending = await asyncio.wait(readers, timeout=_PIPE_GRACE_S)
            if pending:
                # The child is gone but processes it started still hold its output pipes.
                log.info("shell_leftovers_stopping", pgid=pgid)
                await terminate_group(pgid, grace_s=self._kill_grace_s)
                _, pending = await asyncio.wait(readers, timeout=_PIPE_GRACE_S)
            if pending:
                # Something left the group (setsid) and keeps the pipes open: stop listening.
                log.warning("shell_pipes_abandoned", pgid=pgid)
                _close_transport(process)
            else:
                await process.wait()
        finally:
            # Also reached when the worker cancels this task (its own deadline): never leak.
            if process.returncode is None or _group_alive(pgid):
                await asyncio.shield(terminate_group(pgid, grace_s=self._kill_grace_s))
            for task in (exited, cancelled, stdout.task, stderr.task):
                task.cancel()
        return outcome, stdout, stderr

    def _result(
        self,
        command: _Command,
        process: asyncio.subprocess.Process,
        supervised: tuple[str, _Capture, _Capture],
        limit: tuple[float, bool],
        started: float,
    ) -> ActionResult:
        outcome, stdout, stderr = supervised
        timeout_s, budget_exhausted = limit
        out_text, out_cut = fit_text(stdout.text(), _STREAM_EXCERPT_BYTES, keep="tail")
        err_text, err_cut = fit_text(stderr.text(), _STREAM_EXCERPT_BYTES, keep="tail")
        output: dict[str, Any] = {
            "exit_code": process.returncode,
            "stdout": out_text,
            "stderr": err_text,
            "stdout_bytes": stdout.total,
            "stderr_bytes": stderr.total,
            "elapsed_ms": round((time.monotonic() - started) * 1000),
        }
        if out_cut or err_cut or stdout.total > len(stdout.data) or stderr.total > len(stderr.data):
            output["truncated"] = True
        if outcome == "cancelled":
            return ActionResult({**output, "cancelled": True})
        if outcome == "timed_out":
            raise ActionTimeoutError(
                f"{command.argv[0]} did not finish within {timeout_s:g} s; its process group "
                "was stopped",
                output=output,
                timeout_s=timeout_s,
                budget_exhausted=budget_exhausted,
            )
        if process.returncode not in command.expected:
            tail, _ = fit_text(stderr.text(), _ERROR_TAIL_BYTES, keep="tail")
            raise ActionFailedError(
                f"{command.argv[0]} exited with code {process.returncode}: {tail.strip()}",
                output=output,
                exit_code=process.returncode,
            )
        return ActionResult(output)
