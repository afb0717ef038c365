"""Finding 1 of issue 8, as the attacker ran it: a ``shell`` step tries to take the worker.

Each test is an attack with real processes in the real sandbox (bwrap, and setpriv where the
attack applies to it too). On the code before the sandbox every one of them succeeded: the
step ran as the worker's uid (root here) with its environment, files and network.

Outputs are shifted by one letter inside the step (``tr``) before they come back, so that the
result masker cannot hide a leak from these assertions: a leak shows up shifted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from opsconductor.actions.base import ActionContext, ActionFailedError, ActionResult
from opsconductor.actions.sandbox import Sandbox, SandboxMode, SandboxSettings
from opsconductor.actions.shell import ShellAction
from opsconductor.common.tenant_policy import ShellPolicy, TenantPolicy

SH = "/bin/sh"
BASH = "/usr/bin/bash"
PYTHON = "/usr/bin/python3"
SHIFT = ["|", "/usr/bin/tr", "a-zA-Z0-9", "b-zaB-ZA1-90"]


def shifted(text: str) -> str:
    """What ``tr a-zA-Z0-9 b-zaB-ZA1-90`` makes of ``text``."""
    table = str.maketrans(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
        "bcdefghijklmnopqrstuvwxyzaBCDEFGHIJKLMNOPQRSTUVWXYZA1234567890",
    )
    return text.translate(table)


def policy(**overrides: Any) -> TenantPolicy:
    shell: dict[str, Any] = {
        "enabled": True,
        "executables": (SH, BASH, PYTHON),
        "allow_interpreters": True,
        "network": False,
    }
    return TenantPolicy(shell=ShellPolicy(**(shell | overrides)))


def ctx(argv: list[str], tenant_policy: TenantPolicy, **params: Any) -> ActionContext:
    return ActionContext(
        execution_id="exec-attack",
        step_id="steal",
        idempotency_key="exec-attack:steal",
        tenant_id="mallory-corp",
        targets=("host-1",),
        params={"argv": argv, **params},
        timeout_s=20.0,
        record_only=False,
        cancel_event=asyncio.Event(),
        tenant_policy=tenant_policy,
    )


def action(mode: SandboxMode, **settings: Any) -> ShellAction:
    return ShellAction(sandbox=Sandbox(SandboxSettings(mode=mode, **settings)), kill_grace_s=0.3)


async def run(
    mode: SandboxMode, script: str, tenant_policy: TenantPolicy | None = None, **params: Any
) -> ActionResult | ActionFailedError:
    """Run ``script`` with sh in the sandbox; the result, or the failure it ended with."""
    chosen = tenant_policy or policy(network=mode is SandboxMode.SETPRIV)
    try:
        return await action(mode).run(ctx([SH, "-c", script], chosen, **params))
    except ActionFailedError as exc:
        return exc


def text_of(outcome: ActionResult | ActionFailedError) -> str:
    output: Mapping[str, Any]
    if isinstance(outcome, ActionResult):
        output = outcome.output
    else:
        assert outcome.output is not None
        output = outcome.output.output
    return f"{output['stdout']}\n{output['stderr']}"


WORKER_CANARIES = {
    # Shaped so that the result masker does not hide them (no credentials in the URLs).
    "DATABASE_URL": f"postgresql://127.0.0.1/canarydb{secrets.token_hex(6)}",
    "REDIS_URL": f"redis://127.0.0.1/canaryredis{secrets.token_hex(6)}",
    "OPSC_JWT_HS256_KEY": f"canarykey{secrets.token_hex(6)}",
}
# A worker-like process: started with the canaries in its environment (as the worker is with
# its settings, so /proc/<worker>/environ holds them), it runs one step and prints its output.
WORKER = """
import asyncio, sys
from tests.integration.test_sandbox_attacks import SandboxMode, action, ctx, policy, text_of
mode = SandboxMode(sys.argv[1])
step = ctx(["/bin/sh", "-c", sys.argv[2]], policy(network=mode is SandboxMode.SETPRIV))
print(text_of(asyncio.run(action(mode).run(step))))
"""


async def run_in_worker_process(mode: SandboxMode, script: str) -> str:
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WORKER,
        mode.value,
        script,
        env={**os.environ, **WORKER_CANARIES},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await worker.communicate()
    assert worker.returncode == 0
    return out.decode()


MODES = [SandboxMode.BWRAP, SandboxMode.SETPRIV]


@pytest.mark.parametrize("mode", MODES)
async def test_a_step_cannot_read_the_worker_environment(mode: SandboxMode) -> None:
    # /proc/$PPID is the worker (or the sandbox's own init); /proc/1 the machine's init.
    script = (
        "{ cat /proc/$PPID/environ; cat /proc/1/environ; env; "
        "for p in /proc/[0-9]*; do cat $p/environ; done; } 2>&1 | tr '\\0' '\\n' " + " ".join(SHIFT)
    )
    output = await run_in_worker_process(mode, script)
    assert shifted("Permission denied") in output or mode is SandboxMode.BWRAP
    for name, value in WORKER_CANARIES.items():
        assert value not in output
        assert shifted(value) not in output, f"{name} leaked"
        assert shifted(name) not in output, f"{name} is set in the step"


async def test_a_step_cannot_pass_worker_settings_through() -> None:
    for name in ("DATABASE_URL", "REDIS_URL", "OPSC_JWT_HS256_KEY", "opsc_grpc_port"):
        violations = ShellAction().validate({"argv": [SH], "env_allow": [name]})
        assert [v.field for v in violations] == ["params.env_allow"], name


@pytest.fixture
def worker_dir() -> Iterator[Path]:
    """A worker-like directory: ``make run``'s key file (0600) and a world-readable config."""
    root = Path(tempfile.mkdtemp(prefix="opsc-worker-"))
    root.chmod(0o755)
    devstack = root / ".devstack"
    devstack.mkdir(mode=0o700)
    key = devstack / "jwt-hs256.key"
    key.touch(mode=0o600)
    key.write_text(f"canarysigningkey{secrets.token_hex(8)}")
    config = root / "worker.env"
    config.write_text(f"canaryconfig{secrets.token_hex(8)}")
    config.chmod(0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("mode", MODES)
async def test_a_step_cannot_read_the_signing_key(mode: SandboxMode, worker_dir: Path) -> None:
    key = worker_dir / ".devstack" / "jwt-hs256.key"
    script = f"cat {key} {worker_dir}/.devstack/* 2>&1 " + " ".join(SHIFT)
    outcome = await run(mode, script)
    assert shifted(key.read_text()) not in text_of(outcome)
    assert key.read_text() not in text_of(outcome)


async def test_in_bwrap_the_worker_files_do_not_exist(worker_dir: Path) -> None:
    """Not even world-readable ones: nothing of the worker is mounted (cwd, /tmp, /work...)."""
    config = worker_dir / "worker.env"
    cwd = Path.cwd()
    script = (
        f"cat {config} 2>&1; ls {worker_dir} {cwd} /root /var/run/secrets 2>&1; "
        f"ls -a /tmp; cat {cwd}/pyproject.toml 2>&1 | head -c 40"
    )
    outcome = await run(SandboxMode.BWRAP, script)
    output = text_of(outcome)
    assert config.read_text() not in output
    assert output.count("No such file or directory") >= 4
    assert "[tool" not in output  # the worker's own source tree is not there either


@pytest.fixture
async def service_port() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A listener on 127.0.0.1, like the worker's gRPC and metrics ports; records what it got."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(100) or b"<connected>")
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, received
    finally:
        server.close()
        await server.wait_closed()


async def test_a_step_cannot_reach_a_loopback_service_port(
    service_port: tuple[int, list[bytes]],
) -> None:
    port, received = service_port
    script = f"echo stolen > /dev/tcp/127.0.0.1/{port} && echo CONNECTED"
    with pytest.raises(ActionFailedError) as info:
        await action(SandboxMode.BWRAP).run(ctx([BASH, "-c", script], policy()))
    # The step's own, empty loopback: nothing listens there.
    assert "CONNECTED" not in text_of(info.value)
    assert "Connection refused" in text_of(info.value)
    await asyncio.sleep(0.05)  # a connection, had there been one, is handled by now
    assert received == []


async def test_the_control_with_network_allowed_reaches_it(
    service_port: tuple[int, list[bytes]],
) -> None:
    """Proves the listener is reachable at all (and what ``network: true`` gives away)."""
    port, received = service_port
    script = f"echo hello > /dev/tcp/127.0.0.1/{port} && echo CONNECTED"
    outcome = await action(SandboxMode.BWRAP).run(ctx([BASH, "-c", script], policy(network=True)))
    assert "CONNECTED" in text_of(outcome)
    deadline = time.monotonic() + 5
    while not received and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert received == [b"hello\n"]


async def test_setpriv_mode_refuses_to_run_when_the_network_must_be_isolated() -> None:
    """Fail closed: without a network namespace the policy's network: false cannot hold."""
    with pytest.raises(ActionFailedError) as info:
        await action(SandboxMode.SETPRIV).run(ctx([SH, "-c", "true"], policy(network=False)))
    assert info.value.reason == "SANDBOX_UNAVAILABLE"


@pytest.mark.parametrize("mode", MODES)
async def test_a_fork_bomb_is_bounded(mode: SandboxMode) -> None:
    # Forks until refused, reports how many children it got, then the sandbox reaps them.
    bomb = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(10000):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60); os._exit(0)\n"
        "        n += 1\n"
        "except OSError as exc:\n"
        "    print('refused after', n, exc.errno)\n"
    )
    started = time.monotonic()
    tenant = policy(max_processes=16, network=mode is SandboxMode.SETPRIV)
    result = await action(mode).run(ctx([PYTHON, "-c", bomb], tenant))
    assert isinstance(result, ActionResult)
    words = result.output["stdout"].split()
    assert words[:2] == ["refused", "after"]
    assert int(words[2]) < 16
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    ("script", "limits", "signals", "stderr"),
    [
        # Memory: 2 GiB in a 128 MiB address space fails at once.
        (
            "import sys; b = bytearray(2 * 1024**3); print('got it')",
            {"memory_mb": 128},
            {1},
            "MemoryError",
        ),
        # CPU: a busy loop is stopped after its CPU seconds (SIGXCPU, then SIGKILL).
        ("while True: pass", {"cpu_s": 1}, {-24, -9, 128 + 24, 128 + 9}, ""),
        # File size: writing past the limit is refused (Python ignores SIGXFSZ: EFBIG).
        (
            "open('/tmp/big', 'wb').write(b'x' * (8 * 1024 * 1024)); print('got it')",
            {"max_file_mb": 1},
            {1},
            "File too large",
        ),
    ],
    ids=["memory", "cpu", "file-size"],
)
async def test_resource_limits_hold(
    script: str, limits: dict[str, int], signals: set[int], stderr: str
) -> None:
    started = time.monotonic()
    with pytest.raises(ActionFailedError) as info:
        await action(SandboxMode.BWRAP).run(ctx([PYTHON, "-c", script], policy(**limits)))
    assert time.monotonic() - started < 15
    output = info.value.output
    assert output is not None
    assert "got it" not in output.output["stdout"]
    assert output.output["exit_code"] in signals
    assert stderr in output.output["stderr"]


async def test_a_step_runs_as_its_own_unprivileged_uid() -> None:
    script = "id -u; id -G; grep -E '^(CapEff|CapPrm|NoNewPrivs)' /proc/self/status"
    outcome = await run(SandboxMode.BWRAP, script)
    assert isinstance(outcome, ActionResult)
    lines = outcome.output["stdout"].split("\n")
    uid = int(lines[0])
    assert uid >= 200_000
    assert lines[1] == str(uid)  # its own group only
    assert "CapEff:\t0000000000000000" in lines
    assert "CapPrm:\t0000000000000000" in lines
    assert "NoNewPrivs:\t1" in lines


async def test_nothing_of_the_step_outlives_it_even_outside_its_process_group() -> None:
    escape = "import os, time; os.setsid(); time.sleep(60)"
    script = f'"{PYTHON}" -c "{escape}" & echo started'
    outcome = await run(SandboxMode.SETPRIV, script)
    assert isinstance(outcome, ActionResult)
    uid = 200_000  # the first uid of the pool: no other step runs in this test
    leftovers = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            status = (entry / "status").read_text() if entry.name.isdigit() else ""
            # Zombies are dead already (this container's init may never reap them).
            if f"Uid:\t{uid}\t" in status and "State:\tZ" not in status:
                leftovers.append(entry.name)
    assert leftovers == []


async def test_setpriv_mode_leaves_no_file_for_the_next_step_of_that_uid() -> None:
    """The next step given the same uid (perhaps another tenant's) finds nothing of this one."""
    name = f"/tmp/opsc-left-{secrets.token_hex(4)}"
    outcome = await run(SandboxMode.SETPRIV, f"mkdir {name}; echo secret > {name}/f; echo ok")
    assert isinstance(outcome, ActionResult)
    assert outcome.output["stdout"] == "ok\n"
    assert not os.path.exists(name)


async def test_the_sandbox_fails_closed_when_bwrap_is_missing() -> None:
    missing = action(SandboxMode.BWRAP, bwrap="/nonexistent/bwrap")
    with pytest.raises(ActionFailedError) as info:
        await missing.run(ctx([SH, "-c", "true"], policy()))
    assert info.value.reason == "SANDBOX_UNAVAILABLE"
    assert "not installed" in info.value.message


async def test_concurrent_steps_get_distinct_uids() -> None:
    sandbox = Sandbox(SandboxSettings(uid_count=2))
    tenant = policy().shell
    async with (
        sandbox.enter([SH], cwd=None, policy=tenant) as first,
        sandbox.enter([SH], cwd=None, policy=tenant) as second,
    ):
        assert first.uid != second.uid
        with pytest.raises(ActionFailedError, match="sandbox uids are in use"):
            async with sandbox.enter([SH], cwd=None, policy=tenant):
                pass  # pragma: no cover - never entered
    # Released: a later step gets one again.
    async with sandbox.enter([SH], cwd=None, policy=tenant) as again:
        assert again.uid in {first.uid, second.uid}


async def test_another_worker_process_holding_a_uid_is_skipped(tmp_path: Path) -> None:
    settings = SandboxSettings(uid_count=2, lock_dir=tmp_path / "locks")
    one, two = Sandbox(settings), Sandbox(settings)  # two pools: as two worker processes
    tenant = policy().shell
    async with (
        one.enter([SH], cwd=None, policy=tenant) as held,
        two.enter([SH], cwd=None, policy=tenant) as other,
    ):
        assert other.uid != held.uid


async def test_a_shared_lock_directory_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    sandbox = Sandbox(SandboxSettings(lock_dir=shared))
    with pytest.raises(ActionFailedError, match="not a private directory"):
        async with sandbox.enter([SH], cwd=None, policy=policy().shell):
            pass  # pragma: no cover - never entered


@pytest.mark.parametrize(
    ("argv0", "cwd", "why"),
    [
        ("/usr/nonexistent/x", None, "No such file"),
        ("/nonexistent/x", None, "not visible inside the sandbox"),
        (str(Path(os.__file__)), None, "not visible inside the sandbox"),
        (SH, "/nonexistent-dir", "not visible inside the sandbox"),
        (SH, "/usr/nonexistent-dir", "No such file"),
        (SH, "relative", "must be an absolute path"),
        (SH, "/tmp/sub", "not visible inside the sandbox"),
    ],
)
async def test_what_the_step_cannot_see_cannot_start(argv0: str, cwd: str | None, why: str) -> None:
    sandbox = Sandbox()
    with pytest.raises(ActionFailedError, match=why) as info:
        async with sandbox.enter([argv0], cwd=cwd, policy=policy().shell):
            pass  # pragma: no cover - never entered
    assert info.value.details["error_class"] == "FileNotFoundError"


async def test_a_cwd_inside_the_sandbox_is_used() -> None:
    outcome = await run(SandboxMode.BWRAP, "pwd", cwd="/usr/share")
    assert isinstance(outcome, ActionResult)
    assert outcome.output["stdout"] == "/usr/share\n"
