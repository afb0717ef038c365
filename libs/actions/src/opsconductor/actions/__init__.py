"""Actions: what a plan step does, shared by the api (validation, estimates) and the worker (runs).

``base`` defines the handler contract (`ActionContext` in, `ActionResult` out, `ActionFailedError`
and `ActionTimeoutError` on failure); ``registry`` finds handlers (built-ins plus entry-point
plugins); ``noop``, ``sleep``, ``http`` and ``shell`` are the built-ins.
"""

from __future__ import annotations

from opsconductor.actions.base import (
    MAX_RESULT_BYTES,
    ActionContext,
    ActionError,
    ActionFailedError,
    ActionHandler,
    ActionResult,
    ActionTimeoutError,
    record_only_result,
)
from opsconductor.actions.registry import (
    ENTRY_POINT_GROUP,
    ActionPluginError,
    ActionRegistry,
    UnknownActionError,
    builtin_handlers,
    default_registry,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "MAX_RESULT_BYTES",
    "ActionContext",
    "ActionError",
    "ActionFailedError",
    "ActionHandler",
    "ActionPluginError",
    "ActionRegistry",
    "ActionResult",
    "ActionTimeoutError",
    "UnknownActionError",
    "builtin_handlers",
    "default_registry",
    "record_only_result",
]
