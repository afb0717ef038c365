"""The ``http`` built-in against a real HTTP server on 127.0.0.1 (started by these tests).

Loopback is refused by default (the egress policy), so these tests act as a tenant whose policy
allows 127.0.0.1/32 (``LOOPBACK``); the attack tests show the refusals without it, and on every
redirect hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from opsconductor.actions.base import (
    MAX_RESULT_BYTES,
    ActionContext,
    ActionFailedError,
    ActionTimeoutError,
    result_size_bytes,
)
from opsconductor.actions.http import MAX_REDIRECTS, EgressDeniedError, HttpAction
from opsconductor.common.egress import reserve_local_ports
from opsconductor.common.errors import PlanValidationError
from opsconductor.common.masking import REDACTED
from opsconductor.common.plan import ActionClass
from opsconductor.common.secret_catalogue import SecretCatalogue
from opsconductor.common.secrets import EnvSecretProvider, SecretResolver, SecretUse
from opsconductor.common.tenant_policy import EgressPolicy, TenantPolicy
from tests.tls_material import Authority

#: A tenant allowed to reach 127.0.0.1 (only): what the tests' local servers need.
LOOPBACK = TenantPolicy(egress=EgressPolicy(allow_networks=("127.0.0.1/32",)))
#: The packaged default: public addresses only.
DEFAULT = TenantPolicy()


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Server:
    url: str
    requests: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def wait_for_requests(self, count: int, deadline_s: float = 10.0) -> None:
        deadline = time.monotonic() + deadline_s
        while len(self.requests) < count:
            assert time.monotonic() < deadline, "the server never got the request"
            time.sleep(0.005)


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            server.requests.append(Seen(self.command, self.path, dict(self.headers), body))
            if self.path.startswith("/hang"):
                server.release.wait(30)
                self._reply(200, b"late")
            elif self.path.startswith("/status/"):
                self._reply(int(self.path.rsplit("/", 1)[1]), b"status body")
            elif self.path == "/big":
                self._reply(200, b"b" * 200_000 + b"TAIL")
            elif self.path.startswith("/redirect/"):
                # /redirect/<code>/<url-encoded target>
                _, _, code, target = self.path.split("/", 3)
                self.send_response(int(code))
                self.send_header("Location", urllib.parse.unquote(target))
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/metrics":
                self._reply(200, b"opsc_internal_metric 42\n")
            elif self.path == "/echo":
                self._reply(200, json.dumps(dict(self.headers)).encode(), "application/json")
            else:
                self._reply(200, b"hello")

        def _reply(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _serve

    return Handler


@contextlib.contextmanager
def _serving(host: str) -> Iterator[Server]:
    state = Server(url="")
    httpd = ThreadingHTTPServer((host, 0), _handler(state))
    httpd.daemon_threads = True
    state.url = f"http://{host}:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def server() -> Iterator[Server]:
    with _serving("127.0.0.1") as state:
        yield state


@pytest.fixture
def inner_server() -> Iterator[Server]:
    """Another loopback server (127.0.0.2), outside what ``LOOPBACK`` allows."""
    with _serving("127.0.0.2") as state:
        yield state


def _ctx(
    params: Mapping[str, Any],
    *,
    timeout_s: float = 30.0,
    record_only: bool = False,
    key: str = "exec-1:step-a",
    policy: TenantPolicy = LOOPBACK,
    request_id: str | None = None,
    traceparent: str | None = None,
) -> ActionContext:
    return ActionContext(
        execution_id="exec-1",
        step_id="step-a",
        idempotency_key=key,
        tenant_id="tenant-a",
        targets=("svc-1",),
        params=params,
        timeout_s=timeout_s,
        record_only=record_only,
        cancel_event=asyncio.Event(),
        tenant_policy=policy,
        request_id=request_id,
        traceparent=traceparent,
    )


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_get_sends_the_step_idempotency_key_and_returns_status_and_body(
    server: Server,
) -> None:
    result = await HttpAction().run(_ctx({"url": f"{server.url}/hi"}, key="exec-1:step-a"))
    assert result.output["status"] == 200
    assert result.output["body"] == "hello"
    assert result.output["content_type"] == "text/plain"
    assert result.output["elapsed_ms"] >= 0
    assert not result.truncated
    (seen,) = server.requests
    assert (seen.method, seen.path) == ("GET", "/hi")
    assert seen.headers["Idempotency-Key"] == "exec-1:step-a"


async def test_the_submits_request_id_goes_out_as_x_request_id(server: Server) -> None:
    await HttpAction().run(_ctx({"url": server.url}, request_id="req-42"))
    await HttpAction().run(_ctx({"url": server.url}))
    with_id, without = server.requests
    assert with_id.headers["X-Request-Id"] == "req-42"
    assert "X-Request-Id" not in without.headers


async def test_the_step_spans_trace_context_goes_out_as_traceparent(server: Server) -> None:
    await HttpAction().run(_ctx({"url": server.url}, request_id="r-1", traceparent=TRACEPARENT))
    await HttpAction().run(_ctx({"url": server.url}))
    traced, untraced = server.requests
    assert traced.headers["traceparent"] == TRACEPARENT
    assert traced.headers["X-Request-Id"] == "r-1"
    assert "traceparent" not in untraced.headers


async def test_every_attempt_of_a_step_sends_the_same_key(server: Server) -> None:
    for _ in range(3):
        await HttpAction().run(_ctx({"url": server.url}, key="exec-5:restart"))
    assert {r.headers["Idempotency-Key"] for r in server.requests} == {"exec-5:restart"}


async def test_post_json_body_and_custom_headers(server: Server) -> None:
    await HttpAction().run(
        _ctx(
            {
                "method": "post",
                "url": f"{server.url}/things",
                "headers": {"X-Team": "ops"},
                "body": {"name": "svc", "replicas": 3},
            }
        )
    )
    (seen,) = server.requests
    assert seen.method == "POST"
    assert json.loads(seen.body) == {"name": "svc", "replicas": 3}
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["X-Team"] == "ops"


async def test_string_body_is_sent_as_is(server: Server) -> None:
    await HttpAction().run(_ctx({"method": "PUT", "url": server.url, "body": "raw text"}))
    assert server.requests[0].body == b"raw text"


async def test_head_request(server: Server) -> None:
    result = await HttpAction().run(_ctx({"method": "HEAD", "url": server.url}))
    assert result.output["status"] == 200
    assert result.output["body"] == ""


async def test_secret_header_is_sent_and_masked_when_echoed_back(server: Server) -> None:
    value = "http-" + secrets.token_hex(10)
    catalogue = SecretCatalogue.from_document(
        {"tenants": {"tenant-a": {"env:UPSTREAM": {"http": [f"{server.url}/echo"]}}}}
    )
    resolver = SecretResolver(
        [EnvSecretProvider({"OPSC_SECRET_TENANT_A__UPSTREAM": value})], catalogue
    )
    params = {
        "url": f"{server.url}/echo",
        "headers": {"X-Upstream-Auth": {"$secret": "env:UPSTREAM"}},
    }
    assert HttpAction().validate(params) == []
    resolved, _ = resolver.resolve_params(params, SecretUse("tenant-a", "http", params["url"]))
    result = await HttpAction().run(_ctx(resolved))
    assert server.requests[0].headers["X-Upstream-Auth"] == value
    assert value not in json.dumps(result.output)
    assert REDACTED in result.output["body"]


async def test_unexpected_status_is_an_action_failure_with_the_code(server: Server) -> None:
    with pytest.raises(ActionFailedError) as info:
        await HttpAction().run(_ctx({"url": f"{server.url}/status/503"}))
    assert info.value.details == {"status": 503}
    assert "status 503, expected 2xx" in str(info.value)
    assert info.value.output is not None
    assert info.value.output.output["body"] == "status body"


async def test_expected_status_accepts_an_int_or_a_list(server: Server) -> None:
    ok = await HttpAction().run(_ctx({"url": f"{server.url}/status/404", "expected_status": 404}))
    assert ok.output["status"] == 404
    listed = await HttpAction().run(
        _ctx({"url": f"{server.url}/status/409", "expected_status": [200, 409]})
    )
    assert listed.output["status"] == 409
    with pytest.raises(ActionFailedError, match=r"expected \[201\]"):
        await HttpAction().run(_ctx({"url": server.url, "expected_status": [201]}))


async def test_large_body_is_truncated_to_the_result_limit(server: Server) -> None:
    result = await HttpAction().run(_ctx({"url": f"{server.url}/big"}))
    assert result.truncated
    assert result.output["body_bytes_read"] == 64 * 1024
    assert result_size_bytes(result.output) <= MAX_RESULT_BYTES


async def test_a_hanging_server_times_out(server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(ActionTimeoutError) as info:
        await HttpAction().run(_ctx({"url": f"{server.url}/hang", "timeout_s": 0.3}))
    assert time.monotonic() - started < 5
    assert isinstance(info.value, TimeoutError)
    assert info.value.details == {"timeout_s": 0.3, "budget_exhausted": False}


async def test_the_step_budget_caps_the_request_timeout(server: Server) -> None:
    with pytest.raises(ActionTimeoutError) as info:
        await HttpAction().run(_ctx({"url": f"{server.url}/hang"}, timeout_s=0.2))
    assert info.value.details == {"timeout_s": 0.2, "budget_exhausted": True}


async def test_cancel_abandons_the_request(server: Server) -> None:
    ctx = _ctx({"url": f"{server.url}/hang"})
    task = asyncio.create_task(HttpAction().run(ctx))
    await asyncio.to_thread(server.wait_for_requests, 1)
    ctx.cancel_event.set()
    result = await task
    assert result.cancelled


async def test_connection_refused_is_an_action_failure() -> None:
    with pytest.raises(ActionFailedError) as info:
        await HttpAction().run(_ctx({"url": f"http://127.0.0.1:{_closed_port()}/"}))
    assert info.value.details["error_class"] == "ConnectError"
    assert not isinstance(info.value, TimeoutError)


async def test_transport_timeouts_are_action_timeouts() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("slow network", request=request)

    action = HttpAction(transport=httpx.MockTransport(refuse))
    with pytest.raises(ActionTimeoutError, match="ConnectTimeout"):
        await action.run(_ctx({"url": "http://1.1.1.1/"}))


async def test_record_only_sends_nothing(server: Server) -> None:
    value = "rec-" + secrets.token_hex(8)
    result = await HttpAction().run(
        _ctx(
            {
                "method": "DELETE",
                "url": f"{server.url}/things/1",
                "headers": {"X-Auth": value},
                "body": {"k": value},
            },
            record_only=True,
        )
    )
    assert server.requests == []
    assert result.output == {
        "record_only": True,
        "would_run": {
            "action": "http",
            "method": "DELETE",
            "url": f"{server.url}/things/1",
            "header_names": ["X-Auth"],
            "has_body": True,
        },
    }


async def test_unresolved_references_are_never_sent(server: Server) -> None:
    with pytest.raises(PlanValidationError, match="not resolved"):
        await HttpAction().run(_ctx({"url": server.url, "headers": {"A": {"$secret": "env:A"}}}))
    with pytest.raises(PlanValidationError, match="not resolved"):
        await HttpAction().run(_ctx({"url": server.url, "body": {"a": [{"$secret": "env:A"}]}}))
    assert server.requests == []


def test_required_class_follows_the_method() -> None:
    action = HttpAction()
    for method in ("GET", "head", "OPTIONS"):
        assert action.required_action_class({"method": method}) is ActionClass.READ
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        assert action.required_action_class({"method": method}) is ActionClass.MODIFY
    assert action.required_action_class({}) is ActionClass.READ
    assert action.estimate_ms({}, 10) == 500


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "params.url"),
        ({"url": "ftp://host/x"}, "params.url"),
        ({"url": "/relative"}, "params.url"),
        ({"url": "http://"}, "params.url"),
        ({"url": "http://[::1"}, "params.url"),
        ({"url": "http://a b/"}, "params.url"),
        ({"url": "https://user:pw@host/"}, "params.url"),
        ({"url": "https://h/", "method": "TRACE"}, "params.method"),
        ({"url": "https://h/", "method": 5}, "params.method"),
        ({"url": "https://h/", "headers": {"Bad Name": "x"}}, "params.headers"),
        (
            {"url": "https://h/", "headers": {"Idempotency-Key": "x"}},
            "params.headers.Idempotency-Key",
        ),
        ({"url": "https://h/", "headers": {"Host": "x"}}, "params.headers.Host"),
        (
            {"url": "https://h/", "headers": {"x-request-id": "forged"}},
            "params.headers.x-request-id",
        ),
        (
            {"url": "https://h/", "headers": {"Traceparent": TRACEPARENT}},
            "params.headers.Traceparent",
        ),
        (
            {"url": "https://h/", "headers": {"tracestate": "vendor=x"}},
            "params.headers.tracestate",
        ),
        ({"url": "https://h/", "headers": {"X": "a\r\nInjected: 1"}}, "params.headers.X"),
        ({"url": "https://h/", "headers": {"X": 5}}, "params.headers.X"),
        ({"url": "https://h/", "headers": ["X"]}, "params.headers"),
        ({"url": "https://h/", "expected_status": 99}, "params.expected_status"),
        ({"url": "https://h/", "expected_status": []}, "params.expected_status"),
        ({"url": "https://h/", "expected_status": [200, True]}, "params.expected_status"),
        ({"url": "https://h/", "timeout_s": 0}, "params.timeout_s"),
        ({"url": "https://h/", "timeout_s": 301}, "params.timeout_s"),
        ({"url": "https://h/", "follow_redirects": "yes"}, "params.follow_redirects"),
        ({"url": "https://h/", "verify": False}, "params.verify"),
    ],
)
def test_http_validation(params: dict[str, Any], field: str) -> None:
    assert [v.field for v in HttpAction().validate(params)] == [field]


def test_too_many_headers_are_refused() -> None:
    headers = {f"X-{i}": "v" for i in range(65)}
    fields = [v.field for v in HttpAction().validate({"url": "https://h/", "headers": headers})]
    assert fields == ["params.headers"]


def test_secret_references_allowed_in_headers_and_body() -> None:
    params = {
        "url": "https://h/",
        "method": "POST",
        "headers": {"Authorization": {"$secret": "env:TOKEN"}},
        "body": {"password": {"$secret": "file:db_password"}},
    }
    assert HttpAction().validate(params) == []


# -- egress: the attacks of issue 8, finding 3, and what stays allowed ------------------------


def _redirect(server: Server, code: int, target: str) -> str:
    return f"{server.url}/redirect/{code}/{urllib.parse.quote(target, safe='')}"


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "localhost.", "LocalHost", "2130706433", "0x7f.1", "127.1",
     "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::1]", "sub.localhost"],
)  # fmt: skip
async def test_loopback_in_any_spelling_is_refused_without_the_policy(
    server: Server, host: str
) -> None:
    port = server.url.rsplit(":", 1)[1]
    with pytest.raises(EgressDeniedError, match="loopback address") as info:
        await HttpAction().run(_ctx({"url": f"http://{host}:{port}/metrics"}, policy=DEFAULT))
    assert info.value.reason == "EGRESS_DENIED"
    assert server.requests == []


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://10.1.2.3/", "private"),
        ("http://172.16.0.1/", "private"),
        ("http://192.168.1.1/", "private"),
        ("http://100.64.0.1/", r"shared \(CGNAT\)"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://[::]/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("http://[fd00::1]/", "private"),
        ("http://[64:ff9b::a9fe:a9fe]/", "link-local"),
        ("http://[2002:7f00:1::]/", "loopback"),
    ],
)
async def test_non_public_addresses_are_refused_before_any_connection(url: str, kind: str) -> None:
    with pytest.raises(EgressDeniedError, match=kind):
        await HttpAction().run(_ctx({"url": url}, policy=DEFAULT, timeout_s=2.0))


def test_a_host_the_client_cannot_parse_is_refused_by_validation() -> None:
    """Octal dotted forms are no valid IPv4 address for httpx (and would resolve to loopback)."""
    assert [v.field for v in HttpAction().validate({"url": "http://0177.0.0.1/"})] == ["params.url"]


async def test_the_submit_check_refuses_literal_non_public_hosts() -> None:
    action = HttpAction()
    for url in ("http://127.0.0.1:9102/metrics", "http://localhost/", "http://2130706433/"):
        [violation] = action.policy_violations({"url": url}, DEFAULT)
        assert violation.field == "params.url"
        assert "egress.allow_networks" in violation.description
    assert action.policy_violations({"url": "http://127.0.0.1/"}, LOOPBACK) == []
    # Names are resolved (and checked) by the worker; bad URLs are validate()'s business.
    assert action.policy_violations({"url": "https://api.example.com/"}, DEFAULT) == []
    assert action.policy_violations({"url": "http://[::1"}, DEFAULT) == []
    assert action.policy_violations({}, DEFAULT) == []


async def test_ssrf_to_the_services_own_port_is_refused_even_when_loopback_is_allowed(
    server: Server,
) -> None:
    """The worker's /metrics stands in for every listener of the process (reserved ports)."""
    port = int(server.url.rsplit(":", 1)[1])
    reserve_local_ports([port])
    try:
        with pytest.raises(EgressDeniedError, match="this service's own"):
            await HttpAction().run(_ctx({"url": f"{server.url}/metrics"}))
    finally:
        from opsconductor.common import egress

        egress._reserved.discard(port)
    assert server.requests == []


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
async def test_a_redirect_from_an_allowed_server_to_another_address_is_refused(
    server: Server, inner_server: Server, code: int
) -> None:
    """127.0.0.1 is allowed, 127.0.0.2 is not: the hop is checked like the first request."""
    url = _redirect(server, code, f"{inner_server.url}/metrics")
    with pytest.raises(EgressDeniedError, match="loopback"):
        await HttpAction().run(_ctx({"url": url, "follow_redirects": True}))
    assert len(server.requests) == 1
    assert inner_server.requests == []


async def test_a_redirect_to_the_metadata_service_is_refused(server: Server) -> None:
    url = _redirect(server, 302, "http://169.254.169.254/latest/meta-data/iam/")
    with pytest.raises(EgressDeniedError, match="link-local"):
        await HttpAction().run(_ctx({"url": url, "follow_redirects": True}))


async def test_allowed_redirects_are_followed_and_the_host_header_is_the_urls(
    server: Server,
) -> None:
    """Connected to the checked address, the request still names the URL's host."""
    port = server.url.rsplit(":", 1)[1]
    url = _redirect(server, 302, f"http://localhost:{port}/echo")
    result = await HttpAction().run(_ctx({"url": url, "follow_redirects": True}))
    assert result.output["status"] == 200
    assert server.requests[1].path == "/echo"
    assert server.requests[1].headers["Host"] == f"localhost:{port}"
    assert server.requests[0].headers["Host"] == f"127.0.0.1:{port}"


async def test_without_follow_redirects_the_3xx_is_the_answer(server: Server) -> None:
    url = _redirect(server, 302, "http://169.254.169.254/")
    result = await HttpAction().run(_ctx({"url": url, "expected_status": 302}))
    assert result.output["status"] == 302
    assert len(server.requests) == 1


async def test_a_cross_origin_redirect_drops_the_plans_headers(server: Server) -> None:
    """The plan's headers (secrets allowed for the first destination) stay behind; the
    idempotency key goes on."""
    port = server.url.rsplit(":", 1)[1]
    url = _redirect(server, 302, f"http://localhost:{port}/echo")
    await HttpAction().run(
        _ctx(
            {"url": url, "follow_redirects": True, "headers": {"X-Token": "abc-secretish"}},
            request_id="req-7",
            traceparent=TRACEPARENT,
        )
    )
    first, second = server.requests
    assert first.headers["X-Token"] == "abc-secretish"
    assert "X-Token" not in second.headers
    assert second.headers["Idempotency-Key"] == "exec-1:step-a"
    assert second.headers["X-Request-Id"] == "req-7"
    assert first.headers["traceparent"] == second.headers["traceparent"] == TRACEPARENT


async def test_a_same_origin_redirect_keeps_headers_and_303_turns_post_into_get(
    server: Server,
) -> None:
    url = _redirect(server, 303, f"{server.url}/echo")
    await HttpAction().run(
        _ctx(
            {
                "method": "POST",
                "url": url,
                "body": {"a": 1},
                "follow_redirects": True,
                "headers": {"X-Team": "ops"},
            }
        )
    )
    first, second = server.requests
    assert (first.method, second.method) == ("POST", "GET")
    assert second.headers["X-Team"] == "ops"
    assert second.body == b""


async def test_a_307_with_a_body_to_another_origin_is_not_resent(server: Server) -> None:
    port = server.url.rsplit(":", 1)[1]
    url = _redirect(server, 307, f"http://localhost:{port}/echo")
    with pytest.raises(ActionFailedError, match="another origin with a body"):
        await HttpAction().run(
            _ctx({"method": "PUT", "url": url, "body": "x", "follow_redirects": True})
        )
    assert len(server.requests) == 1


async def test_redirect_loops_stop_after_the_hop_limit(server: Server) -> None:
    loop_url = f"{server.url}/redirect/302/{urllib.parse.quote(server.url + '/x', safe='')}"
    # Each hop points at a URL that redirects again: build a chain longer than the limit.
    url = loop_url
    for _ in range(MAX_REDIRECTS + 1):
        url = _redirect(server, 302, url)
    with pytest.raises(ActionFailedError, match=f"more than {MAX_REDIRECTS} redirects"):
        await HttpAction().run(_ctx({"url": url, "follow_redirects": True}))
    assert len(server.requests) == MAX_REDIRECTS + 1


async def test_an_unresolvable_host_is_a_connect_error() -> None:
    with pytest.raises(ActionFailedError) as info:
        await HttpAction().run(_ctx({"url": "http://no-such-host.invalid/"}, timeout_s=10.0))
    assert info.value.details["error_class"] == "ConnectError"


async def test_a_non_ascii_secret_header_fails_without_quoting_it(server: Server) -> None:
    """httpx's UnicodeEncodeError would quote the character; the action names the header."""
    value = "p\u00e4ss-" + secrets.token_hex(6)
    with pytest.raises(ActionFailedError, match="header X-Auth is not ASCII") as info:
        await HttpAction().run(_ctx({"url": server.url, "headers": {"X-Auth": value}}))
    text = str(info.value) + repr(info.value.details)
    assert "\u00e4" not in text
    assert "\\xe4" not in text
    assert value not in text
    assert server.requests == []


# -- TLS to a pinned address: SNI and the certificate check use the URL's host ----------------


@contextlib.contextmanager
def _serving_tls(folder: Path, sni_seen: list[str | None]) -> Iterator[Server]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "tls.crt", folder / "tls.key")

    def remember(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        sni_seen.append(name)

    context.sni_callback = remember  # type: ignore[assignment]
    state = Server(url="")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    httpd.daemon_threads = True
    state.url = f"https://localhost:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _trusting(folder: Path) -> HttpAction:
    verify = ssl.create_default_context(cafile=str(folder / "ca.crt"))
    return HttpAction(transport=httpx.AsyncHTTPTransport(verify=verify))


async def test_https_to_the_pinned_address_sends_the_urls_host_as_sni(tmp_path: Path) -> None:
    """Connected to 127.0.0.1 (the checked address), TLS still names ``localhost``."""
    folder = Authority.create().issue(tmp_path / "tls", "localhost")
    sni_seen: list[str | None] = []
    with _serving_tls(folder, sni_seen) as state:
        result = await _trusting(folder).run(_ctx({"url": f"{state.url}/echo"}))
    assert result.output["status"] == 200
    assert sni_seen == ["localhost"]
    assert state.requests[0].headers["Host"] == state.url.removeprefix("https://")


async def test_the_certificate_is_checked_against_the_urls_host_not_the_address(
    tmp_path: Path,
) -> None:
    """A certificate valid for 127.0.0.1 (the address dialled) but not for ``localhost`` (the
    URL's host) is refused: pinning the address does not weaken the hostname check."""
    folder = Authority.create().issue(tmp_path / "tls", "other.example")
    with _serving_tls(folder, []) as state, pytest.raises(ActionFailedError) as info:
        await _trusting(folder).run(_ctx({"url": f"{state.url}/echo"}))
    assert info.value.details["error_class"] == "ConnectError"
    assert state.requests == []


async def test_a_name_is_checked_after_resolution(server: Server) -> None:
    """This machine's own host name resolves (through the system resolver) to loopback:
    refused without the policy, reached with it, the Host header still the name."""
    name = socket.gethostname()
    port = server.url.rsplit(":", 1)[1]
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(name, None)}
    except OSError:
        resolved = set()
    if resolved != {"127.0.0.1"}:
        pytest.skip(f"{name} does not resolve to 127.0.0.1 only here ({sorted(resolved)})")
    with pytest.raises(EgressDeniedError, match="loopback"):
        await HttpAction().run(_ctx({"url": f"http://{name}:{port}/echo"}, policy=DEFAULT))
    assert server.requests == []
    result = await HttpAction().run(_ctx({"url": f"http://{name}:{port}/echo"}))
    assert result.output["status"] == 200
    assert server.requests[0].headers["Host"] == f"{name}:{port}"


async def test_the_request_goes_to_the_address_that_was_checked(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resolution happens once per hop, here, and httpx is handed the checked address: a name
    no real DNS knows reaches the local server, so httpx never resolved it (a second answer,
    as in DNS rebinding, could not have moved the request)."""
    calls: list[str] = []

    async def resolver(host: str, port: object, **kwargs: object) -> list[Any]:
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "getaddrinfo", resolver)
    port = server.url.rsplit(":", 1)[1]
    result = await HttpAction().run(_ctx({"url": f"http://rebind.invalid:{port}/echo"}))
    assert result.output["status"] == 200
    assert calls == ["rebind.invalid"]
    assert server.requests[0].headers["Host"] == f"rebind.invalid:{port}"
