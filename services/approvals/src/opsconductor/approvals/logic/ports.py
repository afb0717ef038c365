"""What the approvals logic needs from other services, as ports the transport layer implements."""

from __future__ import annotations

from typing import Protocol
from uuid import UUID


class WorkerPort(Protocol):
    """Runs an approved immediate execution on a worker and waits until it has finished.

    Raises the worker's domain errors and ``WorkerUnavailableError`` when no worker could be
    reached (the execution was then never started).
    """

    async def run_immediate(
        self, *, tenant_id: str, execution_id: UUID, token: str, timeout_s: float
    ) -> object: ...
