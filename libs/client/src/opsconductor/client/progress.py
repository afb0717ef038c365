"""The spec §7.1 shape of following an execution: ``progress_tracker.subscribe(exec_id)``.

    tracker = ProgressTracker(ExecutionClient(progress_address, token), tenant_id="acme")
    async for event in tracker.subscribe(exec_id):
        if event["type"] == "execution_completed":
            break

Events are plain dicts (the fields of :class:`ExecutionEvent`). ``subscribe`` replays from
``after_seq`` and follows live until ``execution_completed``; after a disconnection, subscribe
again with the last ``seq`` received and nothing is missed or repeated.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from .client import ExecutionClient


class ProgressTracker:
    """Subscriptions to one tenant's execution events over a client's channel."""

    def __init__(self, client: ExecutionClient, *, tenant_id: str) -> None:
        self._client = client
        self._tenant_id = tenant_id

    async def subscribe(
        self, execution_id: str, *, after_seq: int = 0
    ) -> AsyncIterator[dict[str, Any]]:
        """Every event of ``execution_id`` after ``after_seq``, as dicts, until it completes."""
        async for event in self._client.stream_events(
            execution_id, tenant_id=self._tenant_id, after_seq=after_seq
        ):
            yield asdict(event)
