"""Lock keys and lock sets: the naming and ordering rules the Postgres mutex relies on (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest

from opsconductor.lifecycle.storage.locks import (
    HeldLock,
    LockRequest,
    LockSet,
    lock_key,
    sorted_requests,
)


def test_lock_key_has_the_spec_format() -> None:
    """Spec §3.2: the key is ``lock:v1:{tenant_id}:{target_ref}:{action}``."""
    assert lock_key("t1", "server-01", "restart") == "lock:v1:t1:server-01:restart"


def test_target_ref_may_contain_colons_and_the_key_stays_unambiguous() -> None:
    """A target like ``host:port`` is allowed because tenant and action never contain ':'."""
    assert lock_key("t1", "db:5432", "restart") == "lock:v1:t1:db:5432:restart"


@pytest.mark.parametrize(
    ("tenant", "target", "action"),
    [
        ("", "server-01", "restart"),
        ("t1", "", "restart"),
        ("t1", "server-01", ""),
        ("t:1", "server-01", "restart"),
        ("t1", "server-01", "re:start"),
        ("t" * 101, "server-01", "restart"),
        ("t1", "s" * 301, "restart"),
        ("t1", "server-01", "a" * 101),
    ],
)
def test_lock_key_rejects_parts_that_could_collide_or_not_fit(
    tenant: str, target: str, action: str
) -> None:
    """Empty, oversize or ':'-bearing tenant/action parts are refused before any SQL runs."""
    with pytest.raises(ValueError, match=r"tenant_id|target_ref|action"):
        lock_key(tenant, target, action)


def test_lock_request_validates_on_construction() -> None:
    """A LockRequest that could not be keyed is refused when it is built, not when it is used."""
    with pytest.raises(ValueError, match="tenant_id"):
        LockRequest("a:b", "server-01", "restart")
    assert LockRequest("t1", "server-01", "restart").key == "lock:v1:t1:server-01:restart"


def test_sorted_requests_deduplicates_and_orders_by_key() -> None:
    """Every plan asks for its keys in one global order, each key once (no self-deadlock)."""
    requests = [
        LockRequest("t1", "web-2", "restart"),
        LockRequest("t1", "db-1", "restart"),
        LockRequest("t1", "web-2", "restart"),
        LockRequest("t1", "Web-3", "restart"),
    ]
    keys = [request.key for request in sorted_requests(requests)]
    assert keys == [
        "lock:v1:t1:Web-3:restart",  # code-point order, like COLLATE "C" in Postgres
        "lock:v1:t1:db-1:restart",
        "lock:v1:t1:web-2:restart",
    ]


def test_lock_set_exposes_keys_tokens_and_earliest_expiry() -> None:
    """A LockSet answers which keys it holds, their fencing tokens and when it stops being whole."""
    owner = uuid4()
    now = datetime.now(UTC)
    lock_set = LockSet(
        owner,
        (
            HeldLock("lock:v1:t1:a:x", owner, 7, now + timedelta(seconds=30)),
            HeldLock("lock:v1:t1:b:x", owner, 8, now + timedelta(seconds=10)),
        ),
    )
    assert lock_set.keys == ["lock:v1:t1:a:x", "lock:v1:t1:b:x"]
    assert lock_set.fencing_tokens == {"lock:v1:t1:a:x": 7, "lock:v1:t1:b:x": 8}
    assert lock_set.expires_at == now + timedelta(seconds=10)
    assert LockSet(owner).expires_at is None
