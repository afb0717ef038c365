"""The spec §7.2 fields: computed from the record, bound once, seen by every record meanwhile."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import structlog
from structlog.testing import capture_logs

from opsconductor.common.logconfig import configure_logging, reset_logging
from opsconductor.lifecycle.execution_logging import (
    SPEC_FIELDS,
    bind_execution,
    bind_execution_fields,
    execution_log_fields,
)

from .test_execution_metrics import _record

PLAN = {
    "plan": {
        "steps": [
            {"action": "shell", "targets": [{"ref": "host:b"}, {"ref": "host:a"}]},
            {"action": "http", "targets": [{"ref": "host:a"}]},
            "not a step",
        ]
    }
}


def test_the_fields_are_the_specs_and_come_from_the_record() -> None:
    record = _record(plan_snapshot=PLAN, request_id="req-1", attempts=3)
    fields = execution_log_fields(record, worker_id="w-1", queue_wait_ms=12)
    assert set(SPEC_FIELDS) <= set(fields)
    assert (fields["action"], fields["targets"]) == ("http,shell", ["host:a", "host:b"])
    assert (fields["request_id"], fields["retries_total"], fields["queue_wait_ms"]) == (
        "req-1",
        2,
        12,
    )
    assert fields["worker_id"] == "w-1"
    assert fields["duration_ms"] == 2000
    assert fields["timing"]["started_at"] == record.started_at.isoformat()  # type: ignore[union-attr]
    bare = execution_log_fields(replace(record, started_at=None, ended_at=None, plan_snapshot={}))
    assert (bare["action"], bare["targets"], bare["duration_ms"]) == ("", [], None)
    assert bare["timing"]["started_at"] is None


def test_every_record_in_the_block_carries_them_and_explicit_values_win() -> None:
    record = _record(request_id=None)
    with (
        capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs,
        structlog.contextvars.bound_contextvars(request_id="rpc-id", queue_wait_ms=7),
    ):
        with bind_execution(record, worker_id="w-2"):
            structlog.get_logger().info("step_finished", step_id="s1")
            structlog.get_logger().info("execution_finished", status="failed")
        structlog.get_logger().info("after")
    step, finished, after = logs
    for line in (step, finished):
        assert set(SPEC_FIELDS) <= set(line), line
    # Known in the context already (the RPC's id, the consumer's queue wait): kept, not blanked.
    assert (step["request_id"], step["queue_wait_ms"], step["worker_id"]) == ("rpc-id", 7, "w-2")
    assert finished["status"] == "failed"
    assert "exec_id" not in after


def test_binding_for_the_rest_of_the_task() -> None:
    structlog.contextvars.clear_contextvars()
    try:
        bind_execution_fields(_record(request_id="req-2"))
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
            structlog.get_logger().info("execution_created")
        assert logs[0]["request_id"] == "req-2"
    finally:
        structlog.contextvars.clear_contextvars()


def test_a_log_file_gets_every_line_as_masked_json(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "app.log"
    stream = io.StringIO()
    try:
        configure_logging(json=False, stream=stream, file=path, cache_loggers=False)
        structlog.get_logger("t").info("execution_started", exec_id="e1", password="hunter2-pw")
        configure_logging(json=False, stream=stream, file=path, cache_loggers=False)  # replaced
        structlog.get_logger("t").info("second")
    finally:
        reset_logging()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["event"] for line in lines] == ["execution_started", "second"]
    assert lines[0]["exec_id"] == "e1"
    assert "hunter2-pw" not in path.read_text()
    assert "execution_started" in stream.getvalue()  # the stream still gets it
