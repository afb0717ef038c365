"""``python -m opsconductor.rpc.health_probe``: ask a local server's gRPC health service.

For operators (docs/runbooks/service-down.md: through ``kubectl port-forward`` or from inside a
pod) and for exec probes where the plaintext health port (``OPSC_HEALTH_PORT``) is not wanted.
It calls ``grpc.health.v1.Health/Check`` on ``127.0.0.1:$OPSC_GRPC_PORT`` — with the
``OPSC_TLS_*`` certificate when ``OPSC_TLS_CERT_FILE`` is set, checking the server's certificate
against ``OPSC_TLS_CA_FILE`` under the name ``OPSC_TLS_SERVER_NAME`` (e.g. ``api``) — and exits 0
if the answer is ``SERVING``, 1 otherwise, with one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ProbeSettings", "check", "main"]


class ProbeSettings(BaseSettings):
    """The few ``OPSC_*`` settings the probe needs: the port and the TLS files."""

    model_config = SettingsConfigDict(env_prefix="OPSC_", frozen=True, extra="ignore")

    grpc_port: int = Field(ge=1, le=65535)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_server_name: str | None = None


def _channel(settings: ProbeSettings, address: str) -> grpc.Channel:
    if settings.tls_cert_file is None:
        return grpc.insecure_channel(address)
    if settings.tls_key_file is None or settings.tls_ca_file is None:
        raise ValueError("OPSC_TLS_CERT_FILE needs OPSC_TLS_KEY_FILE and OPSC_TLS_CA_FILE")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=settings.tls_ca_file.read_bytes(),
        private_key=settings.tls_key_file.read_bytes(),
        certificate_chain=settings.tls_cert_file.read_bytes(),
    )
    # 127.0.0.1 is not a name in the server's certificate: check the service's name instead.
    options = (
        [("grpc.ssl_target_name_override", settings.tls_server_name)]
        if settings.tls_server_name
        else []
    )
    return grpc.secure_channel(address, credentials, options=options)


def check(settings: ProbeSettings, *, service: str = "", timeout_s: float = 3.0) -> str:
    """The health status name of ``service`` (``""``: the whole server); raises on failure."""
    with _channel(settings, f"127.0.0.1:{settings.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return name


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0 when SERVING, 1 otherwise (one line on stderr saying why)."""
    parser = argparse.ArgumentParser(prog="python -m opsconductor.rpc.health_probe")
    parser.add_argument("--service", default="", help="service to ask about (default: server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    args = parser.parse_args(argv)
    try:
        settings = ProbeSettings()
        status = check(settings, service=args.service, timeout_s=args.timeout)
    except grpc.RpcError as exc:
        # A failed call is also a grpc.Call (its code() says why); the stubs cannot say so.
        code = getattr(exc, "code", None)
        reason = code().name if callable(code) else "RPC failed"
        print(f"health_probe: not healthy: {reason}", file=sys.stderr)
        return 1
    except ValidationError:
        print("health_probe: OPSC_GRPC_PORT is unset or not a port", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"health_probe: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"health_probe: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"health_probe: not healthy: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
