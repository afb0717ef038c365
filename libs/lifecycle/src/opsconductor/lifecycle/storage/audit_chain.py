"""Verification of an execution's tamper-evident event chain (migration ``0004_audit_chain``).

Each event of an execution is written with ``hash = sha256(previous event's hash ‖ canonical
text of this event)`` by a trigger, in the statement that appends it (the first event chains
from the empty string). The canonical text is ``execution_event_canonical(...)`` — the jsonb
rendering of the event's recorded columns, seq included — so this module re-renders every row
*as it is now* and recomputes the chain in Python:

* an altered event (type, payload, actor, time, or its stored hash) fails at its own seq;
* a deleted event leaves a gap in seq, reported at the first missing seq — a deleted tail too,
  because ``executions.event_seq`` still counts every event ever appended;
* reordered events (seq values swapped) fail at the first moved seq, its hash being bound to
  the position it was written at.

Each row is checked against the *stored* hash of its predecessor, so the first broken link is
named even when later rows are intact. What it cannot catch: someone who rewrites a row and
recomputes every later hash (and ``event_seq``) with database write access; the head hash that
:func:`verify_chain` returns is what to keep elsewhere to catch that too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final
from uuid import UUID

from opsconductor.common.errors import NotFoundError
from opsconductor.lifecycle.storage.execution_records import PoolOrConnection, transaction
from opsconductor.lifecycle.storage.queries import query

__all__ = [
    "ChainLink",
    "ChainProblem",
    "ChainVerdict",
    "check_links",
    "link_hash",
    "verify_chain",
]

_EXECUTION = query("execution_event_seq")
_LINKS = query("execution_event_links")

_GENESIS: Final = b""


class ChainProblem(StrEnum):
    """How the first broken link is broken."""

    #: The event's content or position no longer matches its hash (edited, or moved).
    ALTERED = "altered"
    #: Events are missing at this seq (deleted, from the middle or the end).
    MISSING = "missing"
    #: The event has no hash at all (written with the chain trigger disabled).
    UNCHAINED = "unchained"


@dataclass(frozen=True)
class ChainLink:
    """One stored event as the verifier sees it: its seq, stored hash and canonical text."""

    seq: int
    hash: bytes | None
    canonical: str


@dataclass(frozen=True)
class ChainVerdict:
    """The result of verifying one execution's chain.

    ``intact`` with ``broken_seq``/``problem`` unset, or the first broken link: its seq, how it
    is broken and a sentence saying so. ``head_hash`` is the last verified link's hash (hex).
    """

    events_checked: int
    events_expected: int
    head_hash: str
    broken_seq: int | None = None
    problem: ChainProblem | None = None
    detail: str = ""

    @property
    def intact(self) -> bool:
        return self.problem is None


def link_hash(previous: bytes, canonical: str) -> bytes:
    """``sha256(previous ‖ canonical)``: the hash the trigger stores for an event."""
    return hashlib.sha256(previous + canonical.encode("utf-8")).digest()


def check_links(links: Iterable[ChainLink], events_expected: int) -> ChainVerdict:
    """Walk ``links`` (ordered by seq) and return the first broken link, if any.

    ``events_expected`` is the execution's ``event_seq``: how many events were ever appended.
    """
    previous = _GENESIS
    expected_seq = 1
    checked = 0
    for link in links:
        if link.seq != expected_seq:
            # seq is unique per execution and rows come ordered, so this is a gap.
            return _broken(
                checked,
                events_expected,
                previous,
                expected_seq,
                ChainProblem.MISSING,
                _missing(expected_seq, link.seq - 1),
            )
        if link.hash is None:
            return _broken(
                checked,
                events_expected,
                previous,
                link.seq,
                ChainProblem.UNCHAINED,
                f"event {link.seq} carries no hash",
            )
        if link.hash != link_hash(previous, link.canonical):
            return _broken(
                checked,
                events_expected,
                previous,
                link.seq,
                ChainProblem.ALTERED,
                f"event {link.seq} does not match its hash: its content or position was changed",
            )
        previous = link.hash
        expected_seq += 1
        checked += 1
    if checked < events_expected:
        return _broken(
            checked,
            events_expected,
            previous,
            expected_seq,
            ChainProblem.MISSING,
            _missing(expected_seq, events_expected),
        )
    return ChainVerdict(
        events_checked=checked, events_expected=events_expected, head_hash=previous.hex()
    )


def _missing(first: int, last: int) -> str:
    if first == last:
        return f"event {first} is missing"
    return f"events {first} to {last} are missing"


def _broken(
    checked: int,
    expected: int,
    previous: bytes,
    seq: int,
    problem: ChainProblem,
    detail: str,
) -> ChainVerdict:
    return ChainVerdict(
        events_checked=checked,
        events_expected=expected,
        head_hash=previous.hex(),
        broken_seq=seq,
        problem=problem,
        detail=detail,
    )


async def verify_chain(db: PoolOrConnection, tenant_id: str, execution_id: UUID) -> ChainVerdict:
    """Verify the event chain of one execution of ``tenant_id``.

    :class:`NotFoundError` when the execution does not exist or is another tenant's. The event
    count is read before the events: an event appended in between is verified as well, and
    cannot look like a missing one.
    """
    async with transaction(db) as conn:
        expected = await conn.fetchval(_EXECUTION, execution_id, tenant_id)
        if expected is None:
            raise NotFoundError("execution not found", execution_id=str(execution_id))
        rows: Sequence[Mapping[str, Any]] = await conn.fetch(_LINKS, execution_id)
    links = (
        ChainLink(
            seq=row["seq"],
            hash=bytes(row["hash"]) if row["hash"] is not None else None,
            canonical=row["canonical"],
        )
        for row in rows
    )
    return check_links(links, int(expected))
