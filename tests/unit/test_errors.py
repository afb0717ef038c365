"""The domain exception tree: one root, a reason per class, docstrings as default messages."""

from __future__ import annotations

import asyncio
import inspect
import pickle
import re

import pytest

from opsconductor.contract import errors
from opsconductor.contract.errors import (
    ExecutionTimeoutError,
    FailedPreconditionError,
    FieldViolation,
    FSMError,
    OpsConductorError,
    PermissionDeniedError,
    PlanValidationError,
)

ERROR_CLASSES: list[type[OpsConductorError]] = [
    obj
    for obj in vars(errors).values()
    if inspect.isclass(obj) and issubclass(obj, OpsConductorError)
]

#: Reasons other packages (status mapping, client, tests of the spec) rely on.
EXPECTED_REASONS = {
    "OpsConductorError": "INTERNAL",
    "PlanValidationError": "INVALID_PLAN",
    "AuthenticationError": "UNAUTHENTICATED",
    "PermissionDeniedError": "PERMISSION_DENIED",
    "NotFoundError": "NOT_FOUND",
    "ResourceBusyError": "RESOURCE_BUSY",
    "FSMError": "ILLEGAL_TRANSITION",
    "ApprovalInvalidatedError": "APPROVAL_INVALIDATED",
    "FeatureDisabledError": "STAGE_E_DISABLED",
    "ApprovalLevelNotEnabledError": "APPROVAL_LEVEL_NOT_ENABLED",
    "ApprovalDecidedError": "APPROVAL_ALREADY_DECIDED",
    "SelfApprovalError": "SELF_APPROVAL_FORBIDDEN",
    "QueueUnavailableError": "QUEUE_UNAVAILABLE",
    "ExecutionTimeoutError": "EXECUTION_TIMEOUT",
    "StaleLeaseError": "LEASE_LOST",
    "StorageError": "STORAGE_ERROR",
    "ConflictError": "CONFLICT",
}

_TREE_LINE = re.compile(
    r"^(?P<indent> *)[*+-] (?P<name>\w+)(?: \((?P<builtin>[\w.]+)\))? \.+ (?P<reason>[A-Z_]+)$"
)


def test_every_exception_class_is_public_and_under_the_root() -> None:
    """__all__ lists every error class, and every one derives from OpsConductorError."""
    assert {cls.__name__ for cls in ERROR_CLASSES} <= set(errors.__all__)
    assert len(ERROR_CLASSES) >= len(EXPECTED_REASONS)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_class_has_error_name_own_reason_and_docstring(cls: type[OpsConductorError]) -> None:
    """Each class ends in Error, declares its own UPPER_SNAKE reason and its own docstring."""
    assert cls.__name__.endswith("Error")
    assert "reason" in vars(cls), "reason must be declared by the class itself"
    assert re.fullmatch(r"[A-Z][A-Z_]*[A-Z]", cls.reason)
    assert vars(cls).get("__doc__"), "the docstring is the default message"


def test_reasons_are_unique_and_the_documented_ones() -> None:
    """No two classes share a reason, and the reasons other packages rely on are as agreed."""
    reasons = [cls.reason for cls in ERROR_CLASSES]
    assert len(reasons) == len(set(reasons))
    assert {name: getattr(errors, name).reason for name in EXPECTED_REASONS} == EXPECTED_REASONS


def test_module_docstring_draws_the_actual_tree() -> None:
    """The hierarchy drawn in the module docstring matches the classes: parents, bases, reasons."""
    drawn: dict[str, tuple[str | None, str | None, str]] = {}
    parents: list[str] = []
    for line in (errors.__doc__ or "").splitlines():
        match = _TREE_LINE.match(line)
        if not match:
            continue
        depth = len(match["indent"]) // 2
        parents = [*parents[:depth], match["name"]]
        parent = parents[depth - 1] if depth else None
        drawn[match["name"]] = (parent, match["builtin"], match["reason"])

    assert set(drawn) == {cls.__name__ for cls in ERROR_CLASSES}
    for cls in ERROR_CLASSES:
        parent, builtin, reason = drawn[cls.__name__]
        assert reason == cls.reason, cls.__name__
        if parent is None:
            assert cls is OpsConductorError
            continue
        assert cls.__bases__[0].__name__ == parent, cls.__name__
        extra = [base for base in cls.__bases__[1:]]
        if builtin is None:
            assert extra == [], cls.__name__
        else:
            assert [f"{b.__module__}.{b.__name__}".removeprefix("builtins.") for b in extra] in (
                [builtin],
                [builtin.removeprefix("asyncio.")],
            ), cls.__name__


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_default_message_is_the_docstrings_first_paragraph(cls: type[OpsConductorError]) -> None:
    """Raised without a message, an error says the first paragraph of its docstring."""
    first_paragraph = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0]
    exc = cls()
    assert exc.message == " ".join(first_paragraph.split())
    assert str(exc) == exc.message
    assert exc.details == {}


def test_message_and_details_are_kept() -> None:
    """An explicit message replaces the default; keyword arguments become .details."""
    exc = errors.ResourceBusyError(
        "target host:a is busy", lock_key="lock:v1:t:host:a:restart", held_by_execution_id="e1"
    )
    assert str(exc) == "target host:a is busy"
    assert exc.details == {"lock_key": "lock:v1:t:host:a:restart", "held_by_execution_id": "e1"}
    assert repr(exc) == "ResourceBusyError('target host:a is busy')"


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_errors_survive_pickling(cls: type[OpsConductorError]) -> None:
    """Errors cross process boundaries (multiprocessing workers) with message and details."""
    exc = cls("custom message", key="value")
    clone = pickle.loads(pickle.dumps(exc))
    assert type(clone) is cls
    assert clone.message == "custom message"
    assert str(clone) == "custom message"
    assert clone.details == {"key": "value"}


def test_plan_validation_error_carries_violations_and_summarises_them() -> None:
    """The message names the first violation and how many more; violations survive pickling."""
    violations = [
        FieldViolation("steps[0].targets", "must have at least 1 item(s)"),
        FieldViolation("name", "is required"),
    ]
    exc = PlanValidationError(violations=violations)
    assert exc.violations == violations
    assert (
        str(exc)
        == "The plan is invalid: steps[0].targets: must have at least 1 item(s) (and 1 more)"
    )
    assert pickle.loads(pickle.dumps(exc)).violations == violations
    assert isinstance(exc, ValueError)
    assert isinstance(exc, errors.InvalidArgumentError)


def test_plan_validation_error_messages_for_one_or_no_violation() -> None:
    """One violation: no "more" suffix; a plan-wide violation has no field prefix; none: default."""
    single = PlanValidationError.for_field("steps[2].action", "unknown action")
    assert str(single) == "The plan is invalid: steps[2].action: unknown action"
    assert single.violations == [FieldViolation("steps[2].action", "unknown action")]
    assert str(PlanValidationError.for_field("", "too big")) == "The plan is invalid: too big"
    assert str(PlanValidationError()) == "The plan is invalid."
    assert str(PlanValidationError("explicit", violations=[FieldViolation("a", "b")])) == "explicit"


def test_field_violation_is_frozen() -> None:
    """A violation cannot be altered after it is made."""
    violation = FieldViolation("name", "is required")
    with pytest.raises(AttributeError):
        violation.field = "other"  # type: ignore[misc]


def test_permission_denied_is_a_builtin_permission_error() -> None:
    """Spec §3.3 snippets catch PermissionError."""
    with pytest.raises(PermissionError):
        raise PermissionDeniedError(actor_id="attacker")
    assert str(PermissionDeniedError()) == "The caller is not allowed to perform this operation."


def test_execution_timeout_is_an_asyncio_timeout_error() -> None:
    """Spec §3.6 snippets catch asyncio.TimeoutError; the message stays the domain one."""
    with pytest.raises(asyncio.TimeoutError) as info:
        raise ExecutionTimeoutError(timeout_policy_id="fast_read", timeout_ms=10_000)
    assert isinstance(info.value, ExecutionTimeoutError)
    assert info.value.details == {"timeout_policy_id": "fast_read", "timeout_ms": 10_000}
    assert str(info.value) == "The execution exceeded its time budget."
    assert isinstance(info.value, TimeoutError)


@pytest.mark.parametrize(
    "name",
    [
        "FSMError",
        "ApprovalInvalidatedError",
        "ApprovalExpiredError",
        "ApprovalDecidedError",
        "SelfApprovalError",
        "ApprovalLevelNotEnabledError",
        "FeatureDisabledError",
        "SecretResolutionError",
    ],
)
def test_state_errors_are_failed_preconditions(name: str) -> None:
    """Errors the caller must fix state for share FailedPreconditionError (FAILED_PRECONDITION)."""
    assert issubclass(getattr(errors, name), FailedPreconditionError)


def test_fsm_error_default_message_matches_the_spec_pattern() -> None:
    """Even without a custom message, FSMError matches spec §4.1's "Illegal state transition"."""
    with pytest.raises(FSMError, match="Illegal state transition"):
        raise FSMError


def test_subclass_without_docstring_is_refused() -> None:
    """A new error class must say something: defining one without a docstring fails at once."""
    with pytest.raises(TypeError, match="needs a docstring"):

        class SilentError(OpsConductorError):
            reason = "SILENT"


def test_subclass_may_inherit_its_reason() -> None:
    """A more specific error may keep its parent's reason (and so its gRPC mapping)."""

    class LockTimeoutError(errors.ResourceBusyError):
        """Timed out waiting for a lock."""

    assert LockTimeoutError.reason == "RESOURCE_BUSY"
    assert str(LockTimeoutError()) == "Timed out waiting for a lock."
