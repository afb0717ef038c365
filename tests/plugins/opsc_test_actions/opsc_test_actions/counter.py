"""The ``counter`` action: counts every call of its handler, whatever the call asks for.

Unlike ``probe`` it never looks at ``ctx.record_only``: a line is appended to the file named by
its ``file`` param (O_APPEND, one write) as the very first thing ``run`` does, so the count is
the number of times the worker called the handler — zero in record-only mode, where the worker
must short-circuit every handler itself rather than trust each one to check a flag.

Params: ``file`` (required, the count file), ``token`` (optional, usually a secret reference:
its resolution is what a record-only run must not do), ``estimate_ms``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from opsconductor.actions.base import ActionContext, ActionResult
from opsconductor.actions.params import ParamReader
from opsconductor.common.errors import FieldViolation
from opsconductor.common.plan import ActionClass

__all__ = ["CountingAction", "count_calls"]


def count_calls(path: str | Path) -> int:
    """How many times the handler was called with this count file (0 if never)."""
    try:
        return len([line for line in Path(path).read_text().splitlines() if line.strip()])
    except FileNotFoundError:
        return 0


def _parse(params: Mapping[str, Any]) -> tuple[dict[str, Any], ParamReader]:
    reader = ParamReader(params, allowed={"file", "token", "estimate_ms"})
    config = {
        "file": reader.text("file"),
        "token": reader.text("token", secret_ok=True),
        "estimate_ms": reader.integer("estimate_ms", default=5, minimum=0, maximum=86_400_000),
    }
    if config["file"] is None:
        reader.add("file", "is required")
    return config, reader


class CountingAction:
    """Appends one line per call to ``file``; succeeds."""

    name = "counter"
    min_action_class = ActionClass.READ

    def estimate_ms(self, params: Mapping[str, Any], target_count: int) -> int:
        return int(_parse(params)[0]["estimate_ms"])

    def validate(self, params: Mapping[str, Any]) -> list[FieldViolation]:
        return _parse(params)[1].violations

    async def run(self, ctx: ActionContext) -> ActionResult:
        config, reader = _parse(ctx.params)
        line = json.dumps({"execution_id": ctx.execution_id, "step_id": ctx.step_id}) + "\n"
        fd = os.open(config["file"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        reader.raise_if_invalid()
        return ActionResult({"counted": True})
