"""SSRF through the ``http`` action (issue 8, finding 3), through the real api and worker.

Reproduced on main: a read-class step fetched the worker's own ``/metrics`` on 127.0.0.1 and got
the body back in its stored result, and a redirect reached the same address. Here the worker
serves metrics on a known port; a local HTTP server (this test process, 127.0.0.1) redirects
wherever a test asks. The module's tenant policy lets ``LOOPBACK_TENANT`` reach 127.0.0.1/32
(that server), so the attacks can also be tried from a tenant allowed loopback; every other
tenant has the packaged default (public addresses only).
"""

from __future__ import annotations

import json
import socket
import tempfile
import threading
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from opsconductor.client import PermissionDeniedError

from . import inspection
from .conftest import Tenant, bound_tenant, running_stack
from .inspection import tenant_row_counts
from .plans import plan
from .stack import Stack

LOOPBACK_TENANT = "t-egress-loopback"
POLICY = {"tenants": {LOOPBACK_TENANT: {"egress": {"allow_networks": ["127.0.0.1/32"]}}}}
MARKER = "opsc_process_start_time_seconds"  # a line every worker /metrics body has


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


METRICS_PORT = _free_port()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/redirect/"):
            target = urllib.parse.unquote(self.path.split("/", 2)[2])
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"hello from the allowed server"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def local_server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
async def stack(e2e_dsn: str, e2e_pool: asyncpg.Pool) -> AsyncIterator[Stack]:
    """api and worker reading the module's tenant policy; the worker's metrics on METRICS_PORT."""
    from .conftest import dead_redis_url

    policy_file = Path(tempfile.mkdtemp(prefix="opsc-e2e-egress-")) / "tenant_policy.yaml"
    policy_file.write_text(json.dumps(POLICY))
    async with running_stack(
        e2e_dsn,
        dead_redis_url(),
        tenant_policy_file=policy_file,
        OPSC_METRICS_PORT=str(METRICS_PORT),
    ) as running:
        yield running


module_end_checks = inspection.module_end_checks
pytestmark = pytest.mark.usefixtures("module_end_checks")


def get_plan(url: str, *, follow: bool = False) -> dict[str, Any]:
    return plan(
        {
            "id": "fetch",
            "action": "http",
            "action_class": "read",
            "targets": [{"ref": "web"}],
            "params": {"url": url, "follow_redirects": follow},
        }
    )


def via_redirect(server: str, target: str) -> str:
    return f"{server}/redirect/{urllib.parse.quote(target, safe='')}"


async def test_ssrf_to_the_workers_own_metrics_is_refused_at_submit(
    tenant: Tenant, e2e_pool: asyncpg.Pool
) -> None:
    """The attack as reproduced: a read-class GET of http://127.0.0.1:<metrics>/metrics. Now
    PERMISSION_DENIED naming the URL, before anything is written."""
    before = await tenant_row_counts(e2e_pool, tenant.id)
    for host in ("127.0.0.1", "localhost", "2130706433", "[::ffff:127.0.0.1]"):
        async with tenant.client("alice") as client:
            with pytest.raises(PermissionDeniedError) as refused:
                await client.submit(
                    get_plan(f"http://{host}:{METRICS_PORT}/metrics"), tenant_id=tenant.id
                )
        assert refused.value.details["field"] == "steps[0].params.url", host
        assert MARKER not in str(refused.value)
    after = await tenant_row_counts(e2e_pool, tenant.id)
    assert after["executions"] == before["executions"]


async def test_a_tenant_allowed_loopback_reaches_the_allowed_server(
    stack: Stack, e2e_pool: asyncpg.Pool, local_server: str
) -> None:
    """The control: the loopback-allowed tenant's GET of the local server succeeds."""
    tenant = await bound_tenant(LOOPBACK_TENANT, stack, e2e_pool)
    async with tenant.client("alice") as client:
        done = await client.submit(get_plan(f"{local_server}/hello"), tenant_id=tenant.id)
    assert done.status == "succeeded", (done.error_class, done.error_message)
    assert done.steps[0].result is not None
    assert done.steps[0].result["body"] == "hello from the allowed server"


async def test_even_allowed_loopback_cannot_reach_the_workers_own_port(
    stack: Stack, e2e_pool: asyncpg.Pool
) -> None:
    """127.0.0.1 is allowed for this tenant, but the worker's metrics port is the worker's
    own: the api lets it through (not its port), the worker refuses before the first step."""
    tenant = await bound_tenant(LOOPBACK_TENANT, stack, e2e_pool)
    async with tenant.client("alice") as client:
        with pytest.raises(PermissionDeniedError, match="this service's own") as refused:
            await client.submit(
                get_plan(f"http://127.0.0.1:{METRICS_PORT}/metrics"), tenant_id=tenant.id
            )
    assert MARKER not in str(refused.value)


@pytest.mark.parametrize(
    "target",
    [
        f"http://127.0.0.1:{METRICS_PORT}/metrics",
        f"http://localhost:{METRICS_PORT}/metrics",
        "http://127.0.0.2:9/",
        "http://169.254.169.254/latest/meta-data/",
    ],
    ids=["own-metrics", "own-metrics-by-name", "other-loopback", "metadata"],
)
async def test_a_redirect_from_the_allowed_server_is_checked_again(
    stack: Stack, e2e_pool: asyncpg.Pool, local_server: str, target: str
) -> None:
    """The allowed server redirects to the worker's metrics, another loopback address or the
    metadata service: the hop fails the step with EGRESS_DENIED and no metrics in the result."""
    tenant = await bound_tenant(LOOPBACK_TENANT, stack, e2e_pool)
    async with tenant.client("alice") as client:
        done = await client.submit(
            get_plan(via_redirect(local_server, target), follow=True), tenant_id=tenant.id
        )
        fetched = await client.get(done.execution_id, tenant_id=tenant.id)
    assert done.status == "failed"
    assert done.error_class == "EGRESS_DENIED", done.error_message
    assert MARKER not in repr(fetched)
