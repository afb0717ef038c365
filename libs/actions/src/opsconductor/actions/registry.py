"""The action registry: which actions exist, and what a step using one must satisfy.

Handlers come from the ``opsconductor.actions`` entry-point group, so an operator adds an action
by installing a package that declares one::

    [project.entry-points."opsconductor.actions"]
    restart_service = "acme_actions.restart:RestartServiceAction"

The entry point names a handler class (instantiated without arguments) or a handler instance;
its name must equal the handler's ``name``. The built-ins (``noop``, ``sleep``, ``http``,
``shell``) are always present, whether or not package metadata lists them. A plugin that fails
to load, or claims a name already taken, stops the registry from being built (``strict``, the
default: a worker missing an action the api accepts must not start) or is logged and skipped.

The api uses the registry at submit (`ActionRegistry.validate_plan`, `estimate_step_ms`), the
worker at run (`ActionRegistry.get`): validation never resolves secrets nor does I/O.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import structlog

from opsconductor.actions.base import ActionHandler
from opsconductor.actions.http import HttpAction
from opsconductor.actions.noop import NoopAction
from opsconductor.actions.shell import ShellAction
from opsconductor.actions.sleep import SleepAction
from opsconductor.common.errors import FieldViolation, OpsConductorError, PlanValidationError
from opsconductor.common.plan import IDENTIFIER_PATTERN, ActionClass, Plan, Step
from opsconductor.common.secrets import literal_credential_violations, secret_ref_violations

__all__ = [
    "ENTRY_POINT_GROUP",
    "ActionPluginError",
    "ActionRegistry",
    "UnknownActionError",
    "builtin_handlers",
    "default_registry",
]

log = structlog.get_logger(__name__)

ENTRY_POINT_GROUP = "opsconductor.actions"
_NAME = re.compile(IDENTIFIER_PATTERN)


class UnknownActionError(PlanValidationError):
    """The plan names an action that is not registered."""


class ActionPluginError(OpsConductorError):
    """An action plugin could not be loaded."""

    reason = "ACTION_PLUGIN_INVALID"


def builtin_handlers() -> tuple[ActionHandler, ...]:
    """Fresh instances of the built-in handlers."""
    return (NoopAction(), SleepAction(), HttpAction(), ShellAction())


def _prefixed(prefix: str, field: str) -> str:
    return f"{prefix}.{field}" if prefix and field else prefix or field


def _load(entry_point: EntryPoint) -> ActionHandler:
    loaded = entry_point.load()
    handler = loaded() if isinstance(loaded, type) else loaded
    if not isinstance(handler, ActionHandler):
        raise ActionPluginError(
            f"entry point {entry_point.name!r} ({entry_point.value}) is not an action handler "
            "(needs name, min_action_class, estimate_ms, validate and run)",
            plugin=entry_point.value,
        )
    if handler.name != entry_point.name:
        raise ActionPluginError(
            f"entry point {entry_point.name!r} loads a handler named {handler.name!r}; "
            "the two must match",
            plugin=entry_point.value,
        )
    return handler


class ActionRegistry:
    """Action handlers by name, with the checks a step using them must pass."""

    def __init__(self, handlers: Iterable[ActionHandler] = ()) -> None:
        self._handlers: dict[str, ActionHandler] = {}
        for handler in handlers:
            self.register(handler)

    @classmethod
    def from_entry_points(
        cls,
        *,
        group: str = ENTRY_POINT_GROUP,
        strict: bool = True,
        found: Iterable[EntryPoint] | None = None,
    ) -> ActionRegistry:
        """The built-ins plus every handler declared in ``group`` by installed packages.

        ``found`` replaces the discovered entry points (tests). With ``strict`` a broken or
        conflicting plugin raises `ActionPluginError`; otherwise it is logged and skipped.
        """
        registry = cls(builtin_handlers())
        candidates = entry_points(group=group) if found is None else found
        for entry_point in sorted(candidates, key=lambda ep: (ep.name, ep.value)):
            try:
                handler = _load(entry_point)
                existing = registry._handlers.get(handler.name)
                if existing is not None and type(existing) is type(handler):
                    continue  # a built-in declared as an entry point, or one package seen twice
                registry.register(handler)
            except Exception as exc:  # any plugin failure is reported the same way
                error = (
                    exc
                    if isinstance(exc, ActionPluginError)
                    else ActionPluginError(
                        f"action plugin {entry_point.name!r} ({entry_point.value}) failed to "
                        f"load: {type(exc).__name__}: {exc}",
                        plugin=entry_point.value,
                    )
                )
                if strict:
                    raise error from exc
                log.error("action_plugin_skipped", plugin=entry_point.value, error=error.message)
        log.debug("action_registry_loaded", actions=registry.names())
        return registry

    def register(self, handler: ActionHandler) -> None:
        """Add ``handler``; its name must be a valid action name not taken yet."""
        if not isinstance(handler, ActionHandler):
            raise ActionPluginError(f"{handler!r} is not an action handler")
        name = handler.name
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ActionPluginError(f"invalid action name {name!r}: expected {IDENTIFIER_PATTERN}")
        if not isinstance(handler.min_action_class, ActionClass):
            raise ActionPluginError(f"action {name!r}: min_action_class must be an ActionClass")
        if name in self._handlers:
            raise ActionPluginError(f"action {name!r} is registered twice", action=name)
        self._handlers[name] = handler

    def names(self) -> tuple[str, ...]:
        """Registered action names, sorted."""
        return tuple(sorted(self._handlers))

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    def get(self, name: str, *, field: str = "action") -> ActionHandler:
        """The handler of ``name``; `UnknownActionError` (a plan error on ``field``) if none."""
        handler = self._handlers.get(name)
        if handler is None:
            raise UnknownActionError(violations=[self._unknown(field)])
        return handler

    def _unknown(self, field: str) -> FieldViolation:
        return FieldViolation(field, f"unknown action; registered actions are {list(self.names())}")

    def required_action_class(self, action: str, params: Mapping[str, Any]) -> ActionClass:
        """The lowest action class a step of ``action`` with ``params`` may declare."""
        handler = self.get(action)
        by_params = getattr(handler, "required_action_class", None)
        required = by_params(params) if callable(by_params) else handler.min_action_class
        if not isinstance(required, ActionClass):
            raise ActionPluginError(
                f"action {action!r}: required_action_class must be an ActionClass"
            )
        return max(required, handler.min_action_class)

    def validate_step(self, step: Step, *, path: str = "") -> list[FieldViolation]:
        """Every problem of ``step`` for its action (fields prefixed with ``path``).

        The action must be registered; the declared ``action_class`` at least what the action
        needs with these params; secret references well formed and no credential written in
        literally (``secrets.literal_credential_violations``); the params valid for the
        handler. Resolves no secret and does no I/O.
        """
        handler = self._handlers.get(step.action)
        if handler is None:
            return [self._unknown(_prefixed(path, "action"))]
        violations: list[FieldViolation] = []
        required = self.required_action_class(step.action, step.params)
        if step.action_class < required:
            violations.append(
                FieldViolation(
                    _prefixed(path, "action_class"),
                    f"action {step.action!r} with these params is at least {required.value!r}; "
                    f"declare action_class {required.value!r} or higher",
                )
            )
        violations += secret_ref_violations(step.params, path=_prefixed(path, "params"))
        violations += literal_credential_violations(step.params, path=_prefixed(path, "params"))
        try:
            found = handler.validate(step.params)
        except Exception as exc:  # noqa: BLE001 - a plugin's bug must not become an INTERNAL error
            log.error("action_validate_failed", action=step.action, error_class=type(exc).__name__)
            found = [FieldViolation("params", "could not be validated by the action handler")]
        violations += [FieldViolation(_prefixed(path, v.field), v.description) for v in found]
        return violations

    def validate_plan(self, plan: Plan) -> list[FieldViolation]:
        """`validate_step` for every step, fields prefixed ``steps[i]``."""
        violations: list[FieldViolation] = []
        for index, step in enumerate(plan.steps):
            violations += self.validate_step(step, path=f"steps[{index}]")
        return violations

    def check_plan(self, plan: Plan) -> None:
        """Raise `PlanValidationError` listing every problem `validate_plan` finds."""
        violations = self.validate_plan(plan)
        if violations:
            raise PlanValidationError(violations=violations)

    def estimate_step_ms(self, step: Step) -> int:
        """The handler's duration estimate for ``step`` (never negative)."""
        handler = self.get(step.action)
        return max(0, int(handler.estimate_ms(step.params, len(step.targets))))


@functools.cache
def default_registry() -> ActionRegistry:
    """The process-wide registry: built-ins plus installed plugins, loaded once."""
    return ActionRegistry.from_entry_points()
