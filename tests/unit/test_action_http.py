"""The ``http`` built-in against a real HTTP server on 127.0.0.1 (started by these tests)."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from opsconductor.common.actions.base import (
    MAX_RESULT_BYTES,
    ActionContext,
    ActionFailedError,
    ActionTimeoutError,
    result_size_bytes,
)
from opsconductor.common.actions.http import HttpAction
from opsconductor.common.errors import PlanValidationError
from opsconductor.common.masking import REDACTED
from opsconductor.common.plan import ActionClass
from opsconductor.common.secret_catalogue import SecretCatalogue
from opsconductor.common.secrets import EnvSecretProvider, SecretResolver, SecretUse


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


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server(url="")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _ctx(
    params: Mapping[str, Any],
    *,
    timeout_s: float = 30.0,
    record_only: bool = False,
    key: str = "exec-1:step-a",
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
    )


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
        await action.run(_ctx({"url": "http://unreachable.test/"}))


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
