"""The database pool of a gRPC service, opened by ``serve`` at start-up and closed at shutdown.

The server binds its port before the pool exists (so probes see ``NOT_SERVING`` rather than a
refused connection) and servicers are registered before start-up runs, so servicers hold this
handle and read ``.pool`` per call. Health turns ``SERVING`` only after :meth:`open` succeeded.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import structlog
from pydantic import SecretStr

from opsconductor.common.errors import StorageError
from opsconductor.lifecycle.storage.db import create_pool

log = structlog.get_logger(__name__)


class DatabasePool:
    """A lazily opened asyncpg pool with the shared JSON codecs."""

    def __init__(
        self,
        dsn: SecretStr,
        *,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout_s: float = 30.0,
        retry_interval_s: float = 0.5,
    ) -> None:
        self._dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout_s = connect_timeout_s
        self._retry_interval_s = retry_interval_s
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        """The open pool; ``StorageError`` (→ ``UNAVAILABLE``) before start-up or after shutdown."""
        if self._pool is None:
            raise StorageError("The database pool is not open.")
        return self._pool

    async def open(self) -> None:
        """Open the pool, retrying while the database is unreachable (it may still be starting)."""
        deadline = time.monotonic() + self._connect_timeout_s
        attempt = 0
        while True:
            attempt += 1
            try:
                self._pool = await create_pool(
                    self._dsn.get_secret_value(), min_size=self._min_size, max_size=self._max_size
                )
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                if time.monotonic() >= deadline:
                    raise StorageError(
                        "The database stayed unreachable at start-up.", attempts=attempt
                    ) from exc
                # Only the class: a driver message may quote the DSN.
                log.warning("database_connect_retry", attempt=attempt, error=type(exc).__name__)
                await asyncio.sleep(self._retry_interval_s)
            else:
                log.info("database_pool_opened", attempts=attempt, max_size=self._max_size)
                return

    async def close(self) -> None:
        """Close the pool, waiting for connections in use to be released."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
            log.info("database_pool_closed")
