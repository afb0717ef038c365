"""ActionResult, the error classes and the text helpers of ``opsconductor.actions.base``."""

from __future__ import annotations

import asyncio
import json
import pickle
import secrets

import pytest

from opsconductor.actions.base import (
    MAX_RESULT_BYTES,
    TRUNCATION_MARKER,
    ActionContext,
    ActionError,
    ActionFailedError,
    ActionResult,
    ActionTimeoutError,
    decode_output,
    fit_text,
    record_only_result,
    result_size_bytes,
)
from opsconductor.actions.params import ParamReader, require_text
from opsconductor.common.errors import OpsConductorError, PlanValidationError
from opsconductor.common.masking import REDACTED, register_secret


def _fits(result: ActionResult) -> bool:
    compact = json.dumps(result.output, separators=(",", ":"), ensure_ascii=False)
    return result_size_bytes(result.output) <= MAX_RESULT_BYTES and len(compact.encode()) <= 10240


def test_small_output_is_kept_as_is() -> None:
    result = ActionResult({"ok": True, "n": 3, "items": [1, "a", None]})
    assert result.output == {"ok": True, "n": 3, "items": [1, "a", None]}
    assert not result.truncated
    assert not result.cancelled
    assert not result.record_only


def test_large_string_is_cut_to_the_limit_with_a_marker() -> None:
    result = ActionResult({"stdout": "é" * 20_000, "exit_code": 0})
    assert result.truncated
    assert _fits(result)
    assert result.output["stdout"].endswith(TRUNCATION_MARKER)
    assert result.output["exit_code"] == 0
    # Most of the budget is still used: truncation cuts only what is needed.
    assert result_size_bytes(result.output) > MAX_RESULT_BYTES - 200


def test_several_large_strings_are_all_cut_until_it_fits() -> None:
    output = {f"s{i}": "x" * 9000 for i in range(5)} | {"nested": {"deep": ["y" * 30_000]}}
    result = ActionResult(output)
    assert result.truncated
    assert _fits(result)


def test_escaped_characters_count_at_their_json_size() -> None:
    """Control characters take 6 bytes each in JSON; the limit applies to the JSON."""
    result = ActionResult({"out": "\x01" * 5000})
    assert _fits(result)
    assert result.truncated


def test_many_small_values_fall_back_to_an_excerpt() -> None:
    result = ActionResult({"numbers": list(range(10_000))})
    assert result.truncated
    assert _fits(result)
    assert set(result.output) == {"truncated", "excerpt"}
    assert result.output["excerpt"].startswith('{"numbers": [0, 1, 2')


def test_output_is_normalised_to_storable_json() -> None:
    """NUL (refused by jsonb), non-finite floats, tuples, sets and objects become plain JSON."""

    class Thing:
        def __str__(self) -> str:
            return "thing"

    result = ActionResult(
        {"nul": "a\x00b", "nan": float("nan"), "t": (1, 2), "s": {3}, "o": Thing(), 5: "five"}
    )
    assert result.output == {
        "nul": "a\ufffdb",
        "nan": "nan",
        "t": [1, 2],
        "s": [3],
        "o": "thing",
        "5": "five",
    }
    json.dumps(result.output, allow_nan=False)


def test_registered_secret_and_denylisted_keys_are_masked() -> None:
    value = "res-" + secrets.token_hex(8)
    register_secret(value)
    result = ActionResult({"body": f"echo {value} done", "password": "hunter22", "ok": True})
    assert value not in json.dumps(result.output)
    assert result.output["body"] == f"echo {REDACTED} done"
    assert result.output["password"] == REDACTED


def test_masking_happens_before_truncation_so_no_secret_fragment_survives() -> None:
    value = "frag-" + secrets.token_hex(12)
    register_secret(value)
    text = "a" * (MAX_RESULT_BYTES - 20) + value + "b" * 100
    result = ActionResult({"out": text})
    rendered = json.dumps(result.output)
    assert value[:8] not in rendered


def test_result_rejects_non_mapping() -> None:
    with pytest.raises(TypeError):
        ActionResult(["not", "a", "dict"])  # type: ignore[arg-type]


def test_to_dict_is_a_copy() -> None:
    result = ActionResult({"a": {"b": 1}})
    copied = result.to_dict()
    copied["a"]["b"] = 2
    assert result.output["a"]["b"] == 1


def test_flags_reflect_the_output() -> None:
    assert ActionResult({"cancelled": True}).cancelled
    assert record_only_result({"x": 1}).record_only
    assert record_only_result({"x": 1}).output == {"record_only": True, "would_run": {"x": 1}}


def test_fit_text_keeps_head_or_tail_and_reports_cuts() -> None:
    assert fit_text("short", 100) == ("short", False)
    head, cut = fit_text("a" * 50 + "z" * 50, 40)
    assert cut
    assert head.startswith("a")
    assert head.endswith(TRUNCATION_MARKER)
    assert len(head.encode()) <= 40
    tail, cut = fit_text("a" * 50 + "z" * 50, 40, keep="tail")
    assert cut
    assert tail.endswith("z")
    assert tail.startswith(TRUNCATION_MARKER)
    assert len(tail.encode()) <= 40


def test_fit_text_cuts_on_character_boundaries() -> None:
    text, cut = fit_text("€" * 100, 50)
    assert cut
    text.encode("utf-8")  # no half characters
    assert len(text.encode()) <= 50


def test_decode_output_replaces_invalid_bytes_and_nul() -> None:
    assert decode_output(b"ok\x00\xff") == "ok\ufffd\ufffd"


def test_context_repr_never_shows_params() -> None:
    value = "ctx-" + secrets.token_hex(8)
    ctx = ActionContext(
        execution_id="e",
        step_id="s",
        idempotency_key="e:s",
        tenant_id="t",
        targets=("a",),
        params={"token": value},
        timeout_s=1.0,
        record_only=False,
        cancel_event=asyncio.Event(),
    )
    assert value not in repr(ctx)


def test_failed_error_masks_message_and_details_and_keeps_output() -> None:
    value = "err-" + secrets.token_hex(8)
    register_secret(value)
    exc = ActionFailedError(f"remote said {value}", output={"body": value}, hint=value)
    assert value not in str(exc)
    assert value not in repr(exc.details)
    assert exc.output is not None
    assert exc.output.output == {"body": REDACTED}
    assert exc.reason == "ACTION_FAILED"
    assert isinstance(exc, ActionError)
    assert isinstance(exc, OpsConductorError)
    assert ActionFailedError().message == "The action failed."
    assert ActionFailedError().output is None


def test_timeout_error_is_a_timeout_error_and_pickles() -> None:
    exc = ActionTimeoutError("took too long", output={"elapsed_ms": 5}, timeout_s=1.0)
    assert isinstance(exc, TimeoutError)
    assert isinstance(exc, asyncio.TimeoutError)
    assert isinstance(exc, ActionFailedError)
    assert exc.reason == "ACTION_TIMEOUT"
    clone = pickle.loads(pickle.dumps(exc))
    assert str(clone) == "took too long"
    assert clone.details == {"timeout_s": 1.0}


def test_param_reader_collects_every_violation() -> None:
    reader = ParamReader(
        {"n": "x", "i": 1.5, "b": 1, "t": 3, "m": [], "l": "no", "extra": 1},
        allowed={"n", "i", "b", "t", "m", "l", "req"},
    )
    assert reader.number("n", minimum=0, maximum=1, default=0.5) == 0.5
    assert reader.number("req", minimum=0, maximum=1, required=True) is None
    assert reader.integer("i", default=2, minimum=0, maximum=5) == 2
    assert reader.boolean("b", default=True) is True
    assert reader.text("t") is None
    assert reader.mapping("m") == {}
    assert reader.string_list("l", max_items=3) is None
    fields = sorted(v.field for v in reader.violations)
    assert fields == sorted(
        [
            "params.extra",
            "params.n",
            "params.req",
            "params.i",
            "params.b",
            "params.t",
            "params.m",
            "params.l",
        ]
    )
    with pytest.raises(PlanValidationError) as info:
        reader.raise_if_invalid()
    assert len(info.value.violations) == 8


def test_param_reader_accepts_good_values_and_defaults() -> None:
    reader = ParamReader(
        {
            "n": 1,
            "i": 4,
            "b": False,
            "t": "x",
            "m": {"a": 1},
            "l": ["a"],
            "s": {"$secret": "env:X"},
        },
        allowed={"n", "i", "b", "t", "m", "l", "s"},
    )
    assert reader.number("n", minimum=0, maximum=1) == 1.0
    assert reader.number("absent", minimum=0, maximum=1, default=0.25) == 0.25
    assert reader.integer("i", default=0, minimum=0, maximum=5) == 4
    assert reader.integer("absent", default=7, minimum=0, maximum=5) == 7
    assert reader.boolean("b", default=True) is False
    assert reader.boolean("absent", default=True) is True
    assert reader.text("t") == "x"
    assert reader.text("s", secret_ok=True) == {"$secret": "env:X"}
    assert reader.mapping("m") == {"a": 1}
    assert reader.mapping("absent") == {}
    assert reader.string_list("l", max_items=3) == ["a"]
    assert reader.string_list("absent", max_items=3) is None
    assert reader.violations == []


def test_param_reader_list_items_and_exclusive_minimum() -> None:
    reader = ParamReader({"l": ["a", 3], "n": 0}, allowed={"l", "n"})
    assert reader.string_list("l", max_items=3) is None
    assert reader.number("n", minimum=0, maximum=1, exclusive_minimum=True) is None
    assert [v.field for v in reader.violations] == ["params.l[1]", "params.n"]
    assert "more than 0" in reader.violations[1].description


def test_require_text_refuses_an_unresolved_reference() -> None:
    assert require_text("v", "params.x") == "v"
    with pytest.raises(PlanValidationError) as info:
        require_text({"$secret": "env:X"}, "params.x")
    assert info.value.violations[0].field == "params.x"


def test_too_many_medium_strings_fall_back_to_an_excerpt() -> None:
    """When cutting the largest strings one by one cannot get there, an excerpt is kept."""
    result = ActionResult({f"k{i}": "x" * 70 for i in range(1000)})
    assert set(result.output) == {"truncated", "excerpt"}
    assert _fits(result)


def test_excerpt_of_heavily_escaped_output_still_fits() -> None:
    """Control characters grow when the JSON text is itself quoted; the excerpt is re-cut."""
    result = ActionResult({"items": ["\x01"] * 5000})
    assert set(result.output) == {"truncated", "excerpt"}
    assert _fits(result)


def test_short_strings_survive_when_a_long_one_is_cut() -> None:
    result = ActionResult({"status": "failed", "detail": "d" * 30_000, "more": "m" * 3000})
    assert result.output["status"] == "failed"
    assert result.output["detail"].endswith(TRUNCATION_MARKER)
    assert _fits(result)


def test_medium_strings_are_shortened_evenly() -> None:
    result = ActionResult({f"k{i}": "x" * 500 for i in range(40)})
    lengths = {len(value) for key, value in result.output.items() if key != "truncated"}
    assert len(lengths) == 1
    assert _fits(result)


def test_fit_text_with_no_room_keeps_only_the_marker() -> None:
    assert fit_text("abc" * 10, 5, keep="tail") == (TRUNCATION_MARKER, True)
