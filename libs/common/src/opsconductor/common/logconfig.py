"""The one logging configuration every service uses: structlog and stdlib into one masked sink.

``configure_logging()`` is called once, first thing in each service's ``__main__``. Afterwards:

- ``structlog.get_logger(__name__)`` loggers run structlog's documented production chain --
  level filter, ``merge_contextvars``, log level, logger name, ISO-8601 UTC timestamp,
  ``StackInfoRenderer``, ``format_exc_info`` -- and hand the event to stdlib ``logging``
  (``ProcessorFormatter.wrap_for_formatter``).
- stdlib ``logging`` records (asyncio, grpc, asyncpg, httpx... and anything calling
  ``logging.getLogger``) propagate to one handler on the root logger. Its formatter is
  ``structlog.stdlib.ProcessorFormatter``: foreign records get the same fields (plus their
  ``extra=`` attributes and their traceback), then every record passes ``format_exc_info``,
  the masker (`opsconductor.common.masking.mask_processor`, last before the renderer) and the
  JSON renderer (``json=False``: the console renderer, masked just the same).
- That formatter is wrapped in a `MaskingFormatter`, which masks the finished line once more
  as free text (a backstop for anything a renderer ``repr()``-ed); the handler withholds
  record contents when a record cannot be formatted (stdlib would print its raw message and
  arguments to stderr).

Masking lives in the sink, so call sites cannot opt out. Calling ``configure_logging`` again
replaces the handler it installed before (no duplicates); handlers installed by others are
left alone.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Mapping, MutableMapping
from contextvars import Token
from pathlib import Path
from typing import IO, Any, Final

import structlog
from structlog.typing import Processor

from opsconductor.common.masking import MaskingFormatter, default_masker, mask_processor

__all__ = [
    "bind_request_context",
    "clear_request_context",
    "configure_logging",
    "reset_logging",
]

_HANDLER_MARK: Final = "_opsconductor_sink"


class _SinkHandler(logging.StreamHandler[IO[str]]):
    """Stream handler for the masked sink, marked so reconfiguration can find it."""

    def handleError(self, record: logging.LogRecord) -> None:
        # logging.Handler.handleError prints the record's raw msg and args to stderr: they may
        # hold secrets. Report the failure with the traceback masked and the contents withheld.
        if not logging.raiseExceptions:  # pragma: no cover - production setting
            return
        details = default_masker().mask_text(traceback.format_exc())
        sys.stderr.write(
            f"--- Logging error in logger {record.name!r} (record contents withheld) ---\n{details}"
        )


class _SinkFormatter(structlog.stdlib.ProcessorFormatter):
    """``ProcessorFormatter`` without its per-record copying, for the sink's configuration.

    For a record made by a structlog logger (``wrap_for_formatter`` attached ``_logger`` and
    ``_name``) ``ProcessorFormatter.format`` copies the record, runs the processors on a copy of
    the event and hands the rendered text to ``logging.Formatter.format``, which returns it as
    it is: the sink's format is ``%(message)s`` and the copy's exception and stack fields are
    cleared first. This runs the same processors on the same copy of the event and returns
    their text directly: the same line, without building a second ``LogRecord`` and formatting
    it (a tenth of a line's cost). The record itself is left untouched, as before, for the
    other sink handlers. Foreign (stdlib) records take ``ProcessorFormatter``'s own path.
    """

    def format(self, record: logging.LogRecord) -> str:
        logger = getattr(record, "_logger", None)
        name = getattr(record, "_name", None)
        if logger is None or not isinstance(name, str) or not isinstance(record.msg, dict):
            return super().format(record)
        if self.logger is not None:
            logger = self.logger
        event: Any = dict(record.msg)
        event["_record"] = record
        event["_from_structlog"] = True
        for processor in self.processors:
            event = processor(logger, name, event)
        if not isinstance(event, str):  # pragma: no cover - the chain ends in a renderer
            raise TypeError(f"the sink's last processor returned a {type(event).__name__}")
        return event


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
    root.setLevel(_level_number(level))
    shared = _shared_processors(service)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            # Render tracebacks now, while the exception is current; masked at the sink.
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        context_class=dict,
        cache_logger_on_first_use=cache_loggers,
    )

    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
    )
    rendering = _SinkFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), _foreign_stack_info],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            mask_processor,
            renderer,
        ],
    )
    handler = _SinkHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(MaskingFormatter(inner=rendering, premask=False))
    setattr(handler, _HANDLER_MARK, True)

    _remove_sink_handlers(root)
    root.addHandler(handler)
    if file is not None:
        root.addHandler(_file_handler(Path(file), shared))


def _file_handler(path: Path, shared: list[Processor]) -> logging.Handler:
    """The same masked sink as the stream's, rendering JSON, appending to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rendering = _SinkFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), _foreign_stack_info],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            mask_processor,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = _FileSinkHandler(path.open("a", encoding="utf-8"))
    handler.setFormatter(MaskingFormatter(inner=rendering, premask=False))
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
