"""The test-only ``probe`` plugin: found through its entry point, and a trustworthy witness."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import secrets
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from opsc_test_actions import ProbeAction, ProbeOverlapError, read_ledger

from opsconductor.actions import ActionRegistry, default_registry
from opsconductor.actions.base import ActionContext, ActionFailedError
from opsconductor.common.errors import PlanValidationError
from opsconductor.common.masking import REDACTED
from opsconductor.common.secret_catalogue import SecretCatalogue
from opsconductor.common.secrets import EnvSecretProvider, SecretResolver, SecretUse


def _ctx(
    params: Mapping[str, Any],
    *,
    step_id: str = "s1",
    targets: tuple[str, ...] = ("host-1",),
    record_only: bool = False,
) -> ActionContext:
    return ActionContext(
        execution_id="exec-3",
        step_id=step_id,
        idempotency_key=f"exec-3:{step_id}",
        tenant_id="tenant-a",
        targets=targets,
        params=params,
        timeout_s=30.0,
        record_only=record_only,
        cancel_event=asyncio.Event(),
    )


def _markers(ledger: Path) -> list[Path]:
    return sorted(ledger.parent.glob(f"{ledger.name}.held.*"))


async def _wait_for_markers(ledger: Path, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(_markers(ledger)) < count:
        assert time.monotonic() < deadline, "the probe never took its targets"
        await asyncio.sleep(0.005)


def test_probe_is_installed_as_an_entry_point_plugin() -> None:
    assert isinstance(default_registry().get("probe"), ProbeAction)
    assert isinstance(ActionRegistry.from_entry_points().get("probe"), ProbeAction)


async def test_each_call_appends_one_ledger_line(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    result = await ProbeAction().run(_ctx({"ledger": str(ledger)}, targets=("b-host", "a-host")))
    assert result.output["ok"] is True
    (line,) = read_ledger(ledger)
    assert line["idempotency_key"] == "exec-3:s1"
    assert line["execution_id"] == "exec-3"
    assert line["step_id"] == "s1"
    assert line["tenant_id"] == "tenant-a"
    assert line["targets"] == ["a-host", "b-host"]
    assert line["outcome"] == "ok"
    assert line["secret_seen"] is False
    assert line["end_ns"] >= line["start_ns"]
    assert _markers(ledger) == []


async def test_concurrent_calls_each_write_one_whole_line(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    probe = ProbeAction()
    await asyncio.gather(
        *(
            probe.run(
                _ctx({"ledger": str(ledger), "hold_s": 0.01}, step_id=f"s{i}", targets=(f"h{i}",))
            )
            for i in range(40)
        )
    )
    lines = read_ledger(ledger)
    assert sorted(line["step_id"] for line in lines) == sorted(f"s{i}" for i in range(40))


async def test_two_holders_of_one_target_are_caught(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    first = _ctx({"ledger": str(ledger), "hold_s": 30}, step_id="first", targets=("db-1",))
    holding = asyncio.create_task(ProbeAction().run(first))
    await _wait_for_markers(ledger, 1)
    with pytest.raises(ProbeOverlapError) as info:
        await ProbeAction().run(_ctx({"ledger": str(ledger)}, step_id="second", targets=("db-1",)))
    assert info.value.reason == "PROBE_OVERLAP"
    first.cancel_event.set()
    assert (await holding).cancelled
    outcomes = {line["step_id"]: line["outcome"] for line in read_ledger(ledger)}
    assert outcomes == {"second": "overlap", "first": "cancelled"}
    assert _markers(ledger) == []


async def test_overlap_intervals_are_comparable_across_calls(tmp_path: Path) -> None:
    """Sequential holders of one target leave non-overlapping [start_ns, end_ns] intervals."""
    ledger = tmp_path / "ledger.jsonl"
    for step in ("a", "b", "c"):
        await ProbeAction().run(_ctx({"ledger": str(ledger)}, step_id=step, targets=("t",)))
    spans = sorted((line["start_ns"], line["end_ns"]) for line in read_ledger(ledger))
    assert all(prev[1] <= nxt[0] for prev, nxt in itertools.pairwise(spans))


async def test_a_marker_left_by_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    dead = subprocess.Popen(["true"])
    dead.wait()
    marker = Path(f"{ledger}.held.{hashlib.sha256(b'db-1').hexdigest()[:16]}")
    marker.write_text(json.dumps({"pid": dead.pid}))
    result = await ProbeAction().run(_ctx({"ledger": str(ledger)}, targets=("db-1",)))
    assert result.output["ok"] is True
    assert not marker.exists()


async def test_a_marker_replaced_by_a_taker_over_is_left_alone(tmp_path: Path) -> None:
    """A resumed holder must not delete the marker of the probe that took over from it."""
    ledger = tmp_path / "ledger.jsonl"
    ctx = _ctx({"ledger": str(ledger), "hold_s": 30}, targets=("db-1",))
    task = asyncio.create_task(ProbeAction().run(ctx))
    await _wait_for_markers(ledger, 1)
    (marker,) = _markers(ledger)
    marker.write_text(json.dumps({"pid": 1}))
    ctx.cancel_event.set()
    await task
    assert json.loads(marker.read_text()) == {"pid": 1}


async def test_fail_and_fail_times(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    with pytest.raises(ActionFailedError, match="failed as asked"):
        await ProbeAction().run(_ctx({"ledger": str(ledger), "fail": True}, step_id="always"))
    params = {"ledger": str(ledger), "fail_times": 2}
    for _ in range(2):
        with pytest.raises(ActionFailedError):
            await ProbeAction().run(_ctx(params, step_id="flaky"))
    result = await ProbeAction().run(_ctx(params, step_id="flaky"))
    assert result.output["ok"] is True
    flaky = [line["outcome"] for line in read_ledger(ledger) if line["step_id"] == "flaky"]
    assert flaky == ["failed", "failed", "ok"]


async def test_fail_without_a_ledger() -> None:
    with pytest.raises(ActionFailedError):
        await ProbeAction().run(_ctx({"fail": True}))
    assert (await ProbeAction().run(_ctx({}))).output["ok"] is True


async def test_emitted_secret_is_seen_but_never_written(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    value = "probe-" + secrets.token_hex(10)
    catalogue = SecretCatalogue.from_document(
        {"tenants": {"tenant-a": {"env:PLANTED": {"actions": ["probe"]}}}}
    )
    resolver = SecretResolver(
        [EnvSecretProvider({"OPSC_SECRET_TENANT_A__PLANTED": value})], catalogue
    )
    resolved, _ = resolver.resolve_params(
        {"ledger": str(ledger), "emit": {"$secret": "env:PLANTED"}}, SecretUse("tenant-a", "probe")
    )
    result = await ProbeAction().run(_ctx(resolved))
    (line,) = read_ledger(ledger)
    assert line["secret_seen"] is True
    assert line["emit_sha256"] == hashlib.sha256(value.encode()).hexdigest()
    assert value not in ledger.read_text()
    assert result.output["emit"] == REDACTED


async def test_plain_emit_is_not_a_secret(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    result = await ProbeAction().run(_ctx({"ledger": str(ledger), "emit": "hello"}))
    assert read_ledger(ledger)[0]["secret_seen"] is False
    assert result.output["emit"] == "hello"


async def test_worker_cancellation_releases_targets_and_records_it(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    task = asyncio.create_task(ProbeAction().run(_ctx({"ledger": str(ledger), "hold_s": 30})))
    await _wait_for_markers(ledger, 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [line["outcome"] for line in read_ledger(ledger)] == ["interrupted"]
    assert _markers(ledger) == []


async def test_record_only_touches_nothing(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    result = await ProbeAction().run(_ctx({"ledger": str(ledger), "fail": True}, record_only=True))
    assert result.record_only
    assert not ledger.exists()
    assert _markers(ledger) == []


def test_read_ledger_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_ledger(tmp_path / "none") == []


def test_estimate_defaults_to_the_hold_and_can_be_overridden() -> None:
    probe = ProbeAction()
    assert probe.estimate_ms({"hold_s": 2}, 1) == 2005
    assert probe.estimate_ms({"hold_s": 20, "estimate_ms": 50}, 1) == 50


def test_validation() -> None:
    probe = ProbeAction()
    assert probe.validate({"ledger": "/x", "emit": {"$secret": "env:A"}, "fail_times": 3}) == []
    fields = [v.field for v in probe.validate({"hold_s": -1, "fail": "y", "zzz": 1})]
    assert sorted(fields) == ["params.fail", "params.hold_s", "params.zzz"]


async def test_invalid_params_refused_at_run() -> None:
    with pytest.raises(PlanValidationError):
        await ProbeAction().run(_ctx({"hold_s": -1}))
