"""``make run`` (``python -m opsconductor.devstack``) end to end, as real subprocesses.

The acceptance check "make run reaches SERVING on all four health checks within 30 s": once with
embedded Postgres/Redis (DATABASE_URL/REDIS_URL unset) and once against this run's servers with a
fresh database. Each run uses free ephemeral ports and its own data folder, so it never collides
with a developer's ``make run``. SIGTERM must then stop everything, exit 0, within 15 s, leaving
no process behind (checked by pid, including the embedded servers).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import grpc
import grpc.aio
import httpx
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opsconductor.client import ExecutionClient, PermissionDeniedError
from opsconductor.devstack.dev_identity import DEV_SECRET_REF, DEV_TENANT, dev_token, signing_key
from tests import ports

pytestmark = pytest.mark.slow

READY_BUDGET_S = 30.0
STOP_BUDGET_S = 15.0
SERVICES = ("api", "worker", "approvals", "progress")


def free_ports(count: int) -> list[int]:
    """Distinct free ports outside the ephemeral range (tests.ports)."""
    return ports.free_ports(count)


def devstack_env(
    data_dir: Path, *, database_url: str | None, redis_url: str | None
) -> tuple[dict[str, str], dict[str, int]]:
    """Environment for one devstack run and the gRPC port of each service."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "REDIS_URL", "OPSC_DATABASE_URL", "OPSC_REDIS_URL"}
    }
    ports = free_ports(9)
    grpc_ports = dict(zip(SERVICES, ports[:4], strict=True))
    for service, port in grpc_ports.items():
        env[f"OPSC_{service.upper()}_PORT"] = str(port)
    for service, port in zip(SERVICES, ports[4:8], strict=True):
        env[f"OPSC_{service.upper()}_METRICS_PORT"] = str(port)
    env["OPSC_PROGRESS_HTTP_PORT"] = str(ports[8])
    env["OPSC_DEVSTACK_DIR"] = str(data_dir)
    env["OPSC_LOG_LEVEL"] = "INFO"
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    return env, grpc_ports


async def health_status(port: int) -> int | None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1.0
            )
        except grpc.aio.AioRpcError:
            return None
        status: int = response.status
        return status


async def wait_all_serving(
    process: subprocess.Popen[bytes], ports: dict[str, int], output: Path
) -> float:
    """Poll every health check until SERVING; returns seconds since the process started."""
    started = psutil.Process(process.pid).create_time()
    deadline = time.monotonic() + READY_BUDGET_S + 5  # the assertion below enforces the budget
    pending = dict(ports)
    while pending:
        if process.poll() is not None:
            raise AssertionError(
                f"devstack exited with {process.returncode}:\n{output.read_text()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"not SERVING: {sorted(pending)}\n{output.read_text()}")
        statuses = await asyncio.gather(*(health_status(port) for port in pending.values()))
        for name, status in zip(list(pending), statuses, strict=True):
            if status == health_pb2.HealthCheckResponse.SERVING:
                del pending[name]
        if pending:
            await asyncio.sleep(0.1)
    return time.time() - started


def snapshot_processes(supervisor_pid: int, data_dir: Path) -> list[psutil.Process]:
    """The supervisor, its descendants, and the embedded servers (found by their data folder)."""
    supervisor = psutil.Process(supervisor_pid)
    procs = {p.pid: p for p in [supervisor, *supervisor.children(recursive=True)]}
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if str(data_dir) in cmdline:
            procs.setdefault(proc.pid, proc)
    return list(procs.values())


def alive(proc: psutil.Process) -> bool:
    """Still running: same pid *and* same start time (no pid reuse), and not a zombie."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def devstack_runner() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes started by a test; stopped (SIGTERM, then SIGKILL of the whole tree) if the
    test failed half-way, so a failure does not leak servers into the rest of the run."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is not None:
            continue
        tree = psutil.Process(process.pid).children(recursive=True)
        process.terminate()
        try:
            process.wait(timeout=STOP_BUDGET_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for child in tree:
            if alive(child):
                child.kill()


@pytest.fixture
def data_root() -> Iterator[Path]:
    """A data folder for the devstack outside pytest's tmp root.

    Embedded Postgres runs as the ``pgserver`` user, which must traverse every parent folder;
    pytest keeps its ``pytest-of-<user>`` root at mode 0700 (and re-applies that whenever any
    pytest session starts), so the cluster cannot live under ``tmp_path``.
    """
    root = Path(tempfile.mkdtemp(prefix="opsc-devstack-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def run_devstack_and_stop(
    tmp_path: Path,
    data_root: Path,
    runner: list[subprocess.Popen[bytes]],
    *,
    database_url: str | None,
    redis_url: str | None,
    expect_embedded: bool,
    while_serving: Callable[[Path, dict[str, int]], Awaitable[None]] | None = None,
) -> float:
    data_dir = data_root / "devstack"
    env, ports = devstack_env(data_dir, database_url=database_url, redis_url=redis_url)
    output = tmp_path / "devstack.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "opsconductor.devstack"],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    runner.append(process)

    elapsed = await wait_all_serving(process, ports, output)
    print(f"\ndevstack all-SERVING after {elapsed:.2f} s (embedded={expect_embedded})")
    assert elapsed < READY_BUDGET_S

    # The supervisor reports the table once it has seen every service SERVING, then prints the
    # identity block (token, UI address): wait for both.
    deadline = time.monotonic() + 10
    while not re.search(r"all 4 services SERVING in [0-9.]+ s(?s:.*)\n  UI: ", output.read_text()):
        assert process.poll() is None, output.read_text()
        assert time.monotonic() < deadline, output.read_text()
        await asyncio.sleep(0.05)
    text = output.read_text()
    for service, port in ports.items():
        assert re.search(rf"^\s+{service}\s+127\.0\.0\.1:{port}\s+SERVING\s+\d+", text, re.M), text
    assert ("embedded" in text) is expect_embedded
    # make run prints the UI's address, and the page is served there (no Node.js needed).
    ui = re.search(r"UI: (http://127\.0\.0\.1:(\d+)/ui/)", text)
    assert ui is not None, text
    assert ui.group(2) == env["OPSC_PROGRESS_HTTP_PORT"]
    async with httpx.AsyncClient(timeout=10) as http:
        page = await http.get(ui.group(1))
    assert page.status_code == 200
    assert "grpc-client.js" in page.text
    if while_serving is not None:
        await while_serving(data_dir, ports)

    procs = snapshot_processes(process.pid, data_dir)
    names = " ".join(" ".join(p.cmdline()) for p in procs)
    for service in SERVICES:
        assert f"opsconductor.{service}" in names
    if expect_embedded:
        assert "postgres" in names
        assert "redis-server" in names

    stop_started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=STOP_BUDGET_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"devstack did not stop in time:\n{output.read_text()}") from None
    print(f"devstack stopped in {time.monotonic() - stop_started:.2f} s")
    assert code == 0, output.read_text()
    survivors = [f"{p.pid} {' '.join(p.cmdline())}" for p in procs if alive(p)]
    assert survivors == [], output.read_text()
    return elapsed


async def test_make_run_with_embedded_servers_serves_then_stops_cleanly(
    tmp_path: Path, data_root: Path, devstack_runner: list[subprocess.Popen[bytes]]
) -> None:
    """Without DATABASE_URL/REDIS_URL: embedded Postgres and Redis, four SERVING services within
    30 s, then SIGTERM → exit 0 within 15 s with no process left (embedded servers included)."""
    await run_devstack_and_stop(
        tmp_path,
        data_root,
        devstack_runner,
        database_url=None,
        redis_url=None,
        expect_embedded=True,
    )


@pytest.fixture
async def fresh_database_url(server_dsn: str) -> AsyncIterator[str]:
    """A new, empty database on this run's Postgres (the devstack migrates it), dropped after."""
    from urllib.parse import urlsplit, urlunsplit

    def on(database: str) -> str:
        parts = urlsplit(server_dsn)
        return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, ""))

    name = f"opsc_test_devstack_{os.getpid()}_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(on("postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield on(name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def _step(action: str, params: dict[str, object]) -> dict[str, object]:
    return {
        "id": "s1",
        "action": action,
        "action_class": "read",
        "targets": [{"ref": "host:web-01"}],
        "params": params,
    }


async def dev_secret_works_only_where_catalogued(data_dir: Path, ports: dict[str, int]) -> None:
    """The dev tenant's generated secret resolves for ``noop`` (its catalogue entry) and is
    refused at submit for an ``http`` step, as docs/security.md says."""
    ref = {"$secret": DEV_SECRET_REF}
    token = dev_token(signing_key(data_dir))
    async with ExecutionClient(f"127.0.0.1:{ports['api']}", token) as client:
        done = await client.submit(
            {"name": "hello", "sla_class": "fast", "steps": [_step("noop", {"token": ref})]},
            tenant_id=DEV_TENANT,
        )
        assert done.status == "succeeded", (done.error_class, done.error_message)
        with pytest.raises(PermissionDeniedError, match="not available to this step"):
            await client.submit(
                {
                    "name": "elsewhere",
                    "sla_class": "fast",
                    "steps": [
                        _step("http", {"url": "https://example.com/", "headers": {"X-T": ref}})
                    ],
                },
                tenant_id=DEV_TENANT,
            )


async def test_make_run_with_given_servers_serves_then_stops_cleanly(
    tmp_path: Path,
    data_root: Path,
    devstack_runner: list[subprocess.Popen[bytes]],
    fresh_database_url: str,
    redis_url: str,
) -> None:
    """With DATABASE_URL/REDIS_URL set: no embedded server is started, the given database gets
    migrated, four SERVING services within 30 s (the dev tenant's secret usable where its
    catalogue allows), then a clean SIGTERM stop."""
    await run_devstack_and_stop(
        tmp_path,
        data_root,
        devstack_runner,
        database_url=fresh_database_url,
        redis_url=redis_url,
        expect_embedded=False,
        while_serving=dev_secret_works_only_where_catalogued,
    )
    conn = await asyncpg.connect(fresh_database_url)
    try:
        tables = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'executions'"
        )
    finally:
        await conn.close()
    assert tables == 1, "the devstack applied the migrations to the given database"


async def test_a_service_that_dies_stops_the_whole_stack_with_an_error(
    tmp_path: Path,
    data_root: Path,
    devstack_runner: list[subprocess.Popen[bytes]],
    fresh_database_url: str,
    redis_url: str,
) -> None:
    """When a service cannot start (its port is taken), the supervisor reports which one, stops
    the others and exits non-zero, leaving nothing running."""
    data_dir = data_root / "devstack"
    env, ports = devstack_env(data_dir, database_url=fresh_database_url, redis_url=redis_url)
    output = tmp_path / "devstack.out"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", ports["worker"]))
        squatter.listen()
        with output.open("wb") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "opsconductor.devstack"],
                env=env,
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        devstack_runner.append(process)
        seen: dict[int, psutil.Process] = {}
        deadline = time.monotonic() + READY_BUDGET_S
        while process.poll() is None:
            assert time.monotonic() < deadline, output.read_text()
            try:
                for child in psutil.Process(process.pid).children(recursive=True):
                    seen.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                break
            await asyncio.sleep(0.05)
    text = output.read_text()
    assert process.returncode == 1, text
    assert re.search(r"Service\(s\) died: .*worker", text), text
    assert "server_crashed" in text
    assert [p.pid for p in seen.values() if alive(p)] == []


async def test_a_service_killed_after_start_is_restarted_with_its_count_in_the_table(
    tmp_path: Path,
    data_root: Path,
    devstack_runner: list[subprocess.Popen[bytes]],
    fresh_database_url: str,
    redis_url: str,
) -> None:
    """``--workers 2`` starts two workers; once the stack serves, ``kill -9`` of the first one
    is not fatal: the supervisor logs the exit, starts it again on the same port, and prints
    the table again with RESTARTS 1 once it is SERVING; the stack still stops cleanly."""
    data_dir = data_root / "devstack"
    env, ports = devstack_env(data_dir, database_url=fresh_database_url, redis_url=redis_url)
    output = tmp_path / "devstack.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "opsconductor.devstack", "--workers", "2"],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    devstack_runner.append(process)
    await wait_all_serving(process, ports, output)

    def table_row(service: str) -> re.Match[str] | None:
        pattern = rf"^\s+{service}\s+127\.0\.0\.1:(\d+)\s+(\w+)\s+(\d+)\s+(\d+)"
        matches = list(re.finditer(pattern, output.read_text(), re.M))
        return matches[-1] if matches else None

    deadline = time.monotonic() + 10
    while table_row("worker-2") is None:
        assert time.monotonic() < deadline, output.read_text()
        await asyncio.sleep(0.05)
    second = table_row("worker-2")
    assert second is not None
    assert second.group(2) == "SERVING", output.read_text()
    assert await health_status(int(second.group(1))) == health_pb2.HealthCheckResponse.SERVING

    first = table_row("worker")
    assert first is not None
    killed_pid = int(first.group(3))
    os.kill(killed_pid, signal.SIGKILL)
    deadline = time.monotonic() + READY_BUDGET_S
    while "worker restarted and SERVING again" not in output.read_text():
        assert process.poll() is None, output.read_text()
        assert time.monotonic() < deadline, output.read_text()
        await asyncio.sleep(0.1)
    text = output.read_text()
    assert "service_exited" in text
    assert "service_restarted" in text
    again = table_row("worker")
    assert again is not None, text
    assert (again.group(1), again.group(2), again.group(4)) == (
        str(ports["worker"]),
        "SERVING",
        "1",
    ), text
    assert int(again.group(3)) != killed_pid
    assert await health_status(ports["worker"]) == health_pb2.HealthCheckResponse.SERVING

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=STOP_BUDGET_S) == 0, output.read_text()
