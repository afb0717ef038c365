"""The HTTP server inside the progress process: uvicorn on the service's event loop.

Started by a start-up hook of the shared gRPC bootstrap and stopped by its stopping hook, so one
process serves gRPC and HTTP and one SIGTERM ends both (uvicorn's own signal handlers are not
installed: the bootstrap owns the signals). The bound port goes to ``http_port_file``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import Generator
from pathlib import Path

import structlog
import uvicorn
from starlette.types import ASGIApp

log = structlog.get_logger(__name__)


_QUERY = re.compile(r"\?[^\s\"']*")


class _StripQueryStrings(logging.Filter):
    """uvicorn logs WebSocket handshakes with their query string, where stream tickets
    travel: keep the path, drop the query."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _QUERY.sub("?…", arg) if isinstance(arg, str) else arg for arg in record.args
            )
        if isinstance(record.msg, str):
            record.msg = _QUERY.sub("?…", record.msg) if "%" not in record.msg else record.msg
        return True


def _install_query_filter() -> None:
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _StripQueryStrings) for f in logger.filters):
            logger.addFilter(_StripQueryStrings())


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the gRPC bootstrap handles SIGTERM/SIGINT and stops us


class HttpServer:
    """uvicorn serving ``asgi`` on ``host:port`` (port 0: ephemeral, see ``port``)."""

    def __init__(
        self,
        asgi: ASGIApp,
        *,
        host: str,
        port: int,
        port_file: Path | None,
        grace_s: float,
    ) -> None:
        self._host = host
        self._requested_port = port
        self._port_file = port_file
        config = uvicorn.Config(
            asgi,
            host=host,
            port=port,
            lifespan="off",
            access_log=False,  # query strings carry stream tickets: never log them
            log_config=None,
            http="httptools",  # the C parser: less CPU per request than h11's pure Python
            ws="websockets-sansio",
            ws_ping_interval=20.0,
            timeout_graceful_shutdown=max(1, round(grace_s)),
        )
        _install_query_filter()
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._requested_port))
        self.port = sock.getsockname()[1]
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # it failed: say why
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)
        if self._port_file is not None:
            self._port_file.write_text(str(self.port))
        log.info("http_server_started", address=f"{self._host}:{self.port}")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        if self._port_file is not None:
            self._port_file.unlink(missing_ok=True)
        log.info("http_server_stopped")
