"""The one logging configuration every service uses: structlog and stdlib into one masked sink.

``configure_logging()`` is called once, first thing in each service's ``__main__``. Afterwards:

- ``structlog.get_logger(__name__)`` loggers are ``structlog.make_filtering_bound_logger``
  loggers (a method below the configured level is a bare ``return None``) running structlog's
  documented production chain -- ``merge_contextvars``, log level, logger name, ISO-8601 UTC
  timestamp, ``StackInfoRenderer``, ``format_exc_info`` -- and handing the event straight to the
  sink (`_SinkLogger`): no stdlib ``LogRecord`` is made for them, which cost a quarter of a
  line. The sink masks the event (`opsconductor.common.masking.mask_processor`), renders it
  (JSON, or the console renderer with ``json=False``), masks the finished line once more as
  free text and writes it to each sink handler's stream under that handler's lock, so the
  lines of both paths never interleave.
- stdlib ``logging`` records (asyncio, grpc, asyncpg, httpx... and anything calling
  ``logging.getLogger``) propagate to one handler on the root logger. Its formatter is
  ``structlog.stdlib.ProcessorFormatter``: foreign records get the same fields (plus their
  ``extra=`` attributes and their traceback), then every record passes ``format_exc_info``,
  the masker (last before the renderer) and the same renderer.
- That formatter is wrapped in a `MaskingFormatter`, which masks the finished line once more
  as free text (a backstop for anything a renderer ``repr()``-ed); the handler withholds
  record contents when a record cannot be formatted (stdlib would print its raw message and
  arguments to stderr), and so does the structlog path when an event cannot be rendered.

Masking lives in the sink, so call sites cannot opt out. Calling ``configure_logging`` again
replaces the handler it installed before (no duplicates); handlers installed by others are
left alone (they see stdlib records only: structlog lines go to the sink's handlers alone).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable, Mapping, MutableMapping
from contextvars import Token
from pathlib import Path
from typing import IO, Any, Final

import structlog
from structlog._frames import _find_first_app_frame_and_name
from structlog.typing import Processor

from opsconductor.common.masking import MaskingFormatter, default_masker, mask_processor

__all__ = [
    "bind_request_context",
    "clear_request_context",
    "configure_logging",
    "reset_logging",
]

_HANDLER_MARK: Final = "_opsconductor_sink"


def _report_logging_error(logger_name: str) -> None:
    # logging.Handler.handleError prints the record's raw msg and args to stderr: they may
    # hold secrets. Report the failure with the traceback masked and the contents withheld.
    if not logging.raiseExceptions:  # pragma: no cover - production setting
        return
    details = default_masker().mask_text(traceback.format_exc())
    sys.stderr.write(
        f"--- Logging error in logger {logger_name!r} (record contents withheld) ---\n{details}"
    )


class _SinkHandler(logging.StreamHandler[IO[str]]):
    """Stream handler for the masked sink, marked so reconfiguration can find it.

    ``render`` turns a masked structlog event into its line (renderer, then the final text
    mask): `write_event` is the structlog path's emit, without a ``LogRecord``.
    """

    def __init__(self, stream: IO[str], render: Callable[[MutableMapping[str, Any]], str]) -> None:
        super().__init__(stream)
        self.render = render

    def handleError(self, record: logging.LogRecord) -> None:
        _report_logging_error(record.name)

    def write_event(self, logger_name: str, event: MutableMapping[str, Any]) -> None:
        """Render the masked ``event`` and write its line, as ``emit`` writes a record's."""
        try:
            line = self.render(event)
            with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
                self.stream.write(line + self.terminator)
                self.flush()
        except RecursionError:  # pragma: no cover - as logging.StreamHandler.emit
            raise
        except Exception:  # noqa: BLE001 - logging never raises at a call site (as stdlib's)
            _report_logging_error(logger_name)


#: The handlers of the current sink: read on every write, so that loggers cached before a
#: reconfiguration write to the new sink (as they did through the root logger), none after
#: `reset_logging`.
_sink_handlers: tuple[_SinkHandler, ...] = ()


class _SinkLogger:
    """What the structlog loggers hand their events to: the sink's handlers, masked.

    Masking happens here, once per event, not in the bound logger's chain, so that an event
    the masker cannot handle (a value whose ``str()`` raises) is reported with its contents
    withheld instead of raising at the call site -- as the stdlib handler did.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def _write(self, event: MutableMapping[str, Any]) -> None:
        handlers = _sink_handlers
        if not handlers:
            return
        try:
            event = mask_processor(self, "", event)
        except Exception:  # noqa: BLE001 - logging never raises at a call site (as stdlib's)
            _report_logging_error(self.name)
            return
        last = len(handlers) - 1
        for index, handler in enumerate(handlers):
            # Renderers may consume the dict (the console renderer pops its columns).
            handler.write_event(self.name, event if index == last else dict(event))

    debug = info = warning = warn = error = critical = fatal = exception = msg = _write


def _sink_logger_factory(*args: Any) -> _SinkLogger:
    """structlog ``logger_factory``: a `_SinkLogger` named as stdlib's ``LoggerFactory`` names."""
    if args:
        return _SinkLogger(str(args[0]))
    # The calling module, as structlog.stdlib.LoggerFactory finds it.
    return _SinkLogger(_find_first_app_frame_and_name(["logging", __name__])[1])


def _event_to_sink(
    _logger: object, _method: str, event_dict: MutableMapping[str, Any]
) -> tuple[tuple[MutableMapping[str, Any]], dict[str, Any]]:
    # The last processor: the event itself is the sink logger's one argument.
    return (event_dict,), {}


def _render_line(renderer: Processor) -> Callable[[MutableMapping[str, Any]], str]:
    mask_text = default_masker().mask_text

    def render(event: MutableMapping[str, Any]) -> str:
        text = renderer(None, "", event)
        if not isinstance(text, str):  # pragma: no cover - both renderers return str
            raise TypeError(f"the sink's renderer returned a {type(text).__name__}")
        return mask_text(text)

    return render


def _add_fields(fields: Mapping[str, object]) -> Processor:
    def add_fields(
        _logger: object, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in fields.items():
            event_dict.setdefault(key, value)
        return event_dict

    return add_fields


def _foreign_stack_info(
    _logger: object, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # A stdlib record carries its stack already rendered; StackInfoRenderer would render ours.
    stack = event_dict.pop("stack_info", None)
    if isinstance(stack, str):
        event_dict["stack"] = stack
    return event_dict


def _shared_processors(service: str | None) -> list[Processor]:
    """Fields every line gets, whether it came from structlog or from stdlib logging."""
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if service is not None:
        processors.append(_add_fields({"service": service}))
    return processors


def _level_number(level: str | int) -> int:
    if isinstance(level, int):
        return level
    number = logging.getLevelNamesMapping().get(level.upper())
    if number is None:
        raise ValueError(f"unknown log level {level!r}")
    return number


def configure_logging(
    *,
    level: str | int = "INFO",
    json: bool = True,
    stream: IO[str] | None = None,
    service: str | None = None,
    cache_loggers: bool = True,
    file: str | os.PathLike[str] | None = None,
) -> None:
    """Route structlog and stdlib logging to one masked handler on the root logger.

    Args:
        level: minimum level for the root logger and for structlog loggers.
        json: one JSON object per line (production); ``False`` for the human console format.
        stream: where lines go; ``sys.stdout`` (looked up at call time) when ``None``.
        service: added as the ``service`` field of every line when given.
        file: also append every line to this file (created with its folder), always as JSON
            and masked like the stream's: ``grep execution_started logs/app.log | jq …``.
        cache_loggers: structlog's ``cache_logger_on_first_use``. Leave it on in services;
            tests that reconfigure logging, or use ``structlog.testing.capture_logs``, need it
            off because a cached logger keeps the chain it was first used with.
    """
    root = logging.getLogger()
    level_number = _level_number(level)
    root.setLevel(level_number)
    shared = _shared_processors(service)

    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
    )
    handler = _SinkHandler(stream if stream is not None else sys.stdout, _render_line(renderer))
    handler.setFormatter(_record_formatter(shared, renderer))
    setattr(handler, _HANDLER_MARK, True)
    handlers: list[_SinkHandler] = [handler]
    if file is not None:
        handlers.append(_file_handler(Path(file), shared))

    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            # Render tracebacks now, while the exception is current; masked at the sink.
            structlog.processors.format_exc_info,
            _event_to_sink,
        ],
        logger_factory=_sink_logger_factory,
        wrapper_class=structlog.make_filtering_bound_logger(level_number),
        context_class=dict,
        cache_logger_on_first_use=cache_loggers,
    )

    global _sink_handlers
    _remove_sink_handlers(root)
    for each in handlers:
        root.addHandler(each)
    _sink_handlers = tuple(handlers)


def _record_formatter(shared: list[Processor], renderer: Processor) -> logging.Formatter:
    """The stdlib records' formatter: the shared fields, the masker, ``renderer``, the text mask."""
    rendering = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), _foreign_stack_info],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            mask_processor,
            renderer,
        ],
    )
    return MaskingFormatter(inner=rendering, premask=False)


def _file_handler(path: Path, shared: list[Processor]) -> _SinkHandler:
    """The same masked sink as the stream's, rendering JSON, appending to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    renderer = structlog.processors.JSONRenderer()
    handler = _FileSinkHandler(path.open("a", encoding="utf-8"), _render_line(renderer))
    handler.setFormatter(_record_formatter(shared, renderer))
    setattr(handler, _HANDLER_MARK, True)
    return handler


class _FileSinkHandler(_SinkHandler):
    """The sink handler of a log file: it owns its stream and closes it."""

    def close(self) -> None:
        try:
            self.acquire()
            try:
                self.stream.close()
            finally:
                self.release()
        finally:
            super().close()


def _remove_sink_handlers(root: logging.Logger) -> None:
    global _sink_handlers
    _sink_handlers = ()
    for existing in list(root.handlers):
        if getattr(existing, _HANDLER_MARK, False):
            root.removeHandler(existing)
            existing.close()


def reset_logging() -> None:
    """Remove the sink handler and restore structlog's defaults (tests, embedded use)."""
    _remove_sink_handlers(logging.getLogger())
    structlog.reset_defaults()


def bind_request_context(**values: object) -> Mapping[str, Token[Any]]:
    """Add ``values`` (e.g. ``request_id``, ``tenant_id``) to every line logged in this context.

    Backed by ``structlog.contextvars``, so it follows asyncio tasks. Returns the tokens that
    ``structlog.contextvars.reset_contextvars(**tokens)`` accepts to undo just this binding.
    """
    return structlog.contextvars.bind_contextvars(**values)


def clear_request_context() -> None:
    """Drop every value bound with `bind_request_context` in this context (end of request)."""
    structlog.contextvars.clear_contextvars()
