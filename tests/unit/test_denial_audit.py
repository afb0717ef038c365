"""The per-principal budget on denial audit rows: first rows at once, repeats aggregated."""

from __future__ import annotations

import asyncio

import pytest

from opsconductor.policy.denial_audit import DenialAuditLimiter, DenialRecord


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _denial(target: str, actor: str = "vera", reason: str = "TENANT_MISMATCH") -> DenialRecord:
    return DenialRecord(
        tenant_id=target,
        actor_tenant="home",
        actor_id=actor,
        execution_id=None,
        payload={"reason": reason, "tier": "api", "resource": "X/Y", "requested_tenant": target},
    )


@pytest.fixture
def written() -> list[DenialRecord]:
    return []


def _limiter(written: list[DenialRecord], clock: _Clock, **kwargs: float) -> DenialAuditLimiter:
    async def write(record: DenialRecord) -> None:
        written.append(record)

    return DenialAuditLimiter(write, clock=clock, **kwargs)  # type: ignore[arg-type]


async def test_the_first_denials_of_a_window_are_written_at_once(
    written: list[DenialRecord],
) -> None:
    """Up to the burst, one row per denial, unchanged and in order."""
    limiter = _limiter(written, _Clock(), burst=3)
    for index in range(3):
        await limiter.record(_denial(f"t{index}"))
    assert [r.tenant_id for r in written] == ["t0", "t1", "t2"]
    assert all("aggregated" not in r.payload for r in written)


async def test_repeats_beyond_the_burst_become_one_summary_per_group(
    written: list[DenialRecord],
) -> None:
    """1 000 denials against two tenants: 2 rows now, 2 summaries at the window's end."""
    clock = _Clock()
    limiter = _limiter(written, clock, burst=2, window_s=60)
    for index in range(1000):
        await limiter.record(_denial("victim-a" if index % 2 else "victim-b"))
    assert len(written) == 2
    await limiter.flush()
    summaries = [r for r in written if r.payload.get("aggregated")]
    assert sorted((r.tenant_id, r.payload["count"]) for r in summaries) == [
        ("victim-a", 499),
        ("victim-b", 499),
    ]
    assert all(r.payload["reason"] == "TENANT_MISMATCH" for r in summaries)
    assert all(r.payload["first_seen"] <= r.payload["last_seen"] for r in summaries)


async def test_invented_tenant_names_cannot_multiply_rows(written: list[DenialRecord]) -> None:
    """3 000 denials under 3 000 names: burst + max_groups + 1 rows, every denial counted."""
    limiter = _limiter(written, _Clock(), burst=10, max_groups=5)
    for index in range(3000):
        await limiter.record(_denial(f"made-up-{index}"))
    await limiter.flush()
    assert len(written) == 10 + 5 + 1
    counted = sum(int(r.payload.get("count", 1)) for r in written)
    assert counted == 3000
    overflow = [r for r in written if r.payload.get("requested_tenant") == "(various)"]
    assert len(overflow) == 1
    assert overflow[0].tenant_id == "home"  # filed under the principal's own tenant


async def test_budgets_are_per_principal(written: list[DenialRecord]) -> None:
    """A noisy principal's budget is its own: another one's first denial is written at once."""
    limiter = _limiter(written, _Clock(), burst=1)
    for _ in range(50):
        await limiter.record(_denial("x", actor="noisy"))
    await limiter.record(_denial("x", actor="quiet"))
    assert [r.actor_id for r in written] == ["noisy", "quiet"]


async def test_a_new_window_writes_again_and_flushes_the_old_one(
    written: list[DenialRecord],
) -> None:
    """After the window, the next denial is a first row again; the old counts are summarised."""
    clock = _Clock()
    limiter = _limiter(written, clock, burst=1, window_s=10)
    await limiter.record(_denial("x"))
    await limiter.record(_denial("x"))
    clock.now += 11
    await limiter.record(_denial("y"))
    await limiter.flush()
    assert [(r.tenant_id, r.payload.get("count")) for r in written] == [
        ("x", None),
        ("y", None),
        ("x", 1),
    ]


async def test_the_summary_is_written_by_a_timer_without_another_denial(
    written: list[DenialRecord],
) -> None:
    """Nobody has to call flush: the window's end writes the summary on its own."""
    limiter = _limiter(written, _Clock(), burst=1, window_s=0.05)
    await limiter.record(_denial("x"))
    await limiter.record(_denial("x"))
    async with asyncio.timeout(5):
        while len(written) < 2:
            await asyncio.sleep(0.01)
    assert written[1].payload["count"] == 1


async def test_a_failing_summary_write_is_logged_not_raised() -> None:
    """An audit write that fails never turns into a new error for anyone."""
    calls = 0

    async def write(record: DenialRecord) -> None:
        nonlocal calls
        calls += 1
        if record.payload.get("aggregated"):
            raise RuntimeError("db down")

    limiter = DenialAuditLimiter(write, burst=1)
    await limiter.record(_denial("x"))
    await limiter.record(_denial("x"))
    await limiter.flush()
    assert calls == 2


def test_nonsense_budgets_are_refused() -> None:
    async def write(record: DenialRecord) -> None:
        return None

    with pytest.raises(ValueError, match="burst"):
        DenialAuditLimiter(write, burst=0)
