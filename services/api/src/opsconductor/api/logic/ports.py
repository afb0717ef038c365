"""What the api's logic needs from other services, as ports the transport layer implements."""

from __future__ import annotations

from typing import Protocol
from uuid import UUID


class WorkerPort(Protocol):
    """Hands an immediate execution to a worker and waits until it has finished.

    Raises the worker's domain errors (``ResourceBusyError``, ``ExecutionTimeoutError``,
    ``PermissionDeniedError``, ``FSMError``...) and ``WorkerUnavailableError`` when no worker
    could be reached (the execution was then never started).
    """

    async def run_immediate(
        self, *, tenant_id: str, execution_id: UUID, token: str, timeout_s: float
    ) -> object:
        """The worker's answer: the finished execution as the transport carries it.

        The logic never looks inside it; the servicer returns it to the caller as is instead
        of reading the execution back from Postgres.
        """
        ...
