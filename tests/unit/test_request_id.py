"""The per-RPC request id: taken from x-request-id when it is a plain token, else generated."""

from __future__ import annotations

import asyncio

import pytest

from opsconductor.rpc.metadata import (
    current_request_id,
    new_request_id,
    request_id_from_metadata,
    reset_request_id,
    set_request_id,
)


def test_callers_plain_request_id_is_kept() -> None:
    """A short token of letters, digits and ._:- is the caller's to choose (any key case)."""
    assert request_id_from_metadata([("X-Request-Id", "abc-123:7.x_y")]) == "abc-123:7.x_y"
    assert request_id_from_metadata([("x-request-id", b"bytes-id")]) == "bytes-id"


@pytest.mark.parametrize(
    "value",
    ["", "has space", 'quote"inside', "x" * 129, "line\nbreak", "é"],
    ids=["empty", "space", "quote", "too-long", "newline", "non-ascii"],
)
def test_unacceptable_request_id_is_replaced(value: str) -> None:
    """Anything else could forge log structure or carry a blob: a fresh id is generated."""
    generated = request_id_from_metadata([("other", "x"), ("x-request-id", value)])
    assert generated != value
    assert len(generated) == 32
    assert int(generated, 16) >= 0


def test_missing_metadata_generates_distinct_ids() -> None:
    """No metadata at all still yields an id, a different one each time."""
    assert request_id_from_metadata(None) != request_id_from_metadata([])
    assert new_request_id() != new_request_id()


async def test_request_id_is_scoped_to_the_task_that_set_it() -> None:
    """Concurrent RPC tasks each see their own id, and resetting restores the previous one."""
    assert current_request_id() is None

    async def rpc(request_id: str) -> str | None:
        token = set_request_id(request_id)
        try:
            await asyncio.sleep(0)  # let the other tasks interleave
            return current_request_id()
        finally:
            reset_request_id(token)

    ids = [f"rid-{n}" for n in range(50)]
    assert await asyncio.gather(*(rpc(i) for i in ids)) == ids
    assert current_request_id() is None
