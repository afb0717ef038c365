"""gRPC transport of the worker service: ``WorkerService``.

Protobuf in, domain calls, protobuf out; no business logic here.
"""

from __future__ import annotations

import grpc.aio

from opsconductor.worker.app import WorkerApp
from opsconductor.worker.servicers.worker_servicer import add_worker_servicer


def register_services(server: grpc.aio.Server, app: WorkerApp) -> list[str]:
    """Add every servicer of the worker service to ``server``; returns the full service names."""
    return [add_worker_servicer(server, app)]
