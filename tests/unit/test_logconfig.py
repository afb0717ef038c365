"""The real logging chain, end to end: structlog and stdlib records into one masked sink.

Every test configures logging exactly as a service does (``configure_logging``) with a
``StringIO`` stream and asserts on what the sink wrote; the ``sink`` fixture restores the
previous logging and structlog configuration afterwards.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from opsconductor.common.logconfig import (
    _shared_processors,
    bind_request_context,
    clear_request_context,
    configure_logging,
    reset_logging,
)
from opsconductor.common.masking import REDACTED, registered_secrets

SECRET = "P@ssw0rd123"
Sink = Callable[..., io.StringIO]


@pytest.fixture
def sink() -> Iterator[Sink]:
    """``sink(**kwargs)`` configures logging into a fresh StringIO and returns it."""
    root = logging.getLogger()
    saved_level = root.level
    saved_structlog = structlog.get_config()

    def configure(**kwargs: Any) -> io.StringIO:
        stream = io.StringIO()
        kwargs.setdefault("cache_loggers", False)
        configure_logging(stream=stream, **kwargs)
        return stream

    try:
        yield configure
    finally:
        reset_logging()
        structlog.configure(**saved_structlog)
        root.setLevel(saved_level)
        clear_request_context()


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _fail_with(message: str) -> None:
    raise ValueError(message)


# -- the spec's snippets --------------------------------------------------------------------


@pytest.mark.parametrize("json_output", [True, False], ids=["json", "console"])
def test_spec_3_4_stdlib_extra_password_is_masked_at_the_sink(
    sink: Sink, json_output: bool
) -> None:
    """Spec §3.4: a stdlib call with ``extra={"password": ...}`` reaches the sink masked."""
    stream = sink(json=json_output)
    logger = logging.getLogger("opsconductor.auth")

    logger.info("Auth failed", extra={"password": "P@ssw0rd123"})

    log_output = stream.getvalue()
    assert "P@ssw0rd123" not in log_output  # Secret masked
    assert "***REDACTED***" in log_output  # Redaction marker present
    assert "Auth failed" in log_output
    if json_output:
        (line,) = _lines(stream)
        assert line["password"] == REDACTED  # the extra field is in the JSON, masked


@pytest.mark.parametrize("json_output", [True, False], ids=["json", "console"])
def test_spec_3_7_exception_with_password_is_masked_in_message_and_traceback(
    sink: Sink, json_output: bool
) -> None:
    """Spec §3.7: ``logger.exception`` after a ValueError carrying a password."""
    stream = sink(json=json_output)
    logger = logging.getLogger("opsconductor.worker")

    try:
        raise ValueError("Auth failed with password: P@ssw0rd123")
    except ValueError:
        logger.exception("Error occurred")

    log_output = stream.getvalue()
    assert "P@ssw0rd123" not in log_output  # Secret masked in exception
    assert "Traceback (most recent call last)" in log_output
    assert "ValueError: Auth failed with password: ***REDACTED***" in log_output


# -- structlog path -------------------------------------------------------------------------


@pytest.mark.parametrize("json_output", [True, False], ids=["json", "console"])
def test_structlog_event_secrets_nested_in_lists_and_exceptions_are_masked(
    sink: Sink, json_output: bool
) -> None:
    stream = sink(json=json_output)
    log = structlog.get_logger("opsconductor.test")

    try:
        _fail_with(f"connect failed: password={SECRET}")
    except ValueError:
        log.exception(
            "step_failed",
            config={"db": {"auth": {"password": SECRET, "user": "app"}}},
            targets=[{"ref": "db-1", "api_key": "ak-live-0001"}, f"token={SECRET}"],
            error=ValueError(f"secret: {SECRET}"),
        )

    out = stream.getvalue()
    assert SECRET not in out
    assert "ak-live-0001" not in out
    assert "Traceback (most recent call last)" in out
    assert "_fail_with" in out  # the traceback is there, only masked
    if json_output:
        (line,) = _lines(stream)
        assert line["config"] == {"db": {"auth": {"password": REDACTED, "user": "app"}}}
        assert line["targets"] == [{"ref": "db-1", "api_key": REDACTED}, f"token={REDACTED}"]
        assert line["error"] == f"secret: {REDACTED}"
        assert f"ValueError: connect failed: password={REDACTED}" in line["exception"]


@pytest.mark.parametrize("json_output", [True, False], ids=["json", "console"])
def test_registered_literal_in_free_text_is_masked_on_both_paths(
    sink: Sink, json_output: bool
) -> None:
    stream = sink(json=json_output)
    literal = "vault-issued-9f8e7d"
    with registered_secrets([literal]):
        structlog.get_logger("opsconductor.test").warning(
            "upstream_rejected", detail=f"server said: key {literal} revoked"
        )
        logging.getLogger("httpx").warning("HTTP 401 for credential %s", literal)
        try:
            raise RuntimeError(f"could not connect using {literal}")
        except RuntimeError:
            logging.getLogger("asyncpg").exception("connection failed")
    out = stream.getvalue()
    assert literal not in out
    assert out.count(REDACTED) >= 3


@pytest.mark.parametrize("json_output", [True, False], ids=["json", "console"])
def test_idempotency_key_and_plan_hash_stay_visible(sink: Sink, json_output: bool) -> None:
    stream = sink(json=json_output)
    key, plan_hash = "5e" * 32, "c0" * 32
    structlog.get_logger("opsconductor.api").info(
        "execution_submitted", idempotency_key=key, plan_hash=plan_hash, lock_key="t:db-1"
    )
    logging.getLogger("opsconductor.api").info("dedup", extra={"idempotency_key": key})
    out = stream.getvalue()
    assert out.count(key) == 2
    assert plan_hash in out
    assert REDACTED not in out


def test_structlog_positional_arguments_are_formatted(sink: Sink) -> None:
    stream = sink()
    structlog.get_logger("t").info("user %s logged in", "alice")
    assert _lines(stream)[0]["event"] == "user alice logged in"


# -- stdlib / third-party path --------------------------------------------------------------


def test_third_party_logger_record_with_extra_fields_is_masked(sink: Sink) -> None:
    stream = sink()
    logging.getLogger("asyncpg.pool").warning(
        "connection lost to %s",
        "postgresql://app:P@ssw0rd123@db:5432/opsc",
        extra={"dsn_password": SECRET, "attempt": 3, "nested": {"secret": SECRET}},
    )
    (line,) = _lines(stream)
    assert SECRET not in json.dumps(line)
    assert line["event"] == f"connection lost to postgresql://app:{REDACTED}@db:5432/opsc"
    assert line["logger"] == "asyncpg.pool"
    assert line["level"] == "warning"
    assert line["attempt"] == 3
    assert line["nested"] == {"secret": REDACTED}


async def test_real_library_log_record_is_masked(sink: Sink) -> None:
    """asyncio's own exception handler logs through the ``asyncio`` logger with a traceback."""
    stream = sink()
    try:
        raise ConnectionError(f"handshake failed, token={SECRET}")
    except ConnectionError as exc:
        asyncio.get_running_loop().default_exception_handler(
            {"message": f"Unhandled error in callback (password: {SECRET})", "exception": exc}
        )
    (line,) = _lines(stream)
    assert line["logger"] == "asyncio"
    assert SECRET not in json.dumps(line)
    assert "Traceback (most recent call last)" in line["exception"]


def test_stack_info_is_rendered_for_both_paths(sink: Sink) -> None:
    stream = sink()
    logging.getLogger("lib").info("where am I", stack_info=True)
    structlog.get_logger("app").info("and here", stack_info=True)
    foreign, native = _lines(stream)
    assert "test_stack_info_is_rendered_for_both_paths" in foreign["stack"]
    assert "test_stack_info_is_rendered_for_both_paths" in native["stack"]


def test_unformattable_record_does_not_leak_its_arguments(
    sink: Sink, capsys: pytest.CaptureFixture[str]
) -> None:
    """stdlib's handleError would print the raw message and args to stderr; ours withholds."""
    stream = sink()
    (handler,) = [h for h in logging.getLogger().handlers if hasattr(h, "_opsconductor_sink")]
    # Straight to our handler: pytest's own capture handler on the root re-raises such errors.
    bad = logging.LogRecord(
        "lib", logging.INFO, __file__, 1, "two %s %s", ("only-one-argument-sekrit",), None
    )
    handler.handle(bad)
    err = capsys.readouterr().err
    assert "record contents withheld" in err
    assert "only-one-argument-sekrit" not in err
    assert stream.getvalue() == ""


# -- the JSON line --------------------------------------------------------------------------


def test_json_lines_carry_the_production_fields(sink: Sink) -> None:
    stream = sink(service="api")
    tokens = bind_request_context(request_id="req-1", tenant_id="t1")
    structlog.get_logger("opsconductor.api.servicers").info("execution_started", exec_id="e1")
    logging.getLogger("grpc._server").info("from a library")
    structlog.contextvars.reset_contextvars(**tokens)
    structlog.get_logger("opsconductor.api.servicers").info("after_reset")
    native, foreign, after = _lines(stream)
    for line in (native, foreign):
        assert line["request_id"] == "req-1"
        assert line["tenant_id"] == "t1"
        assert line["service"] == "api"
        assert line["timestamp"].endswith("Z")
    assert native["logger"] == "opsconductor.api.servicers"
    assert native["level"] == "info"
    assert native["exec_id"] == "e1"
    assert foreign["logger"] == "grpc._server"
    assert "request_id" not in after


def test_clear_request_context_drops_bound_values(sink: Sink) -> None:
    stream = sink()
    bind_request_context(request_id="req-2")
    clear_request_context()
    structlog.get_logger("t").info("later")
    assert "request_id" not in _lines(stream)[0]


@pytest.mark.parametrize(
    "value",
    [
        'password="a\\"b" end',
        "token=a\\b\\c",
        'Authorization: Bearer "quoted" tail',
        "-----BEGIN EC PRIVATE KEY-----\nabc\n-----END EC PRIVATE KEY-----",
        "{'password': {'nested': 1}}",
    ],
)
def test_masked_json_lines_stay_valid_json(sink: Sink, value: str) -> None:
    """The final text pass over a rendered line must never break the JSON."""
    stream = sink()
    structlog.get_logger("t").info("tricky", detail=value, password=value)
    (line,) = _lines(stream)
    assert line["password"] == REDACTED


# -- configuration behaviour ----------------------------------------------------------------


def test_configuring_twice_replaces_the_sink_instead_of_duplicating_it(sink: Sink) -> None:
    first = sink()
    second = sink()
    structlog.get_logger("t").info("once")
    logging.getLogger("lib").info("once too")
    assert first.getvalue() == ""
    assert len(_lines(second)) == 2
    marked = [h for h in logging.getLogger().handlers if getattr(h, "_opsconductor_sink", False)]
    assert len(marked) == 1


def test_handlers_installed_by_others_are_left_alone(sink: Sink) -> None:
    other = logging.NullHandler()
    root = logging.getLogger()
    root.addHandler(other)
    try:
        sink()
        sink()
        assert other in root.handlers
    finally:
        root.removeHandler(other)


@pytest.mark.parametrize("level", ["WARNING", "warning", logging.WARNING])
def test_level_filters_structlog_and_stdlib(sink: Sink, level: str | int) -> None:
    stream = sink(level=level)
    structlog.get_logger("t").info("dropped")
    logging.getLogger("lib").info("dropped too")
    structlog.get_logger("t").warning("kept")
    logging.getLogger("lib").warning("kept too")
    assert [line["event"] for line in _lines(stream)] == ["kept", "kept too"]


def test_unknown_level_is_rejected(sink: Sink) -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        sink(level="CHATTY")


def test_console_renderer_output_is_plain_text(sink: Sink) -> None:
    stream = sink(json=False)
    structlog.get_logger("t").info("hello", token="abc123")
    out = stream.getvalue()
    assert "hello" in out
    assert f"token={REDACTED}" in out
    assert not out.lstrip().startswith("{")


def test_default_stream_is_stdout_looked_up_at_call_time(
    sink: Sink, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(cache_loggers=False)
    structlog.get_logger("t").info("to stdout", password=SECRET)
    out = capsys.readouterr().out
    assert "to stdout" in out
    assert SECRET not in out
    assert sys.stdout is not None


def test_loggers_are_cached_by_default_for_production(sink: Sink) -> None:
    configure_logging(stream=io.StringIO())
    assert structlog.get_config()["cache_logger_on_first_use"] is True


def test_reset_logging_removes_the_sink(sink: Sink) -> None:
    stream = sink()
    reset_logging()
    logging.getLogger("lib").warning("nobody listens")
    assert stream.getvalue() == ""


class _Keep(logging.Handler):
    """Keeps every record it is handed (to format them again afterwards)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _log_every_shape(log: Any) -> None:
    """One event of each shape the sink renders (called from one line: same stacks)."""
    log.info("plain", count=3, ratio=1.5, flag=True, nothing=None, items=["a", 1])
    log.info("with %s args", "positional", token="x1234")
    log.warning("stacked", stack_info=True)
    try:
        _fail_with(f"password={SECRET}")
    except ValueError:
        log.exception("failed", nested={"password": SECRET, "ok": "visible"})
    log.error("nested", config={"db": {"token": SECRET}}, when=[{"n": 1}], obj=ValueError("x"))


_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z")


@pytest.mark.parametrize("json_output", [True, False], ids=["json", "console"])
def test_structlog_lines_are_those_the_stdlib_route_rendered(sink: Sink, json_output: bool) -> None:
    """structlog events skip stdlib logging (no LogRecord): each line is the one the stdlib
    route (LoggerFactory, wrap_for_formatter, the sink's ProcessorFormatter and text mask)
    rendered, but for its timestamp; other root handlers see no structlog record."""
    stream = sink(json=json_output, service="svc")
    ours = next(h for h in logging.getLogger().handlers if hasattr(h, "_opsconductor_sink"))
    keep = _Keep()
    reference = io.StringIO()
    stdlib_route = logging.StreamHandler(reference)
    stdlib_route.setFormatter(ours.formatter)
    bind_request_context(request_id="req-1", tenant_id="t1")
    for route in ("sink", "stdlib"):
        if route == "stdlib":
            structlog.configure(
                processors=[
                    structlog.stdlib.filter_by_level,
                    *_shared_processors("svc"),
                    structlog.stdlib.PositionalArgumentsFormatter(),
                    structlog.processors.StackInfoRenderer(),
                    structlog.processors.format_exc_info,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
                ],
                logger_factory=structlog.stdlib.LoggerFactory(),
                wrapper_class=structlog.stdlib.BoundLogger,
            )
            logging.getLogger().removeHandler(ours)
            logging.getLogger().addHandler(stdlib_route)
        logging.getLogger().addHandler(keep)
        try:
            _log_every_shape(structlog.get_logger("opsconductor.test"))
        finally:
            logging.getLogger().removeHandler(keep)
    logging.getLogger().removeHandler(stdlib_route)
    assert len(keep.records) == 5  # all from the stdlib route
    got, want = stream.getvalue().splitlines(), reference.getvalue().splitlines()
    assert SECRET not in stream.getvalue()
    if json_output:
        assert len(got) == len(want) == 5
        for mine, theirs in zip(got, want, strict=True):
            assert _TIMESTAMP.search(mine)
            assert _TIMESTAMP.sub("T", mine) == _TIMESTAMP.sub("T", theirs)
            assert json.loads(mine).keys() == json.loads(theirs).keys()
    else:
        assert len(_TIMESTAMP.findall(stream.getvalue())) == 5
        assert _TIMESTAMP.sub("T", stream.getvalue()) == _TIMESTAMP.sub("T", reference.getvalue())


def test_the_sink_renders_foreign_records_as_structlogs_processor_formatter_does(
    sink: Sink,
) -> None:
    """A stdlib record is rendered by ProcessorFormatter itself, the record left intact."""
    sink(service="svc")
    keep = _Keep()
    root = logging.getLogger()
    root.addHandler(keep)
    try:
        logging.getLogger("third.party").warning("foreign %s", "record", extra={"k": "v"})
    finally:
        root.removeHandler(keep)
    ours = next(h for h in root.handlers if getattr(h, "_opsconductor_sink", False))
    inner = ours.formatter._inner  # type: ignore[union-attr]
    (record,) = keep.records
    before = dict(record.__dict__)
    text = json.loads(inner.format(record))
    assert record.__dict__ == before  # left as it was for the other handlers
    assert text["event"] == "foreign record"
    assert (text["k"], text["service"], text["logger"]) == ("v", "svc", "third.party")


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError(f"cannot print password={SECRET}")


def test_an_event_the_sink_cannot_mask_is_withheld_not_raised(
    sink: Sink, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value whose str() raises: the call site goes on, stderr says the line was withheld."""
    stream = sink()
    structlog.get_logger("opsconductor.test").info("odd", value=_Unprintable(), token=SECRET)
    structlog.get_logger("opsconductor.test").info("next")
    err = capsys.readouterr().err
    assert "Logging error in logger 'opsconductor.test' (record contents withheld)" in err
    assert SECRET not in err
    assert [line["event"] for line in _lines(stream)] == ["next"]


class _Unwritable(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(f"disk full while writing {len(text)} characters")


def test_a_line_the_stream_refuses_is_reported_with_its_contents_withheld(
    sink: Sink, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(stream=_Unwritable(), cache_loggers=False)
    structlog.get_logger("opsconductor.test").warning("lost", password=SECRET)
    err = capsys.readouterr().err
    assert "(record contents withheld)" in err
    assert "disk full" in err
    assert SECRET not in err


def test_a_log_file_gets_every_line_as_json_beside_a_console_stream(
    sink: Sink, tmp_path: Any
) -> None:
    path = tmp_path / "logs" / "app.log"
    stream = sink(json=False, file=path, service="svc")
    structlog.get_logger("opsconductor.test").info("native", token=SECRET, n=1)
    logging.getLogger("lib").warning("foreign password=%s", SECRET)
    reset_logging()  # closes the file
    console = stream.getvalue()
    assert "native" in console
    assert "foreign" in console
    assert SECRET not in console
    native, foreign = (json.loads(line) for line in path.read_text().splitlines())
    assert (native["event"], native["token"], native["n"], native["service"]) == (
        "native",
        REDACTED,
        1,
        "svc",
    )
    assert foreign["event"] == f"foreign password={REDACTED}"


def test_loggers_cached_before_a_reconfiguration_write_to_the_new_sink(sink: Sink) -> None:
    first = io.StringIO()
    configure_logging(stream=first)  # loggers cached on first use
    log = structlog.get_logger("opsconductor.test")
    log.info("one")
    second = sink()
    log.info("two")
    reset_logging()
    log.info("three")  # no sink any more: nowhere
    assert [json.loads(line)["event"] for line in first.getvalue().splitlines()] == ["one"]
    assert [line["event"] for line in _lines(second)] == ["two"]


def test_structlog_lines_below_the_level_are_dropped_before_any_processor(sink: Sink) -> None:
    """The bound logger filters (make_filtering_bound_logger): a debug call costs nothing."""
    stream = sink(level="INFO")
    log = structlog.get_logger("opsconductor.test")
    log.debug("hidden", value=_Unprintable())
    log.log(logging.DEBUG, "hidden too")
    log.log(logging.WARNING, "shown %s", "here")
    assert [line["event"] for line in _lines(stream)] == ["shown here"]


def test_a_nameless_logger_is_named_after_its_calling_module(sink: Sink) -> None:
    """As with stdlib's LoggerFactory: ``structlog.get_logger()`` logs as the caller's module."""
    stream = sink()
    structlog.get_logger().info("nameless")
    assert _lines(stream)[0]["logger"] == __name__
