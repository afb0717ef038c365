"""The ``http`` action: one HTTP request with httpx, checked against the expected status.

Params::

    method           GET (default), HEAD, OPTIONS (class read) or POST, PUT, PATCH, DELETE (modify)
    url              absolute http(s) URL without credentials (required; URLs are logged and
                     stored, so a secret belongs in a header)
    headers          {name: value}; a value may be a secret reference
    body             a string (sent as is) or any JSON value (sent as JSON); may hold references
    expected_status  an integer or a list of them; default any 2xx
    timeout_s        whole-request limit in seconds (default 30, at most 300), further capped
                     by the step's remaining budget
    follow_redirects false by default; when true, at most 5 hops, each checked like the first

**Egress** (``opsconductor.common.egress``, docs/security.md "Egress policy for http"): the host
is resolved here, every address it resolves to must be allowed for the tenant (public, or in
its ``egress.allow_networks``; never this service's own ports on a non-public address), and the
request goes to that checked address, keeping the ``Host`` header and the TLS server name (SNI
and certificate check) of the URL — so a DNS answer cannot change between check and connect.
Redirects are followed here, not by httpx: every hop is resolved and checked again; a hop to
another origin (scheme, host or port) drops the plan's headers and body (they may hold secrets
allowed for the first destination only), and a 307/308 to another origin with a body fails.
A refusal fails the step with ``EGRESS_DENIED``; the api already refuses URLs whose host is a
non-public IP literal or ``localhost`` at submit (``policy_violations``).

Every request carries ``Idempotency-Key: <execution_id>:<step_id>``, identical on each attempt
of the step, so a receiver that honours it applies a retried step once. The result holds the
status, the time taken and an excerpt of the body (masked, truncated). Environment proxy
settings are not used (``trust_env=False``): a worker sends its requests where plans say.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from opsconductor.actions.base import (
    ActionContext,
    ActionFailedError,
    ActionResult,
    ActionTimeoutError,
    decode_output,
    fit_text,
    record_only_result,
)
from opsconductor.actions.params import ParamReader, require_text
from opsconductor.common.egress import IpAddress, IpNetwork, egress_problem, literal_address
from opsconductor.common.errors import FieldViolation, PlanValidationError
from opsconductor.common.plan import ActionClass
from opsconductor.common.secrets import find_secret_refs
from opsconductor.common.tenant_policy import TenantPolicy

__all__ = ["MAX_REDIRECTS", "EgressDeniedError", "HttpAction"]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
METHODS = SAFE_METHODS | {"POST", "PUT", "PATCH", "DELETE"}
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: The submit's request id, so the system acted upon can correlate with our logs.
REQUEST_ID_HEADER = "X-Request-Id"
#: The W3C trace context of the step's span, so the system acted upon joins the trace.
TRACEPARENT_HEADER = "traceparent"
#: Set by this handler or by httpx; a plan may not override them (``tracestate`` belongs to
#: the trace context too: a plan's would pair with our traceparent).
_RESERVED_HEADERS = frozenset(
    {
        "idempotency-key",
        "x-request-id",
        "traceparent",
        "tracestate",
        "host",
        "content-length",
        "transfer-encoding",
    }
)
_OWN_HEADERS = (IDEMPOTENCY_HEADER, REQUEST_ID_HEADER, TRACEPARENT_HEADER)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")
_MAX_URL_LENGTH = 2048
_MAX_HEADERS = 64
_MAX_HEADER_VALUE = 8192
_DEFAULT_TIMEOUT_S = 30.0
_MAX_TIMEOUT_S = 300.0
#: Bytes of the response body read at most; the excerpt in the result is smaller still.
_READ_CAP = 64 * 1024
_BODY_EXCERPT_BYTES = 4096
MAX_REDIRECTS = 5
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}


class EgressDeniedError(ActionFailedError):
    """The request (or a redirect hop) would reach an address the tenant may not reach."""

    reason = "EGRESS_DENIED"


@dataclass(frozen=True)
class _Request:
    method: str
    url: str
    headers: Mapping[str, Any]
    body: Any
    expected: frozenset[int] | None
    timeout_s: float
    follow_redirects: bool


def _url_problem(url: str) -> str | None:
    shape = f"must be an absolute http(s) URL of at most {_MAX_URL_LENGTH} characters"
    if len(url) > _MAX_URL_LENGTH or not all(c.isprintable() and c != " " for c in url):
        return f"{shape}, without whitespace or control characters"
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return shape
    if parts.scheme.lower() not in {"http", "https"} or not host:
        return shape
    if parts.username is not None or parts.password is not None:
        return "must not contain credentials; put them in a header as a secret reference"
    try:
        httpx.URL(url)  # stricter than urlsplit: e.g. "0177.0.0.1" is no valid IPv4 address
    except httpx.InvalidURL:
        return shape
    return None


def _parse(params: Mapping[str, Any]) -> tuple[_Request, ParamReader]:
    reader = ParamReader(
        params,
        allowed={
            "method",
            "url",
            "headers",
            "body",
            "expected_status",
            "timeout_s",
            "follow_redirects",
        },
    )
    method = reader.text("method", max_length=16)
    if method is not None and (not isinstance(method, str) or method.upper() not in METHODS):
        reader.add("method", f"must be one of {sorted(METHODS)}")
        method = None
    url = reader.text("url", required=True, max_length=_MAX_URL_LENGTH)
    if isinstance(url, str) and (problem := _url_problem(url)):
        reader.add("url", problem)
    headers = reader.mapping("headers")
    if len(headers) > _MAX_HEADERS:
        reader.add("headers", f"at most {_MAX_HEADERS} headers")
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name):
            reader.add("headers", "header names are HTTP tokens (letters, digits, -, ...)")
        elif name.lower() in _RESERVED_HEADERS:
            reader.add(f"headers.{name}", "is set by the worker and cannot be given")
        else:
            checked = reader.text_value(
                value, f"headers.{name}", max_length=_MAX_HEADER_VALUE, secret_ok=True
            )
            if isinstance(checked, str) and any(c in checked for c in "\r\n\x00"):
                reader.add(f"headers.{name}", "must not contain line breaks or NUL")
    expected = _expected_status(reader)
    timeout_s = reader.number(
        "timeout_s",
        default=_DEFAULT_TIMEOUT_S,
        minimum=0,
        maximum=_MAX_TIMEOUT_S,
        exclusive_minimum=True,
    )
    request = _Request(
        method=(method if isinstance(method, str) else "GET").upper(),
        url=url if isinstance(url, str) else "",
        headers=headers,
        body=params.get("body"),
        expected=expected,
        timeout_s=timeout_s or _DEFAULT_TIMEOUT_S,
        follow_redirects=reader.boolean("follow_redirects", default=False),
    )
    return request, reader


def _expected_status(reader: ParamReader) -> frozenset[int] | None:
    value = reader.params.get("expected_status")
    if value is None:
        return None
    codes = value if isinstance(value, list) else [value]
    if (
        not codes
        or len(codes) > 64
        or not all(
            isinstance(c, int) and not isinstance(c, bool) and 100 <= c <= 599 for c in codes
        )
    ):
        reader.add("expected_status", "must be a status code (100-599) or a list of them")
        return None
    return frozenset(codes)


class HttpAction:
    """Sends one HTTP request (see the module docstring for params and behaviour).

    ``transport`` is a seam for tests and for operators who need a custom one (mTLS...).
    """

    name = "http"
    min_action_class = ActionClass.READ

    def __init__(self, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._transport = transport

    def required_action_class(self, params: Mapping[str, Any]) -> ActionClass:
        """``read`` for GET, HEAD and OPTIONS; ``modify`` for methods that change things."""
        method = params.get("method", "GET")
        if isinstance(method, str) and method.upper() in SAFE_METHODS:
            return ActionClass.READ
        return ActionClass.MODIFY

    def estimate_ms(self, params: Mapping[str, Any], target_count: int) -> int:
        """Half a second: one request, whatever the targets."""
        return 500

    def policy_violations(
        self, params: Mapping[str, Any], policy: TenantPolicy
    ) -> list[FieldViolation]:
        """A URL whose host is a non-public IP literal or ``localhost`` the policy does not
        allow, refused at submit (names resolve in the worker, which checks them again)."""
        url = params.get("url")
        try:
            parts = urlsplit(url) if isinstance(url, str) else None
            host, port = (parts.hostname, parts.port) if parts is not None else (None, None)
        except ValueError:
            return []  # validate() reports the URL itself
        address = literal_address(host) if host else None
        if address is None or parts is None:
            return []
        scheme = parts.scheme.lower()
        problem = egress_problem(
            address, port or _DEFAULT_PORTS.get(scheme, 0), policy.egress.networks
        )
        return [] if problem is None else [FieldViolation("params.url", problem)]

    def secret_destination(self, params: Mapping[str, Any]) -> str | None:
        """The URL: where the secret catalogue must allow this step's secrets to go."""
        url = params.get("url")
        return url if isinstance(url, str) else None

    def validate(self, params: Mapping[str, Any]) -> list[FieldViolation]:
        """Check method, URL, headers, expected status and timeout (see the module docstring)."""
        return _parse(params)[1].violations

    async def run(self, ctx: ActionContext) -> ActionResult:
        """Send the request; fail on an unexpected status, on a network error or on timeout."""
        request, reader = _parse(ctx.params)
        reader.raise_if_invalid()
        if ctx.record_only:
            return record_only_result(
                {
                    "action": self.name,
                    "method": request.method,
                    "url": request.url,
                    "header_names": sorted(request.headers),
                    "has_body": request.body is not None,
                }
            )
        headers = {
            name: require_text(value, f"params.headers.{name}")
            for name, value in request.headers.items()
        }
        headers[IDEMPOTENCY_HEADER] = ctx.idempotency_key
        if ctx.request_id:
            headers[REQUEST_ID_HEADER] = ctx.request_id
        if ctx.traceparent:
            headers[TRACEPARENT_HEADER] = ctx.traceparent
        for name, value in headers.items():
            if not value.isascii():
                # httpx would raise a UnicodeEncodeError quoting the character: a piece of
                # what may be a secret. Name the header only.
                raise ActionFailedError(
                    f"header {name} is not ASCII text (after resolving secrets); HTTP header "
                    "values must be, so store the secret encoded (e.g. base64)",
                    output={"error_class": "NonAsciiHeader"},
                )
        if find_secret_refs(request.body, path="params.body"):
            raise PlanValidationError.for_field(
                "params.body", "secret reference was not resolved before the run"
            )
        timeout_s = max(0.0, min(request.timeout_s, ctx.timeout_s))
        started = time.monotonic()
        async with httpx.AsyncClient(
            transport=self._transport,
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=False,
            trust_env=False,
        ) as client:
            sending = asyncio.create_task(
                _send(client, request, headers, ctx.tenant_policy.egress.networks)
            )
            cancelled = asyncio.create_task(ctx.cancel_event.wait())
            try:
                await asyncio.wait(
                    {sending, cancelled}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for task in (sending, cancelled):
                    if not task.done():
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
        elapsed_ms = round((time.monotonic() - started) * 1000)
        if not sending.done() or sending.cancelled():
            if ctx.cancel_event.is_set():
                return ActionResult({"cancelled": True, "elapsed_ms": elapsed_ms})
            raise ActionTimeoutError(
                f"HTTP {request.method} did not complete within {timeout_s:g} s",
                output={"elapsed_ms": elapsed_ms},
                timeout_s=timeout_s,
                budget_exhausted=timeout_s >= ctx.timeout_s,
            )
        return _check(request, sending, elapsed_ms, timeout_s, timeout_s >= ctx.timeout_s)


async def _resolve(host: str, port: int) -> list[IpAddress]:
    """Every address ``host`` stands for (literals without DNS), in resolver order."""
    literal = literal_address(host)
    if literal is not None:
        return [literal]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise httpx.ConnectError(f"cannot resolve host {host!r}") from exc
    found: list[IpAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    return found


async def _pinned(
    url: httpx.URL, networks: tuple[IpNetwork, ...]
) -> tuple[httpx.URL, str, dict[str, Any]]:
    """``url`` aimed at one checked address, its ``Host`` header and the TLS extensions.

    Every address the host resolves to must pass `egress_problem`: a mixed answer (one public,
    one private) is refused rather than tried in turn.
    """
    host = url.host
    port = url.port or _DEFAULT_PORTS[url.scheme]
    addresses = await _resolve(host, port)
    if not addresses:
        raise httpx.ConnectError(f"cannot resolve host {host!r}")
    for address in addresses:
        problem = egress_problem(address, port, networks)
        if problem is not None:
            raise EgressDeniedError(
                f"HTTP request to {host} refused by the egress policy: {problem}",
                output={"error_class": EgressDeniedError.reason, "host": host},
            )
    extensions: dict[str, Any] = {}
    if url.scheme == "https":
        # The certificate is checked against the URL's host, not the address dialled.
        extensions["sni_hostname"] = host
    return url.copy_with(host=str(addresses[0])), url.netloc.decode("ascii"), extensions


def _same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host, a.port or _DEFAULT_PORTS[a.scheme]) == (
        b.scheme,
        b.host,
        b.port or _DEFAULT_PORTS[b.scheme],
    )


def _redirect_target(url: httpx.URL, response: httpx.Response) -> httpx.URL | None:
    location = response.headers.get("location")
    if response.status_code not in _REDIRECT_CODES or not location:
        return None
    try:
        target = url.join(location)
    except httpx.InvalidURL:
        return None
    return target if target.scheme in _DEFAULT_PORTS and target.host else None


async def _send(
    client: httpx.AsyncClient,
    request: _Request,
    headers: dict[str, str],
    networks: tuple[IpNetwork, ...],
) -> tuple[httpx.Response, bytes, bool]:
    """The final response, up to ``_READ_CAP`` bytes of its body, and whether more was left.

    Redirects (when asked for) are followed here, each hop checked like the first.
    """
    url = httpx.URL(request.url)
    method, body, sent_headers = request.method, request.body, dict(headers)
    plan_headers = {name for name in headers if name not in _OWN_HEADERS}
    for hop in range(MAX_REDIRECTS + 1):
        target, host_header, extensions = await _pinned(url, networks)
        content = body if isinstance(body, str) else None
        payload = None if body is None or isinstance(body, str) else body
        async with client.stream(
            method,
            target,
            headers={**sent_headers, "Host": host_header},
            content=content,
            json=payload,
            extensions=extensions,
        ) as response:
            following = _redirect_target(url, response) if request.follow_redirects else None
            if following is None:
                return await _read(response)
        if hop == MAX_REDIRECTS:
            break
        if response.status_code == 303 or (response.status_code in (301, 302) and method == "POST"):
            method = "GET" if method != "HEAD" else method
            body = None
        if not _same_origin(url, following):
            if body is not None:
                raise ActionFailedError(
                    f"HTTP {method} redirected to another origin with a body; not resent",
                    output={"status": response.status_code},
                )
            # The plan's headers may hold secrets allowed for the first destination only.
            sent_headers = {k: v for k, v in sent_headers.items() if k not in plan_headers}
        url = following
    raise ActionFailedError(
        f"HTTP {request.method} followed more than {MAX_REDIRECTS} redirects",
        output={"redirects": MAX_REDIRECTS},
    )


async def _read(response: httpx.Response) -> tuple[httpx.Response, bytes, bool]:
    data = bytearray()
    more = False
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) > _READ_CAP:
            more = True
            break
    return response, bytes(data[:_READ_CAP]), more


def _check(
    request: _Request,
    sending: asyncio.Task[tuple[httpx.Response, bytes, bool]],
    elapsed_ms: int,
    timeout_s: float,
    budget_exhausted: bool,
) -> ActionResult:
    try:
        response, data, more = sending.result()
    except httpx.TimeoutException as exc:
        raise ActionTimeoutError(
            f"HTTP {request.method} timed out after {timeout_s:g} s ({type(exc).__name__})",
            output={"elapsed_ms": elapsed_ms},
            timeout_s=timeout_s,
            budget_exhausted=budget_exhausted,
        ) from exc
    except httpx.HTTPError as exc:
        raise ActionFailedError(
            f"HTTP {request.method} failed: {type(exc).__name__}: {exc}",
            output={"elapsed_ms": elapsed_ms, "error_class": type(exc).__name__},
            error_class=type(exc).__name__,
        ) from exc
    excerpt, cut = fit_text(decode_output(data), _BODY_EXCERPT_BYTES)
    output: dict[str, Any] = {
        "status": response.status_code,
        "elapsed_ms": elapsed_ms,
        "content_type": response.headers.get("content-type", ""),
        "body": excerpt,
        "body_bytes_read": len(data),
    }
    if more or cut:
        output["truncated"] = True
    ok = (
        200 <= response.status_code < 300
        if request.expected is None
        else response.status_code in request.expected
    )
    if not ok:
        wanted = "2xx" if request.expected is None else str(sorted(request.expected))
        raise ActionFailedError(
            f"HTTP {request.method} returned status {response.status_code}, expected {wanted}",
            output=output,
            status=response.status_code,
        )
    return ActionResult(output)
