"""A Postgres wire-protocol proxy that counts round trips (for the round-trip test and benchmarks).

Every service connects to Postgres through :class:`RoundTripCounter` instead of the server
(``counter.dsn(dsn)`` rewrites a DSN's host and port). The proxy forwards bytes unchanged and
reads the messages clients send: each ``Sync`` (end of an extended-protocol exchange: asyncpg's
prepare, bind/execute, ``executemany``) and each simple ``Query`` makes the client wait for the
server's ``ReadyForQuery``, so each counts as one **round trip**. What each round trip carried
(the statements parsed, bound or queried since the previous one) is kept, so a count can be
explained. Counting on the wire sees everything a driver sends, its own ``BEGIN``/``COMMIT``,
reset queries and type introspection included, whatever process sends it.

The proxy answers ``SSLRequest``/``GSSENCRequest`` with "no" itself, so the stream it reads is
always plain; use it on loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_HEADER = struct.Struct("!cI")
_STARTUP = struct.Struct("!II")
_SAVEPOINT_NAME = re.compile(r"__asyncpg_savepoint_\w+?__")


def _cstrings(body: bytes, count: int) -> list[str]:
    parts = body.split(b"\0", count)
    return [p.decode("utf-8", "replace") for p in parts[:count]]


@dataclass
class RoundTrip:
    """One client wait for ``ReadyForQuery``: what it carried, on which connection."""

    connection: int
    statements: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ; ".join(" ".join(s.split()) for s in self.statements) or "(sync)"


@dataclass
class _Connection:
    number: int
    #: Prepared statement name -> its text (asyncpg names them ``__asyncpg_stmt_N__``).
    prepared: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)


class RoundTripCounter:
    """``async with RoundTripCounter(host, port) as counter``: a counting proxy on 127.0.0.1."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        """``upstream_host`` starting with ``/`` is a Unix socket folder (libpq's convention)."""
        self._upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections = 0
        self.port = 0
        self.round_trips: list[RoundTrip] = []

    @classmethod
    def for_dsn(cls, dsn: str) -> RoundTripCounter:
        """A proxy in front of ``dsn``'s server (``?host=/dir&port=N`` Unix sockets too)."""
        parts = urlsplit(dsn)
        query = dict(parse_qsl(parts.query))
        host = unquote(query.get("host", "")) or parts.hostname or "127.0.0.1"
        return cls(host, int(query.get("port", 0)) or parts.port or 5432)

    def dsn(self, dsn: str) -> str:
        """``dsn`` pointing at the proxy (user, database and other parameters kept)."""
        parts = urlsplit(dsn)
        user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        netloc = f"{user}127.0.0.1:{self.port}"
        query = [(k, v) for k, v in parse_qsl(parts.query) if k not in {"host", "port"}]
        return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), parts.fragment))

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = self._upstream
        if host.startswith("/"):
            return await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        return await asyncio.open_connection(host, port)

    # -- reading the figures ----------------------------------------------------------------------

    @property
    def count(self) -> int:
        return len(self.round_trips)

    def mark(self) -> int:
        """The position to count from (see :meth:`since`)."""
        return len(self.round_trips)

    def since(self, mark: int) -> list[RoundTrip]:
        return self.round_trips[mark:]

    @staticmethod
    def summary(round_trips: list[RoundTrip], width: int = 110) -> str:
        """One line per distinct round trip, most frequent first (for failure messages)."""
        counts = Counter(_SAVEPOINT_NAME.sub("<sp>", rt.text)[:width] for rt in round_trips)
        return "\n".join(f"{n:>4} x {text}" for text, n in counts.most_common())

    # -- the proxy --------------------------------------------------------------------------------

    async def __aenter__(self) -> RoundTripCounter:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            while True:  # startup: answer encryption requests with "N", forward the rest
                head = await reader.readexactly(_STARTUP.size)
                length, code = _STARTUP.unpack(head)
                body = await reader.readexactly(length - _STARTUP.size)
                if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                    writer.write(b"N")
                    await writer.drain()
                    continue
                break
            upstream_reader, upstream_writer = await self._open_upstream()
            upstream_writer.write(head + body)
            await upstream_writer.drain()
            if code == _CANCEL_REQUEST:
                return
            self._connections += 1
            conn = _Connection(self._connections)
            self._spawn(self._pump(upstream_reader, writer))
            await self._client_to_server(reader, upstream_writer, conn)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            for w in (writer, upstream_writer):
                if w is not None:
                    with contextlib.suppress(Exception):
                        w.close()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        with contextlib.suppress(Exception):
            writer.close()

    async def _client_to_server(
        self, reader: asyncio.StreamReader, upstream: asyncio.StreamWriter, conn: _Connection
    ) -> None:
        while True:
            head = await reader.readexactly(_HEADER.size)
            kind, length = _HEADER.unpack(head)
            body = await reader.readexactly(length - 4)
            upstream.write(head + body)
            await upstream.drain()
            if kind == b"Q":
                conn.pending.append(body.rstrip(b"\0").decode("utf-8", "replace"))
                self._finish(conn)
            elif kind == b"P":
                name, query = _cstrings(body, 2)
                if name:
                    conn.prepared[name] = query
                conn.pending.append(query)
            elif kind == b"B":
                _portal, name = _cstrings(body, 2)
                if name and name in conn.prepared and conn.prepared[name] not in conn.pending:
                    conn.pending.append(conn.prepared[name])
            elif kind == b"S":
                self._finish(conn)
            elif kind == b"X":
                return

    def _finish(self, conn: _Connection) -> None:
        self.round_trips.append(RoundTrip(conn.number, tuple(conn.pending)))
        conn.pending = []


__all__ = ["RoundTrip", "RoundTripCounter"]
