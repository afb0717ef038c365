"""Plan builders for e2e tests (the spec's create_*_plan helpers)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any


def probe_step(
    step_id: str,
    targets: list[str],
    ledger: Path,
    *,
    action_class: str = "read",
    **params: Any,
) -> dict[str, Any]:
    return {
        "id": step_id,
        "action": "probe",
        "action_class": action_class,
        "targets": [{"ref": t} for t in targets],
        "params": {"ledger": str(ledger), **params},
    }


def plan(
    *steps: dict[str, Any], sla: str = "fast", name: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "name": name or f"plan-{secrets.token_hex(4)}",
        "sla_class": sla,
        "steps": list(steps),
        **extra,
    }


def create_simple_query_plan(ledger: Path) -> dict[str, Any]:
    """A short read-only plan (spec §2.1)."""
    return plan(probe_step("query", ["db:primary"], ledger))
