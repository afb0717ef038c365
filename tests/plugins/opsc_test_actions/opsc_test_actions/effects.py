"""The ``chaos_effect`` action: every call of a step recorded in a Postgres table of its own.

The chaos soak (``tests/chaos``) counts side effects instead of guessing them: each call inserts
a row into ``chaos_side_effects`` when it starts (outcome ``running``) and sets its outcome when
it ends (``ok``, ``failed`` or ``cancelled``). A call cut short by a SIGKILL keeps ``running``;
a call of a paused worker ends when the worker is resumed. Times are the database's
``clock_timestamp()``, the same clock as the product's events, so the soak can tell whether a
call was in flight when its lease was taken over.

Params::

    op           the logical operation (one per plan of the workload, shared by its duplicates)
    hold_s       seconds to hold (cancellable by the execution's cancel event)
    fail         fail every call
    fail_times   fail the first N calls of this step idempotency key (counted in the table)
    token        a secret reference: its SHA-256 is recorded (proof the right value arrived) and
                 the value is echoed in the log and the result, where the masker must catch it
    estimate_ms  the duration estimate to report (default hold_s plus 5 ms)

The table lives in the soak's own database (``OPSC_CHAOS_EFFECTS_DSN``), never in a product
table; :data:`SCHEMA` creates it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from collections.abc import Mapping
from typing import Any

import asyncpg
import structlog
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from opsconductor.actions.base import (
    ActionContext,
    ActionFailedError,
    ActionResult,
    record_only_result,
)
from opsconductor.actions.params import ParamReader
from opsconductor.common.errors import FieldViolation
from opsconductor.common.plan import ActionClass

__all__ = ["SCHEMA", "EffectAction"]

log = structlog.get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS chaos_side_effects (
    id bigserial PRIMARY KEY,
    op_id text NOT NULL,
    idempotency_key text NOT NULL,
    execution_id uuid NOT NULL,
    step_id text NOT NULL,
    tenant_id text NOT NULL,
    worker_id text NOT NULL,
    pid integer NOT NULL,
    token_sha256 text,
    outcome text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    ended_at timestamptz
);
CREATE INDEX IF NOT EXISTS chaos_side_effects_key ON chaos_side_effects (idempotency_key);
"""

_START = """
INSERT INTO chaos_side_effects
    (op_id, idempotency_key, execution_id, step_id, tenant_id, worker_id, pid, token_sha256,
     outcome)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'running')
RETURNING id
"""
_END = "UPDATE chaos_side_effects SET outcome = $2, ended_at = clock_timestamp() WHERE id = $1"
_FAILED_BEFORE = """
SELECT count(*) FROM chaos_side_effects WHERE idempotency_key = $1 AND outcome = 'failed'
"""


class EffectsSettings(BaseSettings):
    """Where the side-effect table is (the soak's database)."""

    model_config = SettingsConfigDict(env_prefix="OPSC_CHAOS_", frozen=True, extra="ignore")

    effects_dsn: SecretStr | None = None


_pool: asyncpg.Pool | None = None
_pool_lock = asyncio.Lock()


async def _effects_pool() -> asyncpg.Pool:
    """One small pool per worker process, opened on first use."""
    global _pool
    async with _pool_lock:
        if _pool is None:
            dsn = EffectsSettings().effects_dsn
            if dsn is None:
                raise ActionFailedError("OPSC_CHAOS_EFFECTS_DSN is not set")
            _pool = await asyncpg.create_pool(dsn.get_secret_value(), min_size=1, max_size=4)
    return _pool


def _parse(params: Mapping[str, Any]) -> tuple[dict[str, Any], ParamReader]:
    reader = ParamReader(
        params, allowed={"op", "hold_s", "fail", "fail_times", "token", "estimate_ms"}
    )
    hold_s = reader.number("hold_s", default=0.0, minimum=0, maximum=600) or 0.0
    config = {
        "op": reader.text("op"),
        "hold_s": hold_s,
        "fail": reader.boolean("fail", default=False),
        "fail_times": reader.integer("fail_times", default=0, minimum=0, maximum=100),
        "token": reader.text("token", secret_ok=True),
        "estimate_ms": reader.integer(
            "estimate_ms", default=round(hold_s * 1000) + 5, minimum=0, maximum=86_400_000
        ),
    }
    if config["op"] is None:
        reader.add("op", "is required")
    return config, reader


class EffectAction:
    """Records each call in ``chaos_side_effects``, holds, fails on request (see module)."""

    name = "chaos_effect"
    min_action_class = ActionClass.READ

    def estimate_ms(self, params: Mapping[str, Any], target_count: int) -> int:
        """``estimate_ms`` if given, else ``hold_s`` plus 5 ms."""
        return int(_parse(params)[0]["estimate_ms"])

    def validate(self, params: Mapping[str, Any]) -> list[FieldViolation]:
        """Types and bounds of the params; ``op`` is required."""
        return _parse(params)[1].violations

    async def run(self, ctx: ActionContext) -> ActionResult:
        """Insert the call's row, hold, then record its outcome (module docstring)."""
        config, reader = _parse(ctx.params)
        reader.raise_if_invalid()
        if ctx.record_only:
            return record_only_result({"action": self.name, "targets": list(ctx.targets)})
        token = config["token"] if isinstance(config["token"], str) else None
        if token is not None:
            log.info("chaos_effect_token", token=token, step_id=ctx.step_id)
        pool = await _effects_pool()
        row_id = await pool.fetchval(
            _START,
            config["op"],
            ctx.idempotency_key,
            ctx.execution_id,
            ctx.step_id,
            ctx.tenant_id,
            f"{socket.gethostname()}:{os.getpid()}",
            os.getpid(),
            None if token is None else hashlib.sha256(token.encode()).hexdigest(),
        )
        outcome = "failed"
        try:
            failed_before = await pool.fetchval(_FAILED_BEFORE, ctx.idempotency_key)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.cancel_event.wait(), timeout=config["hold_s"])
            if ctx.cancel_event.is_set():
                outcome = "cancelled"
            elif not config["fail"] and failed_before >= config["fail_times"]:
                outcome = "ok"
        finally:
            await pool.execute(_END, row_id, outcome)
        output = {"pid": os.getpid(), "effect_id": row_id, "token_echo": token}
        if outcome == "failed":
            raise ActionFailedError("chaos_effect failed as asked", output=output)
        return ActionResult({**output, outcome: True})
