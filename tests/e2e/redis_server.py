"""A Redis server of a test's own, for fault tests that kill, restart or flush Redis.

The machine's shared Redis must never be flushed or stopped, so tests that do either start
Debian's ``redis-server`` on a free port, without persistence (a restart comes back empty, like a
cache node that lost its memory), and kill it at will.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import RedisError

from tests import ports


def free_port() -> int:
    """A TCP port nothing listens on right now, outside the ephemeral range (tests.ports)."""
    return ports.free_port()


class RedisServer:
    """``redis-server`` on one fixed port, which survives :meth:`kill` and :meth:`start` again."""

    def __init__(self, log_dir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self._log_path = log_dir / f"redis-{self.port}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    async def start(self, within_s: float = 10.0) -> None:
        """Start the server (empty: no persistence) and wait until it answers PING."""
        if self.running:
            return
        with self._log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + within_s
        client = Redis.from_url(self.url, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(f"redis-server exited: see {self._log_path}")
                try:
                    if await client.ping():
                        return
                except (RedisError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server on {self.port} not up within {within_s} s")
                await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    def kill(self) -> None:
        """SIGKILL the server and reap it: its port refuses connections from now on."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)
        self._process = None

    def client(self) -> Redis:
        """A client of this server (the caller closes it)."""
        return Redis.from_url(self.url, socket_timeout=5.0, socket_connect_timeout=5.0)
