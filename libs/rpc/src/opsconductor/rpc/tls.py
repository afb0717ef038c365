"""TLS and mTLS for the gRPC servers, from PEM files as cert-manager mounts them.

``OPSC_TLS_CERT_FILE`` + ``OPSC_TLS_KEY_FILE`` (``tls.crt``, ``tls.key``) turn TLS on; the port
then speaks TLS only. ``OPSC_TLS_CLIENT_AUTH=require`` adds mTLS: a client must present a
certificate chaining to ``OPSC_TLS_CA_FILE`` (``ca.crt``) or the handshake fails, before any RPC
(health included) is served. Unset (``make run``): plaintext, exactly as before.

Rotation: the credentials are grpcio's *dynamic* SSL server credentials. gRPC asks
:meth:`ServerCertificates.fetch` for a new configuration before every TLS handshake; it
``stat``\\ s the three files at most every ``tls_reload_check_s`` seconds and re-reads them only
when one changed (the kubelet swaps a Secret volume's files atomically). A new certificate whose
key does not match it (a half-written update) is ignored and tried again at the next check, so
the server keeps its working pair. Connections already open keep the certificate they started
with; new connections get the new one. No restart is needed.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = structlog.get_logger(__name__)

_Fingerprint = tuple[tuple[int, int, int] | None, ...]


class ServerCertificates:
    """The server's certificate, key and client CA, re-read when the files change."""

    def __init__(
        self, cert_file: Path, key_file: Path, ca_file: Path | None, *, check_interval_s: float
    ) -> None:
        self._paths = (cert_file, key_file, ca_file)
        self._interval = check_interval_s
        # gRPC calls fetch() from its own threads, possibly several at once.
        self._lock = threading.Lock()
        self._checked_at = time.monotonic()
        self._fingerprint = self._stat()
        self.reloads = 0
        self.initial = self._configuration()  # raises: a server must not start without its pair

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate fetcher: a new configuration if the files rotated, else ``None``."""
        with self._lock:
            if time.monotonic() - self._checked_at < self._interval:
                return None
            self._checked_at = time.monotonic()
            fingerprint = self._stat()
            if fingerprint == self._fingerprint:
                return None
            try:
                configuration = self._configuration()
            except (OSError, ValueError) as exc:
                log.warning("tls_reload_skipped", reason=str(exc))
                return None
            self._fingerprint = fingerprint
            self.reloads += 1
        log.info("tls_certificates_reloaded", cert_file=str(self._paths[0]))
        return configuration

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        cert_file, key_file, ca_file = self._paths
        cert, key = cert_file.read_bytes(), key_file.read_bytes()
        _check_pair(cert, key)
        ca = ca_file.read_bytes() if ca_file is not None else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _stat(self) -> _Fingerprint:
        return tuple(_stat(path) for path in self._paths)


def server_credentials(settings: Any) -> tuple[grpc.ServerCredentials, ServerCertificates] | None:
    """TLS credentials for a server built from ``settings`` (``OPSC_TLS_*``); ``None``: plaintext.

    ``settings`` may lack the TLS fields altogether (then: plaintext).
    """
    cert_file = getattr(settings, "tls_cert_file", None)
    key_file = getattr(settings, "tls_key_file", None)
    if cert_file is None or key_file is None:
        return None
    client_auth = getattr(settings, "tls_client_auth", "none")
    ca_file = getattr(settings, "tls_ca_file", None)
    if client_auth not in ("none", "require"):
        raise ValueError(f"unsupported tls_client_auth {client_auth!r}: use none or require")
    if client_auth == "require" and ca_file is None:
        raise ValueError("tls_client_auth=require needs tls_ca_file (the clients' CA)")
    certificates = ServerCertificates(
        Path(cert_file),
        Path(key_file),
        Path(ca_file) if ca_file is not None and client_auth == "require" else None,
        check_interval_s=getattr(settings, "tls_reload_check_s", 10.0),
    )
    credentials = grpc.dynamic_ssl_server_credentials(
        certificates.initial,
        certificates.fetch,  # type: ignore[arg-type]  # the stub omits "None: unchanged"
        require_client_authentication=client_auth == "require",
    )
    return credentials, certificates


def _check_pair(cert_pem: bytes, key_pem: bytes) -> None:
    """Refuse a certificate whose key is not the one given (a half-rotated pair)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError as exc:
        raise ValueError("tls certificate or key is not valid PEM") from exc
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise ValueError("tls key does not match the certificate")


def _stat(path: Path | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)
