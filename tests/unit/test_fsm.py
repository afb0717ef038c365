"""The execution FSM: every pair of statuses is either legal or raises FSMError."""

from __future__ import annotations

import itertools
import re
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest

from opsconductor.common.errors import FSMError
from opsconductor.common.fsm import (
    STEP_TERMINAL,
    TERMINAL,
    TRANSITIONS,
    ExecutionStatus,
    StepStatus,
    allowed_sources,
    allowed_targets,
    can_transition,
    check_transition,
    is_terminal,
)
from opsconductor.execution.v1 import types_pb2

SCHEMA = Path(__file__).resolve().parents[2] / "migrations" / "0001_schema.up.sql"

# Written out independently of the module: a change to the table must change this test too.
EXPECTED: dict[str, set[str]] = {
    "pending": {"awaiting_approval", "queued", "running", "failed", "cancelled"},
    "awaiting_approval": {"queued", "running", "rejected", "cancelled", "failed"},
    "queued": {"running", "cancelled", "failed"},
    "running": {"succeeded", "failed", "cancelled", "queued", "awaiting_approval"},
    "succeeded": set(),
    "failed": set(),
    "cancelled": set(),
    "rejected": set(),
}
ALL_PAIRS = list(itertools.product(ExecutionStatus, ExecutionStatus))
LEGAL = [(a, b) for a, b in ALL_PAIRS if b.value in EXPECTED[a.value]]
ILLEGAL = [(a, b) for a, b in ALL_PAIRS if b.value not in EXPECTED[a.value]]


def _sql_values(pattern: str) -> list[str]:
    match = re.search(pattern, SCHEMA.read_text(), re.S)
    assert match, pattern
    return re.findall(r"'(\w+)'", match.group(1))


def test_status_values_are_the_database_enum() -> None:
    """ExecutionStatus has exactly the values of the execution_status enum, in order."""
    db_values = _sql_values(r"CREATE TYPE execution_status AS ENUM \((.*?)\);")
    assert [status.value for status in ExecutionStatus] == db_values


def test_step_status_values_are_the_database_check() -> None:
    """StepStatus has exactly the values the valid_step_status CHECK allows."""
    db_values = _sql_values(r"CONSTRAINT valid_step_status CHECK \((.*?)\),")
    assert sorted(status.value for status in StepStatus) == sorted(db_values)
    assert {StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.SKIPPED} == STEP_TERMINAL


@pytest.mark.parametrize(
    ("enum", "proto_enum", "prefix"),
    [
        (ExecutionStatus, types_pb2.ExecutionStatus, "EXECUTION_STATUS_"),
        (StepStatus, types_pb2.StepStatus, "STEP_STATUS_"),
    ],
)
def test_status_values_match_the_proto_enum(
    enum: type[StrEnum], proto_enum: Any, prefix: str
) -> None:
    """Every status has a proto enum value of the same name (besides *_UNSPECIFIED)."""
    proto_names = {name.removeprefix(prefix) for name in proto_enum.DESCRIPTOR.values_by_name}
    assert proto_names - {"UNSPECIFIED"} == {status.name for status in enum}


def test_transition_table_is_the_agreed_one() -> None:
    """TRANSITIONS, covering every status, is exactly the table of the brief and DESIGN.md."""
    assert set(TRANSITIONS) == set(ExecutionStatus)
    assert {a.value: {b.value for b in targets} for a, targets in TRANSITIONS.items()} == EXPECTED


@pytest.mark.parametrize(("current", "target"), LEGAL, ids=lambda s: str(s))
def test_legal_transition_passes(current: ExecutionStatus, target: ExecutionStatus) -> None:
    """Every legal pair passes, given as enum members or as their string values."""
    check_transition(current, target)
    check_transition(current.value, target.value)
    assert can_transition(current, target)


@pytest.mark.parametrize(("current", "target"), ILLEGAL, ids=lambda s: str(s))
def test_illegal_transition_raises(current: ExecutionStatus, target: ExecutionStatus) -> None:
    """Every other pair of the full product raises FSMError naming both statuses."""
    expected = f"Illegal state transition {current.value} -> {target.value}"
    with pytest.raises(FSMError, match=f"^{re.escape(expected)}$") as info:
        check_transition(current.value, target)
    assert info.value.details == {"from_status": current.value, "to_status": target.value}
    assert not can_transition(current, target)


def test_spec_pending_to_succeeded_is_illegal() -> None:
    """Spec §4.1: pending -> succeeded must go through running."""
    with pytest.raises(FSMError, match="Illegal state transition"):
        check_transition("pending", "succeeded")


@pytest.mark.parametrize("status", sorted(TERMINAL), ids=str)
def test_terminal_states_have_no_outgoing_transition(status: ExecutionStatus) -> None:
    """Nothing leaves succeeded, failed, cancelled or rejected - not even to itself."""
    assert is_terminal(status)
    assert allowed_targets(status) == frozenset()
    for target in ExecutionStatus:
        with pytest.raises(FSMError):
            check_transition(status, target)


def test_terminal_set_is_the_four_final_statuses() -> None:
    """TERMINAL is exactly succeeded, failed, cancelled, rejected; the others are not terminal."""
    assert {s.value for s in TERMINAL} == {"succeeded", "failed", "cancelled", "rejected"}
    assert [s for s in ExecutionStatus if not is_terminal(s.value)] == [
        ExecutionStatus.PENDING,
        ExecutionStatus.AWAITING_APPROVAL,
        ExecutionStatus.QUEUED,
        ExecutionStatus.RUNNING,
    ]


def test_allowed_sources_inverts_the_table() -> None:
    """allowed_sources(b) is exactly the set of a with a -> b legal (the CAS WHERE clause)."""
    for target in ExecutionStatus:
        expected = {a for a in ExecutionStatus if target.value in EXPECTED[a.value]}
        assert allowed_sources(target.value) == expected
    assert allowed_sources("pending") == frozenset()


def test_every_status_is_reachable_and_can_finish() -> None:
    """From pending every status is reachable, and from every status a terminal one is."""

    def reachable(start: ExecutionStatus) -> set[ExecutionStatus]:
        seen, todo = {start}, [start]
        while todo:
            for nxt in TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert reachable(ExecutionStatus.PENDING) == set(ExecutionStatus)
    for status in ExecutionStatus:
        assert reachable(status) & TERMINAL


def test_table_cannot_be_modified() -> None:
    """The one table is read-only: no code path can add a transition at run time."""
    with pytest.raises(TypeError):
        TRANSITIONS[ExecutionStatus.SUCCEEDED] = frozenset({ExecutionStatus.RUNNING})  # type: ignore[index]
    with pytest.raises(AttributeError):
        TRANSITIONS[ExecutionStatus.PENDING].add(ExecutionStatus.SUCCEEDED)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "call",
    [
        lambda: check_transition("bogus", "running"),
        lambda: check_transition("pending", "done"),
        lambda: is_terminal("timed_out"),
        lambda: allowed_targets(""),
        lambda: allowed_sources("RUNNING"),
        lambda: can_transition("pending", "x" * 1000),
    ],
)
def test_unknown_status_is_an_illegal_transition(call: object) -> None:
    """An unknown status string is refused with FSMError (bounded message), never a KeyError."""
    with pytest.raises(
        FSMError, match="Illegal state transition: unknown execution status"
    ) as info:
        call()  # type: ignore[operator]
    assert len(str(info.value)) < 120
