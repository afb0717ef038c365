"""OpenTelemetry tracing: off by default; one set-up per process; context across the queue.

``OPSC_OTEL_EXPORTER`` chooses where spans go: ``none`` (default: no provider, the API's no-op
tracer, nothing measured), ``otlp`` (OTLP/gRPC to ``OPSC_OTEL_ENDPOINT``, e.g. a collector
``http://otel-collector:4317``), ``console`` (stdout) or ``file`` (one JSON span per line to
``OPSC_OTEL_FILE``: local runs and the end-to-end tests, which read every service's spans).
Tests in one process use :func:`configure_tracing` with an ``InMemorySpanExporter``.

gRPC calls are traced by ``opentelemetry-instrumentation-grpc`` on both sides (the server
instrumentor replaces ``grpc.aio.server``, the client one ``grpc.aio`` channels), which carries
the context in the ``traceparent`` metadata. The queue is crossed in the job payload: the api
puts the submit's W3C ``traceparent`` into the Redis job (and stores it with the execution,
``executions.trace_context``, the fallback for older jobs) and the worker continues that trace
(:func:`context_from_traceparent`): the queue wait, the lock wait and each step are spans of
the submit's trace.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from threading import Lock
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "EXPORTERS",
    "FileSpanExporter",
    "configure_tracing",
    "context_from_traceparent",
    "continue_trace",
    "current_traceparent",
    "tracer",
]

EXPORTERS: Final = frozenset({"none", "otlp", "console", "file"})
_TRACER_NAME: Final = "opsconductor"
_PROPAGATOR: Final = TraceContextTextMapPropagator()
_configured = False


class FileSpanExporter(SpanExporter):
    """Appends each finished span to a file as one line of JSON (``ReadableSpan.to_json``)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")
        self._lock = Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(
            json.dumps(json.loads(s.to_json()), separators=(",", ":")) + "\n" for s in spans
        )
        with self._lock:
            self._file.write(lines)
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()


def configure_tracing(
    service: str,
    *,
    exporter: str = "none",
    endpoint: str | None = None,
    file: Path | None = None,
    span_exporter: SpanExporter | None = None,
) -> bool:
    """Install the tracer provider of this process; False (nothing done) for ``none``.

    ``span_exporter`` (tests) replaces the named exporter and exports each span at once.
    Instruments gRPC servers and clients created afterwards. Idempotent per process.
    """
    global _configured
    kind = exporter.strip().lower()
    if kind not in EXPORTERS:
        raise ValueError(f"unknown OpenTelemetry exporter {exporter!r}; known: {sorted(EXPORTERS)}")
    if span_exporter is None and kind == "none":
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": f"opsconductor-{service}"}))
    if span_exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    elif kind == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    elif kind == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        if file is None:
            raise ValueError("the file exporter needs OPSC_OTEL_FILE")
        provider.add_span_processor(SimpleSpanProcessor(FileSpanExporter(file)))
    if not _configured:
        trace.set_tracer_provider(provider)
        _instrument_grpc()
        _configured = True
    return True


def _instrument_grpc() -> None:
    from opentelemetry.instrumentation.grpc import (
        GrpcAioInstrumentorClient,
        GrpcAioInstrumentorServer,
    )

    for instrumentor in (GrpcAioInstrumentorServer(), GrpcAioInstrumentorClient()):  # type: ignore[no-untyped-call]
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument()


def tracer() -> trace.Tracer:
    """The tracer of OpsConductor's own spans (a no-op one until tracing is configured)."""
    return trace.get_tracer(_TRACER_NAME)


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span, to store with work done later; None if none."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def context_from_traceparent(traceparent: str | None) -> Any:
    """The context to continue a stored trace in (the current one when there is none)."""
    if not traceparent:
        return otel_context.get_current()
    return _PROPAGATOR.extract({"traceparent": traceparent})


@contextmanager
def continue_trace(
    name: str, traceparent: str | None, attributes: Mapping[str, str] | None = None
) -> Iterator[None]:
    """A current span ``name`` in the stored trace ``traceparent`` (the request that asked for
    the work), linked to the current span (the request doing it now, e.g. an approval): the
    approval's release and the run it starts belong to the submit's trace."""
    now = trace.get_current_span().get_span_context()
    with tracer().start_as_current_span(
        name,
        context=context_from_traceparent(traceparent),
        links=[trace.Link(now)] if now.is_valid and traceparent else None,
        attributes=dict(attributes or {}),
    ):
        yield
