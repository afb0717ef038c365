"""The ``shell`` built-in with real child processes: argv, environment, output, process groups."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from opsconductor.actions.base import (
    MAX_RESULT_BYTES,
    ActionContext,
    ActionFailedError,
    ActionResult,
    ActionTimeoutError,
    result_size_bytes,
)
from opsconductor.actions.shell import IDEMPOTENCY_ENV, ShellAction, terminate_group
from opsconductor.common.errors import PlanValidationError
from opsconductor.common.masking import REDACTED
from opsconductor.common.secret_catalogue import SecretCatalogue
from opsconductor.common.secrets import EnvSecretProvider, SecretResolver, SecretUse
from opsconductor.common.tenant_policy import ShellPolicy, TenantPolicy

# These tests are about argv, environment, output and process groups, with real processes in the
# real sandbox: its setpriv mode (own uid and limits, host pid namespace), so that the pids the
# scripts report are the ones the assertions look up. tests/integration/test_sandbox_attacks.py
# covers the sandbox itself, in both modes.
EXECUTABLES = (
    "/bin/sh",
    "/usr/bin/echo",
    "/usr/bin/env",
    "/usr/bin/printenv",
    "/usr/bin/pwd",
    "/usr/bin/touch",
    "/nonexistent/program-x",
    sys.executable,
)
#: An interpreter the step's uid can run from a shell: the venv's python resolves into /root
#: (mode 0700), so dash started as that uid gets "Permission denied" and nothing would run.
STEP_PYTHON = "/usr/bin/python3"
POLICY = TenantPolicy(
    shell=ShellPolicy(
        enabled=True,
        executables=EXECUTABLES,
        allow_interpreters=True,
        env_allow=("SHELL_TEST_ALLOWED", "SHELL_TEST_UNSET"),
        network=True,
    )
)


@pytest.fixture(autouse=True)
def _setpriv_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPSC_SANDBOX_MODE", "setpriv")
    # The pid files the scripts write under /tmp are read after the step: keep them (the
    # scratch clean-up has its own test in tests/integration/test_sandbox_attacks.py).
    monkeypatch.setenv("OPSC_SANDBOX_SCRATCH_PATHS", "[]")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the step's uid may write to (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="opsc-shell-test-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# A script that starts two grandchildren, writes every pid of the group to a file, then waits.
# The trap makes the shell itself ignore SIGTERM, so only SIGKILL after the grace ends it.
GROUP_SCRIPT = (
    'trap "" TERM; sleep 60 & a=$!; sleep 60 & b=$!; '
    'echo "$$ $a $b" > "$1.tmp"; mv "$1.tmp" "$1"; wait'
)


def _ctx(
    params: Mapping[str, Any],
    *,
    timeout_s: float = 30.0,
    record_only: bool = False,
    key: str = "exec-9:step-3",
) -> ActionContext:
    return ActionContext(
        execution_id="exec-9",
        step_id="step-3",
        idempotency_key=key,
        tenant_id="tenant-a",
        targets=("host-1",),
        params=params,
        timeout_s=timeout_s,
        record_only=record_only,
        cancel_event=asyncio.Event(),
        tenant_policy=POLICY,
    )


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for its reaper is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


async def _wait_for_file(path: Path, deadline_s: float = 10.0) -> str:
    deadline = time.monotonic() + deadline_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        await asyncio.sleep(0.01)
    return path.read_text()


def _env_of(result: ActionResult) -> dict[str, str]:
    lines = result.output["stdout"].splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


async def test_argv_is_not_interpreted_by_a_shell(shared_dir: Path) -> None:
    marker = shared_dir / "pwned"
    result = await ShellAction().run(
        _ctx({"argv": ["/usr/bin/echo", "a;b", f"; touch {marker}", "$(id)", "`id`", "*"]})
    )
    assert result.output["stdout"] == f"a;b ; touch {marker} $(id) `id` *\n"
    assert result.output["exit_code"] == 0
    assert not marker.exists()


async def test_a_shell_string_is_refused() -> None:
    violations = ShellAction().validate({"argv": "echo hi; rm -rf /"})
    assert [v.field for v in violations] == ["params.argv"]
    assert "not a shell string" in violations[0].description
    with pytest.raises(PlanValidationError):
        await ShellAction().run(_ctx({"argv": "echo hi"}))


async def test_only_allowed_worker_variables_reach_the_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SHELL_TEST_PRIVATE", "must-not-pass")
    monkeypatch.setenv("SHELL_TEST_ALLOWED", "may-pass")
    monkeypatch.setenv("LANG", "C.UTF-8")
    result = await ShellAction().run(
        _ctx(
            {
                "argv": ["/usr/bin/env"],
                "env_allow": ["SHELL_TEST_ALLOWED", "SHELL_TEST_UNSET"],
                "env": {"EXPLICIT": "given"},
            }
        )
    )
    env = _env_of(result)
    assert "SHELL_TEST_PRIVATE" not in env
    assert env["SHELL_TEST_ALLOWED"] == "may-pass"
    assert env["EXPLICIT"] == "given"
    assert env["LANG"] == "C.UTF-8"
    assert "PATH" in env
    assert IDEMPOTENCY_ENV in env
    assert set(env) <= {
        "PATH",
        "LANG",
        "LC_ALL",
        "TZ",
        "HOME",
        "SHELL_TEST_ALLOWED",
        "EXPLICIT",
        IDEMPOTENCY_ENV,
    }


async def test_injected_environment_is_the_passthrough_source() -> None:
    action = ShellAction(environ={"PATH": "/usr/bin:/bin", "OTHER": "x"})
    env = _env_of(await action.run(_ctx({"argv": ["/usr/bin/env"]})))
    assert set(env) == {"PATH", IDEMPOTENCY_ENV}
    assert env["PATH"] == "/usr/bin:/bin"


async def test_the_child_gets_the_step_idempotency_key() -> None:
    """Printed bare: ``NAME=value`` text with "KEY" in the name is masked in results."""
    result = await ShellAction().run(
        _ctx({"argv": ["/usr/bin/printenv", IDEMPOTENCY_ENV]}, key="e-7:s-2")
    )
    assert result.output["stdout"] == "e-7:s-2\n"


async def test_secret_env_value_reaches_the_child_but_never_the_result() -> None:
    value = "shell-" + secrets.token_hex(10)
    catalogue = SecretCatalogue.from_document(
        {"tenants": {"tenant-a": {"env:API_TOKEN": {"shell": ["/bin/sh"]}}}}
    )
    resolver = SecretResolver(
        [EnvSecretProvider({"OPSC_SECRET_TENANT_A__API_TOKEN": value})], catalogue
    )
    params = {
        "argv": ["/bin/sh", "-c", 'echo "token is $API_TOKEN" >&2; echo "$API_TOKEN"'],
        "env": {"API_TOKEN": {"$secret": "env:API_TOKEN"}},
    }
    assert ShellAction().validate(params) == []
    resolved, _ = resolver.resolve_params(params, SecretUse("tenant-a", "shell", "/bin/sh"))
    result = await ShellAction().run(_ctx(resolved))
    assert value not in json.dumps(result.output)
    assert result.output["stdout"] == f"{REDACTED}\n"
    assert result.output["stderr"] == f"token is {REDACTED}\n"


async def test_large_output_is_truncated_to_the_result_limit() -> None:
    script = "import sys; sys.stdout.write('o' * 300000); sys.stderr.write('e' * 300000 + 'END')"
    result = await ShellAction().run(_ctx({"argv": [sys.executable, "-c", script]}))
    assert result.truncated
    assert result_size_bytes(result.output) <= MAX_RESULT_BYTES
    compact = json.dumps(result.output, separators=(",", ":"), ensure_ascii=False)
    assert len(compact.encode()) <= 10 * 1024
    assert result.output["stdout_bytes"] == 300000
    assert result.output["stderr_bytes"] == 300003
    # The end of the output (where errors are) is what is kept.
    assert result.output["stderr"].endswith("END")


async def test_nul_and_invalid_utf8_in_output_are_storable() -> None:
    script = "import sys; sys.stdout.buffer.write(b'a\\x00b\\xffc')"
    result = await ShellAction().run(_ctx({"argv": [sys.executable, "-c", script]}))
    assert result.output["stdout"] == "a\ufffdb\ufffdc"


async def test_unexpected_exit_code_fails_with_code_and_stderr_tail() -> None:
    with pytest.raises(ActionFailedError) as info:
        await ShellAction().run(
            _ctx({"argv": ["/bin/sh", "-c", "echo out; echo 'disk full' >&2; exit 3"]})
        )
    assert info.value.details == {"exit_code": 3}
    assert "exited with code 3: disk full" in str(info.value)
    assert info.value.output is not None
    assert info.value.output.output["stdout"] == "out\n"
    assert not isinstance(info.value, TimeoutError)


async def test_expected_exit_codes_are_configurable() -> None:
    result = await ShellAction().run(
        _ctx({"argv": ["/bin/sh", "-c", "exit 3"], "expected_exit_codes": [0, 3]})
    )
    assert result.output["exit_code"] == 3


async def test_cwd_is_used(shared_dir: Path) -> None:
    result = await ShellAction().run(_ctx({"argv": ["/usr/bin/pwd"], "cwd": str(shared_dir)}))
    assert result.output["stdout"] == f"{shared_dir.resolve()}\n"


@pytest.mark.parametrize(
    "params",
    [
        {"argv": ["/nonexistent/program-x"]},
        {"argv": ["/usr/bin/pwd"], "cwd": "/nonexistent/dir-x"},
    ],
)
async def test_a_program_that_cannot_start_is_an_action_failure(params: dict[str, Any]) -> None:
    with pytest.raises(ActionFailedError, match="could not start") as info:
        await ShellAction().run(_ctx(params))
    assert info.value.details["error_class"] == "FileNotFoundError"


async def test_timeout_kills_the_whole_process_group(shared_dir: Path) -> None:
    pidfile = shared_dir / "pids"
    action = ShellAction(kill_grace_s=0.3)
    started = time.monotonic()
    with pytest.raises(ActionTimeoutError) as info:
        await action.run(
            _ctx({"argv": ["/bin/sh", "-c", GROUP_SCRIPT, "sh", str(pidfile)], "timeout_s": 0.5})
        )
    assert time.monotonic() - started < 10
    assert isinstance(info.value, TimeoutError)
    assert info.value.details == {"timeout_s": 0.5, "budget_exhausted": False}
    pids = [int(p) for p in pidfile.read_text().split()]
    assert len(pids) == 3
    # The shell ignored SIGTERM: it is gone because SIGKILL followed.
    assert [pid for pid in pids if _running(pid)] == []
    assert info.value.output is not None
    assert info.value.output.output["exit_code"] == -9


async def test_step_budget_caps_the_params_timeout(shared_dir: Path) -> None:
    pidfile = shared_dir / "pids"
    with pytest.raises(ActionTimeoutError) as info:
        await ShellAction(kill_grace_s=0.3).run(
            _ctx(
                {"argv": ["/bin/sh", "-c", GROUP_SCRIPT, "sh", str(pidfile)], "timeout_s": 60},
                timeout_s=0.4,
            )
        )
    assert info.value.details == {"timeout_s": 0.4, "budget_exhausted": True}


async def test_cancel_kills_the_whole_process_group(shared_dir: Path) -> None:
    pidfile = shared_dir / "pids"
    ctx = _ctx({"argv": ["/bin/sh", "-c", GROUP_SCRIPT, "sh", str(pidfile)]})
    task = asyncio.create_task(ShellAction(kill_grace_s=0.3).run(ctx))
    pids = [int(p) for p in (await _wait_for_file(pidfile)).split()]
    assert all(_running(pid) for pid in pids)
    ctx.cancel_event.set()
    result = await task
    assert result.cancelled
    assert [pid for pid in pids if _running(pid)] == []


async def test_sigterm_is_enough_for_a_cooperative_group(shared_dir: Path) -> None:
    """Without the trap, SIGTERM ends everything well before the SIGKILL grace."""
    pidfile = shared_dir / "pids"
    script = 'sleep 60 & a=$!; echo "$$ $a" > "$1.tmp"; mv "$1.tmp" "$1"; wait'
    ctx = _ctx({"argv": ["/bin/sh", "-c", script, "sh", str(pidfile)]})
    task = asyncio.create_task(ShellAction(kill_grace_s=30).run(ctx))
    pids = [int(p) for p in (await _wait_for_file(pidfile)).split()]
    started = time.monotonic()
    ctx.cancel_event.set()
    result = await task
    assert time.monotonic() - started < 10
    assert result.output["exit_code"] == -15
    assert [pid for pid in pids if _running(pid)] == []


async def test_worker_cancelling_the_task_also_kills_the_group(shared_dir: Path) -> None:
    """The worker's own deadline (asyncio cancellation) must not leak the child's group."""
    pidfile = shared_dir / "pids"
    task = asyncio.create_task(
        ShellAction(kill_grace_s=0.3).run(
            _ctx({"argv": ["/bin/sh", "-c", GROUP_SCRIPT, "sh", str(pidfile)]})
        )
    )
    pids = [int(p) for p in (await _wait_for_file(pidfile)).split()]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [pid for pid in pids if _running(pid)] == []


async def test_background_leftovers_are_stopped_when_the_child_exits(shared_dir: Path) -> None:
    """A grandchild left running (holding the output pipe) does not outlive the step."""
    script = "sleep 60 & echo $!"
    started = time.monotonic()
    result = await ShellAction(kill_grace_s=0.3).run(_ctx({"argv": ["/bin/sh", "-c", script]}))
    assert time.monotonic() - started < 10
    assert result.output["exit_code"] == 0
    leftover = int(result.output["stdout"].split()[0])
    assert not _running(leftover)


async def test_terminate_group_of_a_finished_group_is_harmless() -> None:
    process = await asyncio.create_subprocess_exec("true", start_new_session=True)
    await process.wait()
    await terminate_group(process.pid, grace_s=0.1)


async def test_record_only_runs_nothing(shared_dir: Path) -> None:
    marker = shared_dir / "created"
    value = "rec-" + secrets.token_hex(8)
    result = await ShellAction().run(
        _ctx(
            {
                "argv": ["/usr/bin/touch", str(marker)],
                "env": {"TOKEN_X": value},
                "cwd": str(shared_dir),
            },
            record_only=True,
        )
    )
    assert not marker.exists()
    assert result.record_only
    assert result.output["would_run"] == {
        "action": "shell",
        "argv": ["/usr/bin/touch", str(marker)],
        "env_names": ["TOKEN_X"],
        "env_allow": [],
        "cwd": str(shared_dir),
    }
    assert value not in json.dumps(result.output)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "params.argv"),
        ({"argv": []}, "params.argv"),
        ({"argv": [""]}, "params.argv[0]"),
        ({"argv": ["/usr/bin/echo", 3]}, "params.argv[1]"),
        ({"argv": ["/usr/bin/echo", {"$secret": "env:X"}]}, "params.argv[1]"),
        ({"argv": ["/usr/bin/echo", "a\x00b"]}, "params.argv"),
        ({"argv": ["true"], "env": {"1BAD": "x"}}, "params.env"),
        ({"argv": ["true"], "env": {"A": 5}}, "params.env.A"),
        ({"argv": ["true"], "env": {"A": "a\x00"}}, "params.env.A"),
        ({"argv": ["true"], "env": {IDEMPOTENCY_ENV: "x"}}, f"params.env.{IDEMPOTENCY_ENV}"),
        ({"argv": ["true"], "env": "A=1"}, "params.env"),
        ({"argv": ["true"], "env_allow": ["OPSC_DATABASE_URL"]}, "params.env_allow"),
        ({"argv": ["true"], "env_allow": ["not valid"]}, "params.env_allow"),
        ({"argv": ["true"], "cwd": 5}, "params.cwd"),
        ({"argv": ["true"], "timeout_s": 0}, "params.timeout_s"),
        ({"argv": ["true"], "timeout_s": 3601}, "params.timeout_s"),
        ({"argv": ["true"], "expected_exit_codes": []}, "params.expected_exit_codes"),
        ({"argv": ["true"], "expected_exit_codes": [256]}, "params.expected_exit_codes"),
        ({"argv": ["true"], "expected_exit_codes": 0}, "params.expected_exit_codes"),
        ({"argv": ["true"], "shell": True}, "params.shell"),
    ],
)
def test_shell_validation(params: dict[str, Any], field: str) -> None:
    assert [v.field for v in ShellAction().validate(params)] == [field]


def test_too_many_env_vars_are_refused() -> None:
    env = {f"V{i}": "x" for i in range(129)}
    assert [v.field for v in ShellAction().validate({"argv": ["true"], "env": env})] == [
        "params.env"
    ]


def test_secret_reference_allowed_in_env_values() -> None:
    assert ShellAction().validate({"argv": ["true"], "env": {"T": {"$secret": "env:T"}}}) == []


async def test_an_unresolved_reference_never_reaches_the_child() -> None:
    with pytest.raises(PlanValidationError, match="not resolved"):
        await ShellAction().run(
            _ctx({"argv": ["/usr/bin/env"], "env": {"T": {"$secret": "env:T"}}})
        )


def test_shell_metadata() -> None:
    action = ShellAction()
    assert action.estimate_ms({"argv": ["true"]}, 5) == 1000
    assert action.min_action_class.value == "modify"


async def test_a_process_escaping_the_group_cannot_hold_the_step(shared_dir: Path) -> None:
    """A grandchild that calls setsid() is out of reach of killpg; the step still ends."""
    escape = "import os, time; os.setsid(); time.sleep(30)"
    script = '"$0" -c "$1" & echo $!'
    started = time.monotonic()
    result = await ShellAction(kill_grace_s=0.3).run(
        _ctx({"argv": ["/bin/sh", "-c", script, STEP_PYTHON, escape]})
    )
    escaped = int(result.output["stdout"].split()[0])
    try:
        assert time.monotonic() - started < 10
        assert result.output["exit_code"] == 0
        # The sandbox kills every process of the step's uid, escaped ones included.
        assert not _running(escaped)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(escaped, signal.SIGKILL)


def _processes_with(token: str) -> list[int]:
    """Live processes whose command line contains ``token``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if token.encode() in cmdline and _running(int(entry.name)):
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize("loop_turns", [0, 1, 2, 3, 5, 8, 13, 21])
async def test_cancelled_at_any_moment_leaves_no_process(loop_turns: int) -> None:
    """Whether the cancel lands while spawning or while running, the group is gone at once."""
    token = f"opsc-test-{secrets.token_hex(6)}"
    # Every process of the group carries the token on its command line.
    script = 'trap "" TERM; "$0" -c "$1" "$2" & "$0" -c "$1" "$2" & wait'
    argv = ["/bin/sh", "-c", script, STEP_PYTHON, "import time; time.sleep(60)", token]
    task = asyncio.create_task(ShellAction(kill_grace_s=0.2).run(_ctx({"argv": argv})))
    for _ in range(loop_turns):
        await asyncio.sleep(0)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 10
    assert _processes_with(token) == []
