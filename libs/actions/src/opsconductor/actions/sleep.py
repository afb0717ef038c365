"""The ``sleep`` action: waits a number of seconds, cancellably. For drills and timeout tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any

from opsconductor.actions.base import (
    ActionContext,
    ActionResult,
    ActionTimeoutError,
    record_only_result,
)
from opsconductor.actions.params import ParamReader
from opsconductor.common.errors import FieldViolation
from opsconductor.common.plan import ActionClass

__all__ = ["MAX_SLEEP_S", "SleepAction"]

MAX_SLEEP_S = 3600.0


class SleepAction:
    """Params ``{"seconds": 0..3600}``.

    Returns ``{"slept_ms": n}``; when the execution is cancelled meanwhile it returns early with
    ``{"cancelled": true, "slept_ms": n}``; when ``seconds`` exceeds the step's time budget it
    waits the budget out and raises `ActionTimeoutError`.
    """

    name = "sleep"
    min_action_class = ActionClass.READ

    @staticmethod
    def _seconds(params: Mapping[str, Any]) -> tuple[float, ParamReader]:
        reader = ParamReader(params, allowed={"seconds"})
        seconds = reader.number("seconds", minimum=0, maximum=MAX_SLEEP_S, required=True)
        return (seconds or 0.0), reader

    def estimate_ms(self, params: Mapping[str, Any], target_count: int) -> int:
        """The requested duration."""
        return round(self._seconds(params)[0] * 1000)

    def validate(self, params: Mapping[str, Any]) -> list[FieldViolation]:
        """``seconds`` is required, from 0 to 3600."""
        return self._seconds(params)[1].violations

    async def run(self, ctx: ActionContext) -> ActionResult:
        """Wait ``seconds``, or less if cancelled; time out past ``ctx.timeout_s``."""
        seconds, reader = self._seconds(ctx.params)
        reader.raise_if_invalid()
        if ctx.record_only:
            return record_only_result({"action": self.name, "seconds": seconds})
        wait_s = min(seconds, ctx.timeout_s)
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.cancel_event.wait(), timeout=wait_s)
        slept_ms = round((time.monotonic() - started) * 1000)
        if ctx.cancel_event.is_set():
            return ActionResult({"cancelled": True, "slept_ms": slept_ms})
        if seconds > ctx.timeout_s:
            raise ActionTimeoutError(
                f"sleep of {seconds:g} s exceeded the step time limit of {ctx.timeout_s:g} s",
                output={"slept_ms": slept_ms},
                timeout_s=ctx.timeout_s,
                budget_exhausted=True,
            )
        return ActionResult({"slept_ms": slept_ms})
