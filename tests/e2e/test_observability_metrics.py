"""Metrics end to end: a scripted mix through the real services moves each counter of each
service's ``/metrics`` by exactly what it should (a user's cancellation never as a failure),
every output passes ``promtool check metrics``, and a real Prometheus (the Debian binary,
scraping the stack with the repository's rules loaded) answers every dashboard panel's query
with data from exported metrics only, and holds the DLQ alert pending once more than 10 jobs are
dead-lettered.

Processes: api, worker, approvals, progress and the reaper loop, each with a metrics port, on a
database and a Redis key prefix of this module's own.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import asyncpg
import pytest
from opsc_test_actions import read_ledger
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from opsconductor.client import ExecutionClient, ExecutionTimeoutError, PermissionDeniedError
from opsconductor.common.auth import issue_token
from opsconductor.common.fsm import ExecutionStatus
from opsconductor.lifecycle.queue.redis_queue import RedisQueue, create_redis_client
from opsconductor.lifecycle.storage.locks import LockRequest, acquire_locks
from opsconductor.lifecycle.storage.role_bindings import bind_role
from tests.conftest import RUN_ID
from tests.deploy.test_monitoring import MONITORING, dashboard_queries, metric_names
from tests.e2e.test_execution_log_paths import required_fields
from tests.integration.test_executions_repo import in_status
from tests.ports import free_port

from .conftest import AUDIENCE, HS256_KEY, token
from .inspection import wait_until
from .plans import plan, probe_step
from .stack import Stack, service_env, start_service

SERVICES = ("api", "worker", "approvals", "progress", "reaper")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _free_port() -> int:
    return free_port()


@dataclass
class MetricsStack:
    stack: Stack
    metrics_ports: dict[str, int]
    reaper: subprocess.Popen[bytes]

    def scrape_text(self, service: str) -> str:
        url = f"http://127.0.0.1:{self.metrics_ports[service]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text: str = response.read().decode()
        return text

    def scrape(self, service: str) -> Samples:
        samples: Samples = {}
        for family in text_string_to_metric_families(self.scrape_text(service)):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return samples


@pytest.fixture(scope="module")
async def metrics_stack(
    e2e_dsn: str, e2e_pool: asyncpg.Pool, redis_url: str
) -> AsyncIterator[MetricsStack]:
    log_dir = Path(tempfile.mkdtemp(prefix="opsc-e2e-metrics-"))
    stack = Stack(dsn=e2e_dsn, log_dir=log_dir)
    ports = {name: _free_port() for name in SERVICES}
    common = {
        "OPSC_REDIS_URL": redis_url,
        "OPSC_QUEUE_PREFIX": f"opsc-e2e:{RUN_ID}:{secrets.token_hex(3)}:",
        "OPSC_GAUGE_REFRESH_S": "0.5",
        # Every service also appends its JSON lines to one file, as spec §7.2's check reads it.
        "OPSC_LOG_FILE": str(log_dir / "logs" / "app.log"),
        # And its spans to one file (the OTLP exporter's stand-in here).
        "OPSC_OTEL_EXPORTER": "file",
        "OPSC_OTEL_FILE": str(log_dir / "spans.jsonl"),
    }
    reaper: subprocess.Popen[bytes] | None = None
    try:
        worker = await start_service(
            "worker", stack, {**common, "OPSC_METRICS_PORT": str(ports["worker"])}
        )
        for name in ("api", "approvals"):
            await start_service(
                name,
                stack,
                {
                    **common,
                    "OPSC_WORKER_TARGET": worker.address,
                    "OPSC_METRICS_PORT": str(ports[name]),
                },
            )
        await start_service(
            "progress",
            stack,
            {**common, "OPSC_HTTP_PORT": "0", "OPSC_METRICS_PORT": str(ports["progress"])},
        )
        env = service_env(e2e_dsn, {**common, "OPSC_METRICS_PORT": str(ports["reaper"])})
        with (log_dir / "reaper.log").open("ab") as log:
            reaper = subprocess.Popen(
                [sys.executable, "-m", "opsconductor.worker.reaper", "--interval", "1"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        running = MetricsStack(stack, ports, reaper)

        async def reaper_serving() -> bool:
            try:
                await asyncio.to_thread(running.scrape_text, "reaper")
            except OSError:
                assert reaper is not None
                assert reaper.poll() is None, "the reaper exited"
                return False
            return True

        await wait_until(reaper_serving, within_s=30, what="the reaper's metrics")
        yield running
    finally:
        if reaper is not None:
            reaper.terminate()
            await asyncio.to_thread(reaper.wait, 10)
        await stack.stop()


@dataclass
class Prometheus:
    url: str

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("/api/v1/query", query=expr)["result"]
        return result


@pytest.fixture(scope="module")
def prometheus(
    metrics_stack: MetricsStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    """The Debian Prometheus on a free port: scrapes every service each second, evaluates the
    repository's rules each second."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed: run `make monitoring-tools`"
    folder = tmp_path_factory.mktemp("prometheus")
    scrape_configs = [
        {
            "job_name": f"opsconductor-{name}",
            "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
        }
        for name, port in metrics_stack.metrics_ports.items()
    ]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(MONITORING / "rules.yaml")],
        "scrape_configs": scrape_configs,
    }
    (folder / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = _free_port()
    with (folder / "prometheus.log").open("ab") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "HOME": str(folder)},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (folder / "prometheus.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus not ready within 30 s"
            time.sleep(0.1)
        yield Prometheus(url)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@dataclass(frozen=True)
class Mix:
    before: dict[str, Samples]
    after: dict[str, Samples]
    outcomes: dict[str, Any]

    def delta(self, service: str, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return self.after[service].get(key, 0.0) - self.before[service].get(key, 0.0)

    def deltas(self, service: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
        """Every series of ``name`` that moved on ``service``."""
        moved = {}
        for (sample, labels), value in self.after[service].items():
            if sample == name:
                change = value - self.before[service].get((sample, labels), 0.0)
                if change:
                    moved[labels] = change
        return moved


def _labels(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


async def _expire_a_lease(metrics_stack: MetricsStack, tenant: str) -> None:
    """A worker that vanished holding a job: leased for 0.2 s by a consumer that is no service
    (the real worker's dequeue or the reaper's pass reclaims it), then removed."""
    env = metrics_stack.stack.services["worker"].extra_env
    redis = create_redis_client(env["OPSC_REDIS_URL"])
    queue = RedisQueue(redis, prefix=env["OPSC_QUEUE_PREFIX"])
    try:
        while True:
            job_id = uuid4()
            await queue.enqueue(job_id, uuid4(), tenant, 50, 3, 1)
            leased = await queue.dequeue("vanished-worker", 0.2)
            if leased is not None and leased.job_id == job_id:
                break
            await queue.remove(job_id)  # the real worker was quicker: again

        async def reclaimed() -> bool:
            job = await queue.get(job_id)
            return job is not None and job.lease_expirations == 1

        await wait_until(reclaimed, within_s=20, what="the expired lease reclaimed")
        await queue.remove(job_id)
    finally:
        await redis.aclose()


@pytest.fixture(scope="module")
async def mix(
    metrics_stack: MetricsStack,
    prometheus: Prometheus,
    e2e_pool: asyncpg.Pool,
    tmp_path_factory: pytest.TempPathFactory,
) -> Mix:
    """Success, failure, timeout, user cancel, system cancel, RBAC denial and a dead-letter."""
    tenant = f"t-{secrets.token_hex(4)}"
    for actor, role in (("alice", "operator"), ("bot", "operator"), ("vera", "viewer")):
        await bind_role(e2e_pool, tenant, actor, role, created_by="e2e")
    ledger = tmp_path_factory.mktemp("mix") / "ledger.jsonl"
    api = metrics_stack.stack.address("api")
    bot_token = issue_token(
        actor_id="bot",
        tenant_id=tenant,
        audience=AUDIENCE,
        hs256_key=SecretStr(HS256_KEY),
        ttl=timedelta(minutes=30),
        auth_method="service",
    )
    before = {name: metrics_stack.scrape(name) for name in SERVICES}

    def step(name: str, **params: Any) -> dict[str, Any]:
        return probe_step(name, [f"host:{secrets.token_hex(4)}"], ledger, **params)

    async with (
        ExecutionClient(api, token("alice", tenant)) as alice,
        ExecutionClient(api, bot_token) as bot,
        ExecutionClient(api, token("vera", tenant)) as vera,
    ):

        async def cancelled_by(client: ExecutionClient) -> Any:
            name = f"hold-{secrets.token_hex(4)}"
            running = asyncio.create_task(
                alice.submit(
                    plan(step("hold", hold_s=30, estimate_ms=100), name=name), tenant_id=tenant
                )
            )

            async def started() -> str | None:
                found = await e2e_pool.fetchval(
                    "SELECT id::text FROM executions WHERE tenant_id = $1 AND status = 'running'"
                    " AND plan_snapshot->'plan'->>'name' = $2",
                    tenant,
                    name,
                )
                return str(found) if found else None

            execution_id = await wait_until(started, within_s=20, what="a running execution")
            await client.cancel(execution_id, tenant_id=tenant)
            return await running

        succeeded = await alice.submit(plan(step("ok")), tenant_id=tenant)
        failed = await alice.submit(plan(step("boom", fail=True)), tenant_id=tenant)
        with pytest.raises(PermissionDeniedError):
            await vera.submit(plan(step("denied")), tenant_id=tenant)
        dead = await alice.submit(
            plan(probe_step("dlq", ["db:dlq"], ledger.parent / "missing" / "x.jsonl")),
            tenant_id=tenant,
            requested_mode="background",
        )

        async def followed() -> list[Any]:
            # A live gRPC subscriber of the progress service, from now to the end.
            progress = metrics_stack.stack.address("progress")
            async with ExecutionClient(progress, token("alice", tenant)) as client:
                return [e async for e in client.stream_events(dead.execution_id, tenant_id=tenant)]

        following = asyncio.create_task(followed())

        async def times_out() -> Any:
            name = f"slow-{secrets.token_hex(4)}"
            with pytest.raises(ExecutionTimeoutError):
                await alice.submit(
                    plan(step("slow", hold_s=20, estimate_ms=100), name=name), tenant_id=tenant
                )
            found = await e2e_pool.fetchval(
                "SELECT id::text FROM executions WHERE plan_snapshot->'plan'->>'name' = $1", name
            )
            return await alice.get(str(found), tenant_id=tenant)

        timed_out, user_cancelled = await asyncio.gather(times_out(), cancelled_by(alice))
        system_cancelled = await cancelled_by(bot)

        async def dead_lettered() -> Any:
            current = await alice.get(dead.execution_id, tenant_id=tenant)
            return current if current.is_terminal else None

        dead = await wait_until(dead_lettered, within_s=60, what="the dead-letter")
        streamed = await asyncio.wait_for(following, 30)

    await _expire_a_lease(metrics_stack, tenant)
    # A lock its holder never released, past its TTL: the reaper's next pass deletes it.
    stale = await acquire_locks(
        e2e_pool,
        [LockRequest(tenant, "host:stale", "probe")],
        owner_token=uuid4(),
        owner_execution_id=None,
        ttl=timedelta(seconds=30),
    )
    await e2e_pool.execute(
        "UPDATE execution_locks SET acquired_at = now() - interval '2 hours',"
        " expires_at = now() - interval '1 hour' WHERE lock_key = ANY($1::varchar[])",
        stale.keys,
    )

    async def gauges_caught_up() -> bool:
        # The stored counters as the api exports them, after the work was counted elsewhere.
        api_now = metrics_stack.scrape("api")
        moved = [
            api_now.get((name, frozenset()), 0) - before["api"].get((name, frozenset()), 0)
            for name in ("opsc_lease_expirations_total", "opsc_mutex_reaped_total")
        ]
        return api_now.get(("opsc_dlq_size", frozenset()), 0) >= 1 and min(moved) >= 1

    await wait_until(gauges_caught_up, within_s=20, what="the DLQ gauge", interval_s=0.2)
    after = {name: metrics_stack.scrape(name) for name in SERVICES}
    outcomes = {
        "succeeded": succeeded,
        "failed": failed,
        "timed_out": timed_out,
        "user_cancelled": user_cancelled,
        "system_cancelled": system_cancelled,
        "dead": dead,
        "streamed": streamed,
    }
    return Mix(before, after, outcomes)


async def test_each_counter_moves_by_exactly_the_scripted_amount(mix: Mix) -> None:
    o = mix.outcomes
    assert o["succeeded"].status == "succeeded"
    assert (o["failed"].status, o["timed_out"].status, o["timed_out"].timed_out) == (
        "failed",
        "failed",
        True,
    )
    assert (o["user_cancelled"].status, o["system_cancelled"].status) == ("cancelled", "cancelled")
    assert (o["dead"].status, o["dead"].attempts) == ("failed", 3)

    # Every outcome was ended by the worker, which counts each once.
    ended = "opsc_executions_total"
    assert mix.deltas("worker", ended) == {
        _labels(mode="immediate", sla_class="fast", action_class="read", status="succeeded"): 1,
        _labels(mode="immediate", sla_class="fast", action_class="read", status="failed"): 2,
        _labels(mode="immediate", sla_class="fast", action_class="read", status="cancelled"): 2,
        _labels(mode="background", sla_class="fast", action_class="read", status="failed"): 1,
    }
    assert mix.deltas("worker", "opsc_executions_failed_total") == {
        _labels(error_class=o["failed"].error_class, mode="immediate"): 1,
        _labels(error_class=o["timed_out"].error_class, mode="immediate"): 1,
        _labels(error_class=o["dead"].error_class, mode="background"): 1,
    }
    assert mix.deltas("worker", "opsc_executions_timed_out_total") == {
        _labels(mode="immediate", sla_class="fast"): 1
    }
    # The person's and the automation's cancellations apart, and neither a failure.
    assert mix.deltas("worker", "opsc_executions_cancelled_total") == {
        _labels(initiator="user", mode="immediate", sla_class="fast"): 1,
        _labels(initiator="system", mode="immediate", sla_class="fast"): 1,
    }
    durations = mix.deltas("worker", "opsc_execution_duration_seconds_count")
    assert sum(durations.values()) == 6
    assert (
        durations[_labels(action="probe", sla_class="fast", mode="immediate", status="cancelled")]
        == 2
    )
    assert mix.deltas("worker", "opsc_dlq_moves_total") == {frozenset(): 1}
    assert sum(mix.deltas("worker", "opsc_queue_wait_seconds_count").values()) == 3  # 3 attempts
    assert sum(mix.deltas("worker", "opsc_lock_wait_seconds_count").values()) >= 5

    # The denial happened at the api; nothing ended there.
    assert mix.deltas("api", "opsc_rbac_violations_total") == {
        _labels(tier="api", reason="MISSING_PERMISSION"): 1
    }
    for service in ("api", "approvals", "progress", "reaper"):
        for name in (ended, "opsc_executions_failed_total", "opsc_executions_cancelled_total"):
            assert mix.deltas(service, name) == {}, (service, name)
    assert mix.after["api"][("opsc_dlq_size", frozenset())] == 1
    # The progress service: one gRPC subscriber, gone now, handed every event of the
    # dead-lettered execution, most of them live (their commit-to-delivery lag measured).
    assert o["streamed"][-1].type == "execution_completed"
    assert mix.deltas("progress", "opsc_progress_events_delivered_total") == {
        _labels(transport="grpc"): len(o["streamed"])
    }
    assert mix.after["progress"][("opsc_progress_subscribers", _labels(transport="grpc"))] == 0
    lag = mix.deltas("progress", "opsc_progress_delivery_lag_seconds_count")
    assert set(lag) == {_labels(transport="grpc")}
    assert 1 <= lag[_labels(transport="grpc")] <= len(o["streamed"])
    assert mix.deltas("progress", "opsc_progress_slow_subscriber_disconnects_total") == {}
    # Counted in the stores (Redis, Postgres) where it happened, exported by the long-running
    # api: one lease expired, one stale lock reaped, whoever's process did it.
    assert mix.delta("api", "opsc_lease_expirations_total") == 1
    assert mix.delta("api", "opsc_mutex_reaped_total") == 1
    # Exported before anything was counted (an alert's increase() needs the zero).
    assert ("opsc_lease_expirations_total", frozenset()) in mix.before["api"]
    assert ("opsc_mutex_reaped_total", frozenset()) in mix.before["api"]


async def test_promtool_accepts_every_services_metrics(
    mix: Mix, metrics_stack: MetricsStack, tmp_path: Path
) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed: run `make monitoring-tools`"
    for service in SERVICES:
        text = await asyncio.to_thread(metrics_stack.scrape_text, service)
        result = subprocess.run(
            [promtool, "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, f"{service}: {result.stdout}{result.stderr}"


async def test_every_dashboard_panel_returns_data_from_exported_metrics(
    mix: Mix, metrics_stack: MetricsStack, prometheus: Prometheus
) -> None:
    exported = {name for service in SERVICES for (name, _labels) in mix.after[service]} | {"up"}
    recorded = {
        rule["name"]
        for group in prometheus.get("/api/v1/rules")["groups"]
        for rule in group["rules"]
        if rule["type"] == "recording"
    }
    assert "opsc:execution_timeout_rate:ratio_rate5m" in recorded
    for title, expr in dashboard_queries():
        for name in metric_names(expr):
            assert name in exported or name in recorded, f"{title}: {name} is not exported"

        async def answered(expr: str = expr) -> bool:
            return bool(await asyncio.to_thread(prometheus.query, expr))

        await wait_until(answered, within_s=30, what=f"data for panel {title!r}")

    async def timeouts_seen() -> bool:
        rate = await asyncio.to_thread(prometheus.query, "opsc:execution_timeout_rate:ratio_rate5m")
        return bool(rate) and float(rate[0]["value"][1]) > 0

    await wait_until(timeouts_seen, within_s=30, what="a timeout rate above 0", interval_s=0.5)
    # The reaper's work reaches the alerts through the api's scrape.
    for alert in ("OpscLeaseExpirations", "OpscStaleLocksReaped"):

        async def firing(alert: str = alert) -> bool:
            alerts = (await asyncio.to_thread(prometheus.get, "/api/v1/alerts"))["alerts"]
            return any(a["labels"]["alertname"] == alert and a["state"] == "firing" for a in alerts)

        await wait_until(firing, within_s=30, what=f"{alert} firing", interval_s=0.5)
    health = prometheus.query('min by (job) (up{job=~"opsconductor-.+"})')
    assert {r["metric"]["job"]: r["value"][1] for r in health} == {
        f"opsconductor-{name}": "1" for name in SERVICES
    }


async def test_the_dlq_alert_is_pending_once_more_than_ten_jobs_are_dead_lettered(
    mix: Mix,
    metrics_stack: MetricsStack,
    prometheus: Prometheus,
    e2e_pool: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    def dlq_alerts() -> list[dict[str, Any]]:
        alerts = prometheus.get("/api/v1/alerts")["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "OpscDlqTooLarge"]

    assert await asyncio.to_thread(dlq_alerts) == []  # one entry so far: silent
    tenant = f"t-{secrets.token_hex(4)}"
    await bind_role(e2e_pool, tenant, "alice", "operator", created_by="e2e")
    missing = tmp_path / "missing" / "ledger.jsonl"
    async with ExecutionClient(metrics_stack.stack.address("api"), token("alice", tenant)) as c:
        await asyncio.gather(
            *(
                c.submit(
                    plan(probe_step("dlq", [f"db:{i}"], missing)),
                    tenant_id=tenant,
                    requested_mode="background",
                )
                for i in range(10)
            )
        )

    async def pending() -> list[dict[str, Any]] | None:
        alerts = await asyncio.to_thread(dlq_alerts)
        return alerts or None

    alerts = await wait_until(pending, within_s=90, what="the DLQ alert", interval_s=0.5)
    assert [(a["state"], a["labels"]["severity"]) for a in alerts] == [("pending", "page")]
    assert float(alerts[0]["value"]) == 11
    assert alerts[0]["annotations"]["runbook_url"].endswith("/docs/runbooks/dlq.md")


# The timeout series the rules and the dashboard use: the processes' counters plus the
# reaper's stored ones, exported alike by every api replica (and the reaper loop): once.
_TIMED_OUT = (
    "sum(opsc_executions_timed_out_total)"
    " + sum(max by (mode, sla_class) (opsc_reaper_executions_timed_out_total))"
)


def _timed_out_of(scrapes: dict[str, Samples]) -> float:
    """``_TIMED_OUT`` computed from the services' scrapes."""
    counted = sum(
        value
        for samples in scrapes.values()
        for (name, _labels), value in samples.items()
        if name == "opsc_executions_timed_out_total"
    )
    stored: dict[frozenset[tuple[str, str]], float] = {}
    for samples in scrapes.values():
        for (name, labels), value in samples.items():
            if name == "opsc_reaper_executions_timed_out_total":
                stored[labels] = max(stored.get(labels, 0), value)
    return counted + sum(stored.values())


async def test_a_reaper_pass_of_its_own_process_moves_the_timeout_series_by_exactly_one(
    mix: Mix, metrics_stack: MetricsStack, prometheus: Prometheus, e2e_pool: asyncpg.Pool
) -> None:
    """The reaper as Kubernetes runs it: a ``--once`` process, gone before any scrape, ends an
    execution whose worker died past its deadline. Counted by its ending statement in
    Postgres, exported by the api: the scraped timeout series moves by exactly 1 (not 0: the
    process is gone; not 2: the reaper loop of this stack exports the same stored value)."""
    tenant = f"t-{secrets.token_hex(4)}"
    record = await in_status(e2e_pool, ExecutionStatus.RUNNING, tenant=tenant)
    # Its worker is gone; the stack's reaper loop (30 s grace) leaves it to the pass below.
    await e2e_pool.execute(
        "UPDATE executions SET deadline_at = clock_timestamp() - interval '2 seconds'"
        " WHERE id = $1",
        record.id,
    )
    labels = _labels(mode=record.execution_mode, sla_class=record.sla_class)
    stored = ("opsc_reaper_executions_timed_out_total", labels)
    in_process = ("opsc_executions_timed_out_total", labels)
    before = {name: metrics_stack.scrape(name) for name in SERVICES}

    async def seen_by_prometheus() -> float | None:
        result = await asyncio.to_thread(prometheus.query, _TIMED_OUT)
        return float(result[0]["value"][1]) if result else None

    async def settled() -> float | None:
        # Prometheus holds what the services export now (the same sum over the scrapes).
        value = await seen_by_prometheus()
        return value if value == _timed_out_of(before) else None

    prometheus_before = await wait_until(settled, within_s=30, what="the timeout series")
    worker_env = metrics_stack.stack.services["worker"].extra_env
    env = service_env(
        metrics_stack.stack.dsn,
        {
            "OPSC_REDIS_URL": worker_env["OPSC_REDIS_URL"],
            "OPSC_QUEUE_PREFIX": worker_env["OPSC_QUEUE_PREFIX"],
            "OPSC_REAPER_DEADLINE_GRACE_S": "0",
        },
    )

    async def one_pass_ended_it() -> bool:
        # A pass the loop's pass overlaps is skipped (advisory lock): run another.
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "opsconductor.worker.reaper", "--once"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        status = await e2e_pool.fetchval("SELECT status FROM executions WHERE id = $1", record.id)
        return str(status) == "failed"

    await wait_until(one_pass_ended_it, within_s=60, what="a --once pass ending it")
    ended = await e2e_pool.fetchrow(
        "SELECT timed_out, error_class FROM executions WHERE id = $1", record.id
    )
    assert (ended["timed_out"], ended["error_class"]) == (True, "EXECUTION_TIMEOUT")

    async def exported() -> bool:
        return metrics_stack.scrape("api").get(stored, 0) > before["api"].get(stored, 0)

    await wait_until(exported, within_s=20, what="the api exporting it", interval_s=0.2)

    async def moved() -> float | None:
        value = await seen_by_prometheus()
        return value if value is not None and value > prometheus_before else None

    prometheus_after = await wait_until(moved, within_s=30, what="Prometheus scraping it")
    after = {name: metrics_stack.scrape(name) for name in SERVICES}
    assert after["api"].get(stored, 0) - before["api"].get(stored, 0) == 1
    assert _timed_out_of(after) == _timed_out_of(before) + 1
    # Nobody counted it in-process: not the worker, not the reaper loop, not the api.
    for service in SERVICES:
        assert after[service].get(in_process, 0) == before[service].get(in_process, 0), service
    await asyncio.sleep(2)  # a few more scrapes and rule evaluations: still exactly one more
    assert await seen_by_prometheus() == prometheus_after == prometheus_before + 1

    async def rate_sees_it() -> bool:
        result = await asyncio.to_thread(prometheus.query, "opsc:executions_timed_out:rate5m")
        return bool(result) and float(result[0]["value"][1]) > 0

    await wait_until(rate_sees_it, within_s=30, what="the timeout rate rule", interval_s=0.5)


def _records(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


async def test_every_record_of_a_background_execution_carries_its_request_id_and_fields(
    metrics_stack: MetricsStack, e2e_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """One execution api → queue → worker: every record of it, in the api's and the worker's
    output, carries the submit's request id and every spec §7.2 field; the log file has its
    execution_started with the fields spec §7.2's ``grep | jq`` reads."""
    tenant = f"t-{secrets.token_hex(4)}"
    await bind_role(e2e_pool, tenant, "alice", "operator", created_by="e2e")
    async with ExecutionClient(metrics_stack.stack.address("api"), token("alice", tenant)) as c:
        queued = await c.submit(
            plan(probe_step("one", ["host:corr"], tmp_path / "ledger.jsonl"), sla="fast"),
            tenant_id=tenant,
            requested_mode="background",
        )

        async def finished() -> Any:
            current = await c.get(queued.execution_id, tenant_id=tenant)
            return current if current.is_terminal else None

        done = await wait_until(finished, within_s=30, what="the background execution")
    assert done.status == "succeeded"
    request_id = await e2e_pool.fetchval(
        "SELECT request_id FROM executions WHERE id = $1::uuid", queued.execution_id
    )
    assert request_id

    def of_it(record: dict[str, Any]) -> bool:
        return queued.execution_id in (record.get("exec_id"), record.get("execution_id"))

    async def worker_done() -> bool:
        worker = _records(metrics_stack.stack.services["worker"].log_path)
        return any(r["event"] == "execution_finished" and of_it(r) for r in worker)

    await wait_until(worker_done, within_s=10, what="the worker's execution_finished")
    for service in ("api", "worker"):
        mine = [r for r in _records(metrics_stack.stack.services[service].log_path) if of_it(r)]
        assert len(mine) >= 2, service
        for record in mine:
            missing = [f for f in required_fields(record) if f not in record]
            assert missing == [], (service, record, missing)
            assert record["request_id"] == request_id, (service, record["event"])
            assert record["exec_id"] == queued.execution_id, (service, record["event"])
    worker = [r for r in _records(metrics_stack.stack.services["worker"].log_path) if of_it(r)]
    events = [r["event"] for r in worker]
    assert {"execution_started", "step_finished", "execution_finished"} <= set(events), events
    started = next(r for r in worker if r["event"] == "execution_started")
    assert started["queue_wait_ms"] is not None
    assert started["worker_id"]
    assert started["targets"] == ["host:corr"]
    # The file every service appends to: grep execution_started logs/app.log | jq '.request_id'
    app_log = metrics_stack.stack.log_dir / "logs" / "app.log"
    grepped = [
        r
        for r in _records(app_log)
        if r["event"] == "execution_started" and r["exec_id"] == queued.execution_id
    ]
    assert [(r["request_id"], r["plan_hash"], r["actor_id"], r["tenant_id"]) for r in grepped] == [
        (request_id, done.plan_hash, "alice", tenant)
    ]


async def test_one_background_execution_is_one_trace_across_the_queue(
    metrics_stack: MetricsStack, e2e_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """api → queue → worker: one trace with one root (the api's SubmitExecution), holding the
    worker's execution, its queue wait, its lock wait and a span per step."""
    tenant = f"t-{secrets.token_hex(4)}"
    await bind_role(e2e_pool, tenant, "alice", "operator", created_by="e2e")
    ledger = tmp_path / "ledger.jsonl"
    async with ExecutionClient(metrics_stack.stack.address("api"), token("alice", tenant)) as c:
        queued = await c.submit(
            plan(
                probe_step("first", ["host:t1"], ledger), probe_step("second", ["host:t2"], ledger)
            ),
            tenant_id=tenant,
            requested_mode="background",
        )

        async def finished() -> Any:
            current = await c.get(queued.execution_id, tenant_id=tenant)
            return current if current.is_terminal else None

        assert (await wait_until(finished, within_s=30, what="the execution")).status == "succeeded"
    traceparent = await e2e_pool.fetchval(
        "SELECT trace_context FROM executions WHERE id = $1::uuid", queued.execution_id
    )
    assert traceparent
    trace_id = "0x" + traceparent.split("-")[1]
    spans_file = metrics_stack.stack.log_dir / "spans.jsonl"

    def trace_spans() -> list[dict[str, Any]]:
        return [s for s in _records(spans_file) if s["context"]["trace_id"] == trace_id]

    async def complete() -> list[dict[str, Any]] | None:
        spans = trace_spans()
        names = {s["name"] for s in spans}
        return spans if {"step first", "step second", "execution"} <= names else None

    spans = await wait_until(complete, within_s=20, what="the worker's spans", interval_s=0.2)
    roots = [s for s in spans if s["parent_id"] is None]
    assert [r["name"] for r in roots] == [
        "/opsconductor.execution.v1.ExecutionService/SubmitExecution"
    ]
    services = {s["resource"]["attributes"]["service.name"] for s in spans}
    assert {"opsconductor-api", "opsconductor-worker"} <= services
    names = [s["name"] for s in spans]
    for needed in ("queue_wait", "execution", "lock_wait", "step first", "step second"):
        assert needed in names, names
    by_id = {s["context"]["span_id"]: s for s in spans}
    execution = next(s for s in spans if s["name"] == "execution")
    assert by_id[execution["parent_id"]]["name"] == roots[0]["name"]
    steps = [s for s in spans if s["name"].startswith("step ")]
    assert all(by_id[s["parent_id"]]["name"] == "execution" for s in steps)
    # Each step's action was handed its own span's trace context (the http action sends it as
    # its traceparent header): trace id of the submit, parent id of the step's span.
    step_span_ids = {s["name"]: s["context"]["span_id"] for s in steps}
    for line in read_ledger(ledger):
        _version, line_trace, line_parent, _flags = line["traceparent"].split("-")
        assert "0x" + line_trace == trace_id
        assert "0x" + line_parent == step_span_ids[f"step {line['step_id']}"]


async def test_a_progress_subscriber_hanging_up_mid_stream_is_released(
    metrics_stack: MetricsStack, e2e_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """A gRPC subscriber of a running execution (tracing on: the instrumented server iterates
    the stream) reads its first event and hangs up: the progress service releases it (the
    subscribers gauge back to what it was) and logs the call CANCELLED."""
    tenant = f"t-{secrets.token_hex(4)}"
    await bind_role(e2e_pool, tenant, "alice", "operator", created_by="e2e")
    gauge = ("opsc_progress_subscribers", _labels(transport="grpc"))
    name = f"hold-{secrets.token_hex(4)}"
    async with ExecutionClient(metrics_stack.stack.address("api"), token("alice", tenant)) as c:
        running = asyncio.create_task(
            c.submit(
                plan(probe_step("hold", ["host:hang"], tmp_path / "l.jsonl", hold_s=30)),
                tenant_id=tenant,
            )
        )

        async def started() -> str | None:
            found = await e2e_pool.fetchval(
                "SELECT id::text FROM executions WHERE tenant_id = $1 AND status = 'running'",
                tenant,
            )
            return str(found) if found else None

        execution_id = await wait_until(started, within_s=20, what=f"{name} running")
        idle = metrics_stack.scrape("progress")[gauge]
        progress = metrics_stack.stack.address("progress")
        async with ExecutionClient(progress, token("alice", tenant)) as follower:
            async for _event in follower.stream_events(execution_id, tenant_id=tenant):
                assert metrics_stack.scrape("progress")[gauge] == idle + 1
                break

        async def released() -> bool:
            return metrics_stack.scrape("progress")[gauge] == idle

        await wait_until(released, within_s=10, what="the subscriber released")
        await c.cancel(execution_id, tenant_id=tenant)
        await running

    async def logged() -> list[dict[str, Any]] | None:
        log = _records(metrics_stack.stack.services["progress"].log_path)
        streams = [
            r
            for r in log
            if r["event"] == "rpc_completed" and r["method"].endswith("/StreamEvents")
        ]
        return streams or None

    streams = await wait_until(logged, within_s=10, what="the stream's rpc_completed")
    assert streams[-1]["code"] == "CANCELLED"
