"""The ``noop`` action: does nothing, successfully. For drills, benchmarks and smoke tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opsconductor.actions.base import ActionContext, ActionResult, record_only_result
from opsconductor.common.errors import FieldViolation
from opsconductor.common.plan import ActionClass

__all__ = ["NoopAction"]


class NoopAction:
    """Returns ``{"ok": true}``. Its params are ignored (any JSON object is accepted), so that
    drills can tell otherwise identical plans apart by a param."""

    name = "noop"
    min_action_class = ActionClass.READ

    def estimate_ms(self, params: Mapping[str, Any], target_count: int) -> int:
        """A few milliseconds, whatever the targets."""
        return 5

    def validate(self, params: Mapping[str, Any]) -> list[FieldViolation]:
        """Nothing to check."""
        return []

    async def run(self, ctx: ActionContext) -> ActionResult:
        """Succeed at once."""
        if ctx.record_only:
            return record_only_result({"action": self.name, "targets": list(ctx.targets)})
        return ActionResult({"ok": True})
