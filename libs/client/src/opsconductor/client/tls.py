"""TLS for client channels: verify the server, optionally present a client certificate (mTLS).

    tls = ClientTls(ca_file="/etc/opsc/tls/ca.crt", cert_file=".../tls.crt", key_file=".../tls.key")
    async with ExecutionClient("api.opsc.svc:50051", token, tls=tls) as client: ...

Files are PEM, as cert-manager mounts them (``ca.crt``, ``tls.crt``, ``tls.key``). Without a
``ca_file`` the server is verified against the system roots; without ``cert_file``/``key_file``
no client certificate is sent (a server requiring mTLS refuses the handshake). ``server_name``
overrides the name expected in the server's certificate (dialing by IP, or through a tunnel).

Only ``grpc`` and the standard library are used here, so the typed client can stand alone.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import grpc.aio

from .limits import CHANNEL_OPTIONS

__all__ = ["ClientTls", "ClientTlsSettings", "RotatingChannel", "open_channel"]

_Fingerprint = tuple[tuple[int, int, int] | None, ...]


@dataclass(frozen=True)
class ClientTls:
    """Where a client's TLS material is; read when a channel is opened."""

    ca_file: Path | str | None = None
    cert_file: Path | str | None = None
    key_file: Path | str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both cert_file and key_file")

    @classmethod
    def from_settings(cls, settings: ClientTlsSettings) -> ClientTls | None:
        """The TLS of a service's own clients (``OPSC_TLS_*``); ``None`` when TLS is off.

        A service with a certificate presents it as its client certificate too (one
        cert-manager ``Certificate`` per service, usages ``server auth`` and ``client auth``).
        """
        if settings.tls_cert_file is None and settings.tls_ca_file is None:
            return None
        return cls(
            ca_file=settings.tls_ca_file,
            cert_file=settings.tls_cert_file,
            key_file=settings.tls_key_file,
            server_name=settings.tls_server_name or None,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials from the files as they are now (raises ``OSError`` if unreadable)."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file),
            private_key=_read(self.key_file),
            certificate_chain=_read(self.cert_file),
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        if self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []

    def fingerprint(self) -> _Fingerprint:
        """Identity of the files' current versions: changes when cert-manager rotates them."""
        return tuple(_stat(path) for path in (self.ca_file, self.cert_file, self.key_file))


class ClientTlsSettings(Protocol):
    """The settings fields :meth:`ClientTls.from_settings` reads."""

    @property
    def tls_ca_file(self) -> Path | None: ...
    @property
    def tls_cert_file(self) -> Path | None: ...
    @property
    def tls_key_file(self) -> Path | None: ...
    @property
    def tls_server_name(self) -> str | None: ...


def open_channel(
    target: str, tls: ClientTls | None = None, options: list[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """A plaintext channel without ``tls``, else a TLS one (build it inside the event loop).

    Every channel carries the services' message limits (:mod:`.limits`) before ``options``.
    """
    options = [*CHANNEL_OPTIONS, *(options or [])]
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(
        target, tls.credentials(), options=[*options, *tls.channel_options()]
    )


class RotatingChannel:
    """A channel that is replaced when the TLS files change (a long-lived service's client).

    gRPC reads client certificates once, when a channel is made. :meth:`current` checks the
    files' fingerprint at most every ``check_interval_s`` seconds (a ``stat`` per file) and, on a
    change, opens a new channel; the old one is closed in the background once its in-flight
    calls finish (at most ``drain_s``). If the new files cannot be read, the old channel is kept
    and the change is tried again at the next check. Use it inside the event loop.
    """

    def __init__(
        self,
        target: str,
        tls: ClientTls | None,
        *,
        check_interval_s: float = 10.0,
        drain_s: float = 130.0,
        options: list[tuple[str, Any]] | None = None,
    ) -> None:
        self._target = target
        self._tls = tls
        self._options = options
        self._interval = check_interval_s
        self._drain_s = drain_s
        self._fingerprint = tls.fingerprint() if tls is not None else ()
        self._channel = open_channel(target, tls, options)
        self._checked_at = time.monotonic()
        self._closing: dict[asyncio.Task[None], grpc.aio.Channel] = {}
        self.rotations = 0

    def current(self) -> grpc.aio.Channel:
        """The channel to call on now (a fresh one if the certificates rotated)."""
        if self._tls is None or time.monotonic() - self._checked_at < self._interval:
            return self._channel
        self._checked_at = time.monotonic()
        fingerprint = self._tls.fingerprint()
        if fingerprint == self._fingerprint:
            return self._channel
        try:
            fresh = open_channel(self._target, self._tls, self._options)
        except (OSError, ValueError):
            return self._channel  # half-rotated or unreadable: keep the working channel
        old, self._channel, self._fingerprint = self._channel, fresh, fingerprint
        self.rotations += 1
        task = asyncio.ensure_future(old.close(self._drain_s))
        self._closing[task] = old
        task.add_done_callback(lambda done: self._closing.pop(done, None))
        return fresh

    async def close(self) -> None:
        """Close the channel, and at once any replaced one still draining."""
        await self._channel.close(None)
        for task, old in list(self._closing.items()):
            task.cancel()
            await old.close(None)


def _read(path: Path | str | None) -> bytes | None:
    if path is None:
        return None
    return Path(path).read_bytes()


def _stat(path: Path | str | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)  # follows the ..data symlink a Kubernetes Secret volume swaps
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)
