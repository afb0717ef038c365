"""Tracing helpers: off by default, context carried through a stored traceparent, spans to file.

The process-wide set-up (provider and gRPC instrumentation) runs in the e2e services
(tests/e2e/test_observability_metrics.py); here spans go to an in-memory exporter of a
provider of the test's own, so no global state changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from opsconductor.common.tracing import (
    FileSpanExporter,
    configure_tracing,
    context_from_traceparent,
    continue_trace,
    current_traceparent,
    tracer,
)


def _provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_tracing_is_off_by_default_and_refuses_unknown_exporters(tmp_path: Path) -> None:
    assert configure_tracing("api") is False
    assert configure_tracing("api", exporter=" NONE ") is False
    with pytest.raises(ValueError, match="unknown OpenTelemetry exporter 'zipkin'"):
        configure_tracing("api", exporter="zipkin")
    with pytest.raises(ValueError, match="OPSC_OTEL_FILE"):
        configure_tracing("api", exporter="file")
    # The API's no-op tracer: spans cost nothing and carry no context.
    with tracer().start_as_current_span("nothing"):
        assert current_traceparent() is None


def test_a_stored_traceparent_continues_the_trace_after_the_queue() -> None:
    provider, exporter = _provider()
    api = provider.get_tracer("api")
    with api.start_as_current_span("SubmitExecution") as submit:
        stored = current_traceparent()
    assert stored is not None
    assert stored.split("-")[1] == format(submit.get_span_context().trace_id, "032x")
    worker = provider.get_tracer("worker")
    with (
        worker.start_as_current_span("execution", context=context_from_traceparent(stored)),
        worker.start_as_current_span("step a"),
    ):
        pass
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["execution"].parent is not None
    assert spans["execution"].parent.span_id == spans["SubmitExecution"].context.span_id
    assert spans["step a"].parent.span_id == spans["execution"].context.span_id  # type: ignore[union-attr]
    assert len({s.context.trace_id for s in spans.values()}) == 1
    # Nothing stored (tracing was off at submit): the current context, a new root.
    with worker.start_as_current_span("untraced", context=context_from_traceparent(None)):
        pass
    assert exporter.get_finished_spans()[-1].parent is None


def test_the_file_exporter_appends_one_json_span_a_line(tmp_path: Path) -> None:
    path = tmp_path / "spans" / "spans.jsonl"
    exporter = FileSpanExporter(path)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    t = provider.get_tracer("t")
    with t.start_as_current_span("outer"), t.start_as_current_span("inner"):
        pass
    provider.shutdown()
    spans = [json.loads(line) for line in path.read_text().splitlines()]
    assert [s["name"] for s in spans] == ["inner", "outer"]
    assert spans[0]["parent_id"] == spans[1]["context"]["span_id"]


def test_continue_trace_carries_the_stored_trace_even_where_tracing_is_off() -> None:
    """The approvals service releasing an execution without a tracer of its own still hands
    the submit's trace on (the job's traceparent stays the submit's); with nothing stored, the
    current (empty) context goes on."""
    stored = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with continue_trace("approval_released", stored, {"opsc.exec_id": "e1"}):
        assert current_traceparent() == stored
    with continue_trace("approval_released", None):
        assert current_traceparent() is None
