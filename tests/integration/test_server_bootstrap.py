"""The shared gRPC bootstrap, exercised through a real grpc.aio server on an ephemeral port.

Health, reflection, the status mapping done by the interceptor (servicers just raise), the access
log line, metrics, UNIMPLEMENTED for every RPC not built yet, and the serve() lifecycle.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import structlog
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import REGISTRY
from pydantic import SecretStr

from opsconductor.common.errors import FieldViolation, NotFoundError, PlanValidationError
from opsconductor.execution.v1 import (
    execution_service_pb2,
    execution_service_pb2_grpc,
    progress_service_pb2,
    progress_service_pb2_grpc,
    types_pb2,
)
from opsconductor.rpc.server import RpcServer, build_server, serve

EXECUTION_SERVICE = "opsconductor.execution.v1.ExecutionService"
PROGRESS_SERVICE = "opsconductor.execution.v1.ProgressService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class BootSettings:
    """The fields the bootstrap reads (ServiceSettings provides them in the services)."""

    service_name: str = "bootstrap-test"
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 0
    metrics_port: int | None = None
    shutdown_grace_s: float = 2.0
    otel_enabled: bool = False
    otel_exporter: str = "none"
    otel_file: Path | None = None
    port_file: Path | None = None


class ScriptedExecutionServicer(execution_service_pb2_grpc.ExecutionServiceServicer):
    """Raises what a servicer may raise; the interceptor must turn it into a status."""

    async def SubmitExecution(
        self, request: execution_service_pb2.SubmitExecutionRequest, context: Any
    ) -> execution_service_pb2.SubmitExecutionResponse:
        raise PlanValidationError(
            violations=[
                FieldViolation("plan.steps", "must contain at least one step"),
                FieldViolation("plan.sla_class", "must be one of fast, medium, long"),
            ]
        )

    async def GetExecution(
        self, request: execution_service_pb2.GetExecutionRequest, context: Any
    ) -> execution_service_pb2.GetExecutionResponse:
        raise RuntimeError("pool exhausted; password=hunter2 in /srv/opsconductor/internal.py")

    async def CancelExecution(
        self, request: execution_service_pb2.CancelExecutionRequest, context: Any
    ) -> execution_service_pb2.CancelExecutionResponse:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down")
        raise AssertionError("abort returned")

    async def ListExecutions(
        self, request: execution_service_pb2.ListExecutionsRequest, context: Any
    ) -> execution_service_pb2.ListExecutionsResponse:
        await asyncio.Event().wait()  # never answers: the caller's deadline cancels the RPC
        raise AssertionError("unreachable")

    async def PreviewPlan(
        self, request: execution_service_pb2.PreviewPlanRequest, context: Any
    ) -> execution_service_pb2.PreviewPlanResponse:
        return execution_service_pb2.PreviewPlanResponse(plan_hash="ab" * 32)


class ScriptedProgressServicer(progress_service_pb2_grpc.ProgressServiceServicer):
    """A server-streaming handler (async generator) that fails after two events."""

    async def StreamEvents(
        self, request: progress_service_pb2.StreamEventsRequest, context: Any
    ) -> AsyncIterator[progress_service_pb2.StreamEventsResponse]:
        for seq in (1, 2):
            event = types_pb2.ExecutionEvent(execution_id=request.execution_id, seq=seq)
            yield progress_service_pb2.StreamEventsResponse(event=event)
        raise NotFoundError("Execution not found.", execution_id=request.execution_id)


def register_scripted(server: grpc.aio.Server) -> list[str]:
    execution_service_pb2_grpc.add_ExecutionServiceServicer_to_server(
        ScriptedExecutionServicer(), server
    )
    progress_service_pb2_grpc.add_ProgressServiceServicer_to_server(
        ScriptedProgressServicer(), server
    )
    return [EXECUTION_SERVICE, PROGRESS_SERVICE]


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[RpcServer, grpc.aio.Channel]]:
    """A started, SERVING bootstrap server with the scripted servicers, and a channel to it."""
    rpc = build_server(BootSettings(), register_scripted)
    await rpc.start()
    await rpc.mark_serving()
    channel = grpc.aio.insecure_channel(rpc.address)
    try:
        yield rpc, channel
    finally:
        await channel.close()
        await rpc.stop(None)


def requests_total(service: str, method: str, code: str) -> float:
    value = REGISTRY.get_sample_value(
        "opsc_grpc_requests_total", {"service": service, "method": method, "code": code}
    )
    return value or 0.0


def completed_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in logs if line["event"] == "rpc_completed"]


async def health_of(channel: grpc.aio.Channel, service: str = "") -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    status: int = response.status
    return status


async def test_health_is_not_serving_until_marked_then_serving_for_each_service() -> None:
    """Health says NOT_SERVING after start, SERVING for "" and every service once marked ready."""
    rpc = build_server(BootSettings(), register_scripted)
    assert rpc.port > 0, "port 0 binds an ephemeral port"
    await rpc.start()
    try:
        async with grpc.aio.insecure_channel(rpc.address) as channel:
            for name in ("", EXECUTION_SERVICE, PROGRESS_SERVICE):
                assert await health_of(channel, name) == NOT_SERVING
            await rpc.mark_serving()
            for name in ("", EXECUTION_SERVICE, PROGRESS_SERVICE):
                assert await health_of(channel, name) == SERVING
    finally:
        await rpc.stop(None)


async def test_a_port_already_in_use_fails_the_build_instead_of_sharing_it(
    scripted: tuple[RpcServer, grpc.aio.Channel],
) -> None:
    """SO_REUSEPORT is off: a second server on a taken port fails loudly, it does not silently
    split the traffic with the first (e.g. two `make run` on one machine)."""
    taken, _ = scripted
    with pytest.raises((RuntimeError, OSError)):
        build_server(replace(BootSettings(), grpc_port=taken.port), register_scripted)


async def test_reflection_lists_the_registered_services(
    scripted: tuple[RpcServer, grpc.aio.Channel],
) -> None:
    """Server reflection (what grpcurl uses) lists our services, health and reflection."""
    _, channel = scripted
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names: set[str] = set()
    async for response in stub.ServerReflectionInfo(iter([request])):
        names |= {s.name for s in response.list_services_response.service}
    assert names == {
        EXECUTION_SERVICE,
        PROGRESS_SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_plan_validation_error_becomes_invalid_argument_with_field_violations(
    scripted: tuple[RpcServer, grpc.aio.Channel],
) -> None:
    """A servicer raising PlanValidationError gives INVALID_ARGUMENT with BadRequest details."""
    _, channel = scripted
    stub = execution_service_pb2_grpc.ExecutionServiceStub(channel)
    before = requests_total(EXECUTION_SERVICE, "SubmitExecution", "INVALID_ARGUMENT")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SubmitExecution(execution_service_pb2.SubmitExecutionRequest(), timeout=5)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    rich = rpc_status.from_call(caught.value)
    assert rich is not None
    info = error_details_pb2.ErrorInfo()
    bad_request = error_details_pb2.BadRequest()
    assert rich.details[0].Unpack(info)
    assert rich.details[1].Unpack(bad_request)
    assert info.reason == "INVALID_PLAN"
    assert info.domain == "execution.opsconductor.io"
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("plan.steps", "must contain at least one step"),
        ("plan.sla_class", "must be one of fast, medium, long"),
    ]
    # The server records the call once its status is out, so the caller can see the status
    # first: wait for the count to move, then check it moved by exactly one.
    deadline = time.monotonic() + 5
    while requests_total(EXECUTION_SERVICE, "SubmitExecution", "INVALID_ARGUMENT") == before:
        assert time.monotonic() < deadline, "the call was never counted"
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # a second count, were there one, lands by now
    assert requests_total(EXECUTION_SERVICE, "SubmitExecution", "INVALID_ARGUMENT") == before + 1


async def test_unexpected_error_becomes_internal_and_leaks_nothing(
    scripted: tuple[RpcServer, grpc.aio.Channel],
) -> None:
    """A RuntimeError gives INTERNAL with a generic message; the traceback goes to the log only."""
    _, channel = scripted
    stub = execution_service_pb2_grpc.ExecutionServiceStub(channel)
    with structlog.testing.capture_logs() as logs, pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetExecution(
            execution_service_pb2.GetExecutionRequest(),
            metadata=(("x-request-id", "rid-internal-1"),),
            timeout=5,
        )
    error = caught.value
    assert error.code() is grpc.StatusCode.INTERNAL
    everything_sent = f"{error.details()} {error.trailing_metadata()} {error.debug_error_string()}"
    for secret in ("hunter2", "pool exhausted", "/srv/opsconductor", "RuntimeError", "Traceback"):
        assert secret not in everything_sent
    assert "rid-internal-1" in (error.details() or "")
    failures = [line for line in logs if line["event"] == "rpc_failed"]
    assert len(failures) == 1
    assert failures[0]["log_level"] == "error"
    assert failures[0]["exc_info"] is True
    assert failures[0]["error_type"] == "RuntimeError"


async def test_one_access_log_line_per_rpc_with_the_callers_request_id(
    scripted: tuple[RpcServer, grpc.aio.Channel],
) -> None:
    """Each RPC emits exactly one rpc_completed line: method, code, duration, request id, peer."""
    _, channel = scripted
    stub = execution_service_pb2_grpc.ExecutionServiceStub(channel)
    with structlog.testing.capture_logs() as logs:
        call = stub.PreviewPlan(
            execution_service_pb2.PreviewPlanRequest(),
            metadata=(("x-request-id", "rid-preview-1"),),
            timeout=5,
        )
        response = await call
        trailers = await call.trailing_metadata()
        await stub.PreviewPlan(execution_service_pb2.PreviewPlanRequest(), timeout=5)
    assert response.plan_hash == "ab" * 32
    assert ("x-request-id", "rid-preview-1") in list(trailers or ())
    lines = completed_lines(logs)
    assert len(lines) == 2
    first, second = lines
    assert first["method"] == f"{EXECUTION_SERVICE}/PreviewPlan"
    assert first["code"] == "OK"
    assert first["request_id"] == "rid-preview-1"
    assert first["log_level"] == "info"
    assert isinstance(first["duration_ms"], float)
    assert first["duration_ms"] >= 0
    assert first["peer"].startswith("ipv4:127.0.0.1:")
    # Without a caller-supplied id, one is generated per request.
    assert len(second["request_id"]) == 32
    assert second["request_id"] != first["request_id"]


async def test_a_malformed_request_id_is_replaced_not_trusted(
    scripted: tuple[RpcServer, grpc.aio.Channel],
) -> None:
    """A caller's x-request-id that is not a short plain token is replaced by a generated one."""
    _, channel = scripted
    stub = execution_service_pb2_grpc.ExecutionServiceStub(channel)
    with structlog.testing.capture_logs() as logs:
        await stub.PreviewPlan(
            execution_service_pb2.PreviewPlanRequest(),
            metadata=(("x-request-id", 'evil" level="fake' + "x" * 300),),
            timeout=5,
        )
    (line,) = completed_lines(logs)
    assert "evil" not in line["request_id"]
    assert len(line["request_id"]) == 32


async def test_streaming_rpc_sends_messages_then_the_mapped_error(
    scripted: tuple[RpcServer, grpc.aio.Channel],
) -> None:
    """A server-streaming handler's messages arrive, then its domain error as NOT_FOUND."""
    _, channel = scripted
    stub = progress_service_pb2_grpc.ProgressServiceStub(channel)
    seen: list[int] = []
    with structlog.testing.capture_logs() as logs:
        call = stub.StreamEvents(
            progress_service_pb2.StreamEventsRequest(execution_id="e-42"), timeout=5
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _collect_seqs(call, seen)
        # The caller can hold the status before the server's interceptor has logged the call.
        await _wait_for(lambda: completed_lines(logs))
    assert seen == [1, 2]
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    rich = rpc_status.from_call(caught.value)
    info = error_details_pb2.ErrorInfo()
    assert rich.details[0].Unpack(info)
    assert info.reason == "NOT_FOUND"
    assert info.metadata["execution_id"] == "e-42"
    (line,) = completed_lines(logs)
    assert line["method"] == f"{PROGRESS_SERVICE}/StreamEvents"
    assert line["code"] == "NOT_FOUND"


async def test_a_servicers_own_abort_passes_through_with_its_code(
    scripted: tuple[RpcServer, grpc.aio.Channel],
) -> None:
    """A servicer may still abort with a status of its choosing; the log records that code."""
    _, channel = scripted
    stub = execution_service_pb2_grpc.ExecutionServiceStub(channel)
    with structlog.testing.capture_logs() as logs, pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CancelExecution(execution_service_pb2.CancelExecutionRequest(), timeout=5)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.details() == "slow down"
    (line,) = completed_lines(logs)
    assert line["code"] == "RESOURCE_EXHAUSTED"
    assert not [line for line in logs if line["event"] == "rpc_failed"]


async def test_an_rpc_cancelled_by_the_callers_deadline_is_logged_as_cancelled(
    scripted: tuple[RpcServer, grpc.aio.Channel],
) -> None:
    """When the caller's deadline passes, the handler is cancelled and logged CANCELLED once."""
    _, channel = scripted
    stub = execution_service_pb2_grpc.ExecutionServiceStub(channel)
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListExecutions(execution_service_pb2.ListExecutionsRequest(), timeout=0.2)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await _wait_for(lambda: completed_lines(logs))
    (line,) = completed_lines(logs)
    assert line["method"] == f"{EXECUTION_SERVICE}/ListExecutions"
    assert line["code"] == "CANCELLED"


async def test_an_unknown_method_is_unimplemented(
    scripted: tuple[RpcServer, grpc.aio.Channel],
) -> None:
    """A method no servicer registered is answered UNIMPLEMENTED by grpc (no wrapper involved)."""
    _, channel = scripted
    call = channel.unary_unary(
        f"/{EXECUTION_SERVICE}/NoSuchMethod",
        request_serializer=lambda message: b"",
        response_deserializer=lambda data: data,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"", timeout=5)
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED


def _service_registrars() -> list[tuple[str, Callable[[grpc.aio.Server], Sequence[str]]]]:
    from opsconductor.api.app import ApiApp
    from opsconductor.api.servicers import register_services as register_api
    from opsconductor.api.settings import ApiSettings
    from opsconductor.approvals.app import ApprovalsApp
    from opsconductor.approvals.servicers import register_services as register_approvals
    from opsconductor.approvals.settings import ApprovalsSettings
    from opsconductor.progress.app import ProgressApp
    from opsconductor.progress.servicers import register_services as register_progress
    from opsconductor.progress.settings import ProgressSettings
    from opsconductor.worker.app import WorkerApp
    from opsconductor.worker.servicers import register_services as register_worker
    from opsconductor.worker.settings import WorkerSettings

    never = SecretStr("postgresql://never-opened.invalid/db")
    key = SecretStr("bootstrap-test-signing-key-0123456789abcdef")
    progress = ProgressApp(ProgressSettings(database_url=never, jwt_hs256_key=key))
    api = ApiApp(ApiSettings(database_url=never, jwt_hs256_key=key))
    worker = WorkerApp(WorkerSettings(database_url=never, jwt_hs256_key=key))
    approvals = ApprovalsApp(ApprovalsSettings(database_url=never, jwt_hs256_key=key))
    return [
        ("api", lambda server: register_api(server, api)),
        ("worker", lambda server: register_worker(server, worker)),
        ("approvals", lambda server: register_approvals(server, approvals)),
        ("progress", lambda server: register_progress(server, progress)),
    ]


REGISTRARS = _service_registrars()

#: RPCs served so far; every other RPC of the contract answers UNIMPLEMENTED.
IMPLEMENTED = {
    "SubmitExecution",
    "GetExecution",
    "ListExecutions",
    "CancelExecution",
    "PreviewPlan",
    "GetFeatureFlags",
    "UpdateFeatureFlags",
    "ListDlqEntries",
    "RequeueDlqEntry",
    "GetQueueStats",
    "SetDrain",
    "VerifyAuditChain",
    "ListFlagChanges",
    "RunImmediate",
    "GetApproval",
    "ListPendingApprovals",
    "Approve",
    "Reject",
    "ApproveStep",
    "StreamEvents",
    "ListEvents",
}


@pytest.mark.parametrize(("service", "register"), REGISTRARS, ids=[name for name, _ in REGISTRARS])
async def test_every_rpc_not_built_yet_answers_unimplemented(
    service: str, register: Callable[[grpc.aio.Server], Sequence[str]]
) -> None:
    """RPCs not served yet answer UNIMPLEMENTED "<Rpc> is not implemented yet"; served ones
    refuse a call without a token (UNAUTHENTICATED) before touching anything."""
    from google.protobuf import symbol_database

    rpc = build_server(BootSettings(), register)
    await rpc.start()
    await rpc.mark_serving()
    pool = symbol_database.Default().pool
    checked: list[str] = []
    try:
        async with grpc.aio.insecure_channel(rpc.address) as channel:
            for service_name in rpc.service_names:
                descriptor = pool.FindServiceByName(service_name)
                for method in descriptor.methods:
                    request_class = symbol_database.Default().GetSymbol(method.input_type.full_name)
                    path = f"/{service_name}/{method.name}"
                    kwargs: dict[str, Any] = {
                        "request_serializer": request_class.SerializeToString,
                        "response_deserializer": lambda data: data,
                    }
                    if method.server_streaming:
                        call = channel.unary_stream(path, **kwargs)(request_class(), timeout=5)
                        with pytest.raises(grpc.aio.AioRpcError) as caught:
                            await _collect_seqs(call, [])
                    else:
                        with pytest.raises(grpc.aio.AioRpcError) as caught:
                            await channel.unary_unary(path, **kwargs)(request_class(), timeout=5)
                    checked.append(method.name)
                    if method.name in IMPLEMENTED:
                        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED, path
                        continue
                    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED, path
                    assert caught.value.details() == f"{method.name} is not implemented yet"
                    info = error_details_pb2.ErrorInfo()
                    assert rpc_status.from_call(caught.value).details[0].Unpack(info)
                    assert (info.reason, info.metadata["rpc"]) == ("UNIMPLEMENTED", method.name)
    finally:
        await rpc.stop(None)
    expected = {
        "api": 13,  # ExecutionService (5) + AdminService (8)
        "worker": 1,
        "approvals": 5,
        "progress": 2,
    }
    assert len(checked) == expected[service]


async def test_serve_runs_startup_before_serving_and_stops_cleanly_on_sigterm(
    tmp_path: Path,
) -> None:
    """serve(): NOT_SERVING while start-up hooks run, SERVING after, port file and metrics
    published; SIGTERM → NOT_SERVING, server stopped, shutdown hooks run, port file removed."""
    port_file = tmp_path / "grpc.port"
    settings = BootSettings(port_file=port_file, metrics_port=0)
    startup_may_finish = asyncio.Event()
    events: list[str] = []

    async def open_resources() -> None:
        events.append("startup_begun")
        await startup_may_finish.wait()
        events.append("startup_done")

    async def close_resources() -> None:
        events.append("shutdown_hook")

    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(
            serve(
                settings,
                register_scripted,
                on_startup=[open_resources],
                on_shutdown=[close_resources],
            )
        )
        port = await _wait_for(lambda: _read_port(port_file))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await _wait_for(lambda: "startup_begun" in events or None)
            assert await health_of(channel) == NOT_SERVING
            startup_may_finish.set()
            await _wait_for_health(channel, SERVING)
            assert events == ["startup_begun", "startup_done"]
            metrics_port = next(
                line["port"] for line in logs if line["event"] == "metrics_server_started"
            )
            metrics = await asyncio.to_thread(_http_get, f"http://127.0.0.1:{metrics_port}/metrics")
            assert "opsc_grpc_requests_total" in metrics
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(task, timeout=10)
    assert events == ["startup_begun", "startup_done", "shutdown_hook"]
    assert not port_file.exists()
    names = [line["event"] for line in logs]
    assert names.index("server_serving") < names.index("server_stopping")
    assert names[-1] == "server_stopped"


async def test_tracing_instrumentation_is_enabled_only_when_configured(tmp_path: Path) -> None:
    """``otel_enabled`` with the ``none`` exporter installs nothing; with an exporter the
    OpenTelemetry aio interceptors are installed, RPCs still work and their spans are exported.

    The positive case runs in a child process: a tracer provider is process-wide and for good.
    """
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorServer

    instrumentor = GrpcAioInstrumentorServer()  # type: ignore[no-untyped-call]
    rpc = build_server(replace(BootSettings(), otel_enabled=True), register_scripted)
    await rpc.stop(None)
    assert not instrumentor.is_instrumented_by_opentelemetry

    spans = tmp_path / "spans.jsonl"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _TRACED_CHILD,
        str(spans),
        cwd=Path(__file__).resolve().parents[2],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(child.communicate(), timeout=60)
    assert child.returncode == 0, output.decode(errors="replace")
    assert output.decode().strip().endswith("instrumented ab"), output.decode(errors="replace")
    names = [json.loads(line)["name"] for line in spans.read_text().splitlines()]
    assert any("PreviewPlan" in name for name in names), names


_TRACED_CHILD = """
import asyncio, sys
from dataclasses import replace
from pathlib import Path

import grpc.aio
from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorServer

from opsconductor.rpc.server import build_server
from opsconductor.execution.v1 import execution_service_pb2, execution_service_pb2_grpc
from tests.integration.test_server_bootstrap import BootSettings, register_scripted


async def main() -> None:
    settings = replace(
        BootSettings(), otel_enabled=True, otel_exporter="file", otel_file=Path(sys.argv[1])
    )
    rpc = build_server(settings, register_scripted)
    instrumented = GrpcAioInstrumentorServer().is_instrumented_by_opentelemetry
    await rpc.start()
    await rpc.mark_serving()
    try:
        async with grpc.aio.insecure_channel(rpc.address) as channel:
            stub = execution_service_pb2_grpc.ExecutionServiceStub(channel)
            response = await stub.PreviewPlan(execution_service_pb2.PreviewPlanRequest(), timeout=5)
    finally:
        await rpc.stop(None)
    print("instrumented" if instrumented else "not instrumented", response.plan_hash[:2])


asyncio.run(main())
"""


async def _collect_seqs(call: Any, into: list[int]) -> None:
    """Drain a server-streaming call, recording each event's seq (raises the call's error)."""
    async for response in call:
        into.append(response.event.seq if hasattr(response, "event") else 0)


def _read_port(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
    return body.decode()


async def _wait_for(probe: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll ``probe`` until it returns something truthy (no fixed sleeps as synchronisation)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = probe()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def _wait_for_health(channel: grpc.aio.Channel, wanted: int, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while await health_of(channel) != wanted:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("health status not reached in time")
        await asyncio.sleep(0.01)


async def test_sigterm_during_startup_cancels_it_and_still_shuts_down(tmp_path: Path) -> None:
    """A stop signal while a start-up hook hangs (database unreachable) cancels the hook, never
    reports SERVING, and still runs the shutdown hooks."""
    port_file = tmp_path / "grpc.port"
    events: list[str] = []

    async def hang() -> None:
        events.append("startup_begun")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            events.append("startup_cancelled")
            raise

    async def close() -> None:
        events.append("shutdown_hook")

    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(
            serve(
                BootSettings(port_file=port_file),
                register_scripted,
                on_startup=[hang],
                on_shutdown=[close],
            )
        )
        await _wait_for(lambda: "startup_begun" in events or None)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, timeout=10)
    assert events == ["startup_begun", "startup_cancelled", "shutdown_hook"]
    names = [line["event"] for line in logs]
    assert "startup_interrupted" in names
    assert "server_serving" not in names


async def test_failing_startup_propagates_and_every_shutdown_hook_runs() -> None:
    """A start-up hook that fails ends serve() with its error; a failing shutdown hook is logged
    and does not keep the next one from running."""
    events: list[str] = []

    async def broken_startup() -> None:
        raise ConnectionRefusedError("database down")

    async def broken_close() -> None:
        events.append("broken_close")
        raise RuntimeError("close failed")

    async def close() -> None:
        events.append("close")

    with structlog.testing.capture_logs() as logs, pytest.raises(ConnectionRefusedError):
        await serve(
            BootSettings(),
            register_scripted,
            on_startup=[broken_startup],
            on_shutdown=[close, broken_close],
        )
    assert events == ["broken_close", "close"], "reverse order, all of them"
    failed = [line for line in logs if line["event"] == "shutdown_hook_failed"]
    assert len(failed) == 1
    assert failed[0]["exc_info"] is True


def test_invalid_settings_name_the_field_never_the_value(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """load_settings exits 2 naming the bad field; a secret-bearing input is never printed."""
    from opsconductor.api.settings import ApiSettings
    from opsconductor.rpc.server import load_settings

    def factory() -> ApiSettings:
        return ApiSettings(
            database_url=SecretStr("postgresql://app:sekret-pw@db/opsc"),
            grpc_port=70000,
            jwt_audience="sekret-pw",
        )

    with pytest.raises(SystemExit) as exited:
        load_settings(factory)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "grpc_port" in err
    assert "70000" not in err
    assert "sekret" not in err
