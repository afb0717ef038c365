"""The processes ``make run`` supervises: how each is started, and when a dead one comes back.

A :class:`ServiceSpec` says how to start one service (module, port, environment); a
:class:`RunningService` is its current process plus what the supervisor knows of it (health,
restarts). :class:`RestartBackoff` is the process-manager rule for a service that exits without
being asked to: start it again after a delay that doubles with every quick death (0.5 s, 1 s,
2 s, ... at most 30 s) and falls back to the first step once the service had stayed up for a
while, so a crash loop cannot spin a CPU while a one-off crash comes back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

__all__ = ["RestartBackoff", "RunningService", "ServiceSpec", "free_port", "spawn_service"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (bound, then released): an ephemeral port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass(frozen=True)
class ServiceSpec:
    """How to start one service: its module, gRPC port and environment overrides."""

    name: str
    host: str
    port: int
    env: dict[str, str]
    note: str = ""
    #: Module to run; default ``opsconductor.<name>``.
    module_name: str = ""
    #: Extra command-line arguments.
    args: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return self.module_name or f"opsconductor.{self.name}"

    @property
    def has_health(self) -> bool:
        """gRPC services report health; helper processes (the reaper) only have to stay up."""
        return self.port > 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RestartBackoff:
    """Delay before restarting a service that died: doubling while it keeps dying quickly."""

    first_s: float = 0.5
    max_s: float = 30.0
    #: A service up at least this long before it died counts as healthy: back to ``first_s``.
    stable_after_s: float = 30.0

    def delay(self, quick_deaths: int) -> float:
        """The wait before the restart following ``quick_deaths`` deaths in a row (>= 1)."""
        return float(min(self.first_s * 2.0 ** max(quick_deaths - 1, 0), self.max_s))


@dataclass
class RunningService:
    """A service, its current process and what its health check last said."""

    spec: ServiceSpec
    process: asyncio.subprocess.Process
    status: str = "STARTING"
    #: Times the supervisor started it again after it exited unexpectedly.
    restarts: int = 0
    #: Deaths in a row that came before ``RestartBackoff.stable_after_s`` of uptime.
    quick_deaths: int = 0
    started_at: float = field(default_factory=time.monotonic)
    #: Exit status of the process before the current one (None: never died).
    last_exit: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.returncode is None


async def spawn_service(
    spec: ServiceSpec, base_env: Mapping[str, str], log_dir: Path | None
) -> asyncio.subprocess.Process:
    """Start ``python -m <spec.module>`` in a process group of its own.

    A Ctrl-C at the terminal then reaches only the supervisor, which stops things in order.
    Output goes to the supervisor's own (``make run``) or, with ``log_dir``, is appended to
    ``<log_dir>/<name>.log`` (a restarted service continues its file).
    """
    env = {**base_env, **spec.env}
    if log_dir is None:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            spec.module,
            *spec.args,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
    with _open_log(log_dir, spec.name) as sink:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            spec.module,
            *spec.args,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )


def _open_log(log_dir: Path, name: str) -> BinaryIO:
    log_dir.mkdir(parents=True, exist_ok=True)
    return (log_dir / f"{name}.log").open("ab")


def signal_group(pgid: int, signum: signal.Signals) -> None:
    """Signal a service's whole process group (it is gone already: nothing to do)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)
