"""The ``probe`` action: a side effect tests can count, time and check for overlap.

Params (all optional)::

    ledger       path of a JSON-lines file; one line is appended (O_APPEND) per call
    hold_s       seconds to hold the targets (cancellable by the execution's cancel event;
                 deliberately *not* bounded by the step budget: the worker must enforce it)
    fail         fail every call
    fail_times   fail the first N calls of a step (counted per idempotency key in the ledger)
    emit         a string, usually a secret reference: logged (``probe_emitted``) and echoed in
                 the result, both of which the masker must redact
    emit_encoded also log (``probe_echoes``) and return (``echoes``) ``emit`` the ways a remote
                 system echoes it: JSON-escaped, URL-encoded, base64 alone and inside other
                 bytes, reversed, and the message of the UnicodeEncodeError encoding it as
                 ASCII raises (issue 8, finding 4)
    estimate_ms  the duration estimate to report (default hold_s plus 5 ms), so a test can
                 submit a plan estimated short that really runs long

Ledger line: ``idempotency_key, execution_id, step_id, tenant_id, request_id, traceparent`` (the
correlation the worker handed the step), ``pid, targets, start_ns,
end_ns`` (``time.monotonic_ns``, comparable across processes), ``outcome`` (ok, failed,
cancelled, interrupted, overlap), ``secret_seen`` (``emit`` was a registered secret) and
``emit_sha256`` (to check the right value arrived) -- never the emitted value itself.

Overlap detection: while holding, the probe owns ``<ledger>.held.<sha256(target)[:16]>`` for
each target, created with O_EXCL. Finding one already there, held by a live process, means two
holders of one target overlapped: an ``overlap`` line is written and `ProbeOverlapError`
raised. A marker left by a dead or stopped process (a worker killed or paused mid-step, whose
lock legitimately expired) is taken over. Record-only runs touch nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import structlog

from opsconductor.actions.base import (
    ActionContext,
    ActionFailedError,
    ActionResult,
    record_only_result,
)
from opsconductor.actions.params import ParamReader
from opsconductor.common.errors import FieldViolation
from opsconductor.common.masking import mask_text
from opsconductor.common.plan import ActionClass

__all__ = ["ProbeAction", "ProbeOverlapError", "read_ledger"]

log = structlog.get_logger(__name__)


class ProbeOverlapError(ActionFailedError):
    """Two probe calls held the same target at the same time."""

    reason = "PROBE_OVERLAP"


def read_ledger(path: str | Path) -> list[dict[str, Any]]:
    """Every line of a probe ledger (empty if the file does not exist)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _marker_path(ledger: str, target: str) -> Path:
    return Path(f"{ledger}.held.{hashlib.sha256(target.encode()).hexdigest()[:16]}")


def _holder_is_live(marker: Path) -> bool:
    """Whether the process that wrote ``marker`` still runs (not dead, zombie or stopped)."""
    try:
        pid = int(json.loads(marker.read_text())["pid"])
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError, KeyError):
        return False
    state = stat[stat.rfind(")") + 2 :].split()[0]
    return state not in {"Z", "X", "T", "t"}


def _acquire_marker(marker: Path, owner: dict[str, Any]) -> bool:
    """Create ``marker``; False if a live holder has it. A stale marker is taken over."""
    for _ in range(2):
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if _holder_is_live(marker):
                return False
            with contextlib.suppress(FileNotFoundError):
                marker.unlink()
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(owner, handle)
        return True
    return False


def _release_marker(marker: Path) -> None:
    """Remove ``marker`` if this process still owns it (a taker-over may have replaced it)."""
    try:
        if json.loads(marker.read_text()).get("pid") == os.getpid():
            marker.unlink()
    except (OSError, ValueError):
        pass


def _append(ledger: str, entry: dict[str, Any]) -> None:
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    fd = os.open(ledger, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)  # one write with O_APPEND: lines from many processes never interleave
    finally:
        os.close(fd)


def _parse(params: Mapping[str, Any]) -> tuple[dict[str, Any], ParamReader]:
    reader = ParamReader(
        params,
        allowed={"ledger", "hold_s", "fail", "fail_times", "emit", "emit_encoded", "estimate_ms"},
    )
    hold_s = reader.number("hold_s", default=0.0, minimum=0, maximum=3600) or 0.0
    config = {
        "ledger": reader.text("ledger"),
        "hold_s": hold_s,
        "fail": reader.boolean("fail", default=False),
        "fail_times": reader.integer("fail_times", default=0, minimum=0, maximum=1000),
        "emit": reader.text("emit", secret_ok=True),
        "emit_encoded": reader.boolean("emit_encoded", default=False),
        "estimate_ms": reader.integer(
            "estimate_ms", default=round(hold_s * 1000) + 5, minimum=0, maximum=86_400_000
        ),
    }
    return config, reader


def echoes_of(value: str) -> dict[str, str]:
    """``value`` as remote systems echo it back (see ``emit_encoded``)."""
    data = value.encode()
    echoes = {
        "json": json.dumps({"echo": value}),
        "json_in_json": json.dumps(json.dumps({"echo": value})),
        "quote": quote(value, safe=""),
        "quote_plus": quote_plus(value),
        "reversed": value[::-1],
    }
    for k in range(3):
        echoes[f"b64_{k}"] = base64.b64encode(b"x" * k + data + b"!").decode()
        echoes[f"b64url_{k}"] = base64.urlsafe_b64encode(b"y" * k + data).decode().rstrip("=")
    try:
        value.encode("ascii")
    except UnicodeEncodeError as exc:
        echoes["codec_error"] = str(exc)
    return echoes


class ProbeAction:
    """Records its calls in a ledger, holds its targets, fails on request (module docstring)."""

    name = "probe"
    min_action_class = ActionClass.READ

    def estimate_ms(self, params: Mapping[str, Any], target_count: int) -> int:
        """``estimate_ms`` if given, else ``hold_s`` plus 5 ms."""
        return int(_parse(params)[0]["estimate_ms"])

    def validate(self, params: Mapping[str, Any]) -> list[FieldViolation]:
        """Types and bounds of the params."""
        return _parse(params)[1].violations

    async def run(self, ctx: ActionContext) -> ActionResult:
        """Hold the targets for ``hold_s``, append a ledger line, fail if asked."""
        config, reader = _parse(ctx.params)
        reader.raise_if_invalid()
        ledger: str | None = config["ledger"]
        if ctx.record_only:
            return record_only_result(
                {"action": self.name, "ledger": ledger, "targets": list(ctx.targets)}
            )
        emit = config["emit"] if isinstance(config["emit"], str) else None
        if emit is not None:
            log.info("probe_emitted", emit=emit, step_id=ctx.step_id)
        echoes = echoes_of(emit) if emit is not None and config["emit_encoded"] else None
        if echoes is not None:
            log.info("probe_echoes", step_id=ctx.step_id, **echoes)
            log.info("probe_echo_line " + " ".join(echoes.values()))
        entry: dict[str, Any] = {
            "idempotency_key": ctx.idempotency_key,
            "execution_id": ctx.execution_id,
            "step_id": ctx.step_id,
            "tenant_id": ctx.tenant_id,
            "request_id": ctx.request_id,
            "traceparent": ctx.traceparent,
            "pid": os.getpid(),
            "targets": sorted(ctx.targets),
            "start_ns": time.monotonic_ns(),
            "secret_seen": emit is not None and mask_text(emit) != emit,
            "emit_sha256": None if emit is None else hashlib.sha256(emit.encode()).hexdigest(),
            "outcome": "interrupted",
        }
        held: list[Path] = []
        try:
            if ledger is not None:
                previous_failures = sum(
                    1
                    for line in read_ledger(ledger)
                    if line["idempotency_key"] == ctx.idempotency_key
                    and line["outcome"] == "failed"
                )
                owner = {"pid": os.getpid(), "execution_id": ctx.execution_id}
                for target in sorted(ctx.targets):
                    marker = _marker_path(ledger, target)
                    if not _acquire_marker(marker, owner):
                        entry["outcome"] = "overlap"
                        raise ProbeOverlapError(
                            f"target {target!r} is already held by another probe", target=target
                        )
                    held.append(marker)
            else:
                previous_failures = 0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.cancel_event.wait(), timeout=config["hold_s"])
            if ctx.cancel_event.is_set():
                entry["outcome"] = "cancelled"
            elif config["fail"] or previous_failures < config["fail_times"]:
                entry["outcome"] = "failed"
            else:
                entry["outcome"] = "ok"
        finally:
            for marker in held:
                _release_marker(marker)
            entry["end_ns"] = time.monotonic_ns()
            if ledger is not None:
                _append(ledger, entry)
        output = {
            "pid": entry["pid"],
            "held_ms": (entry["end_ns"] - entry["start_ns"]) // 1_000_000,
            "emit": emit,
        }
        if echoes is not None:
            output["echoes"] = echoes
        if entry["outcome"] == "failed":
            raise ActionFailedError("probe failed as asked", output=output)
        if entry["outcome"] == "cancelled":
            return ActionResult({**output, "cancelled": True})
        return ActionResult({**output, "ok": True})
