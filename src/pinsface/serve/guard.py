"""The server's outermost layer (``Guard``, ASGI middleware): what a request must pass before the app reads its
body, the body's own limits, the security headers on every response, and the counting of every request."""

from __future__ import annotations

import asyncio
import hmac
import time

from pinsface.serve.auth import host_of, needs_key
from pinsface.serve.errors import ApiError, json_response, retry_later
from pinsface.serve.limits import BodyClock, BodyTooSlow
from pinsface.serve.state import ServerState

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
KEY_SCHEME = {"type": "apiKey", "description": "the server's API key", "in": "header", "name": "X-API-Key"}


def with_security_headers(headers, path: str) -> list:
    """``headers`` (ASGI pairs) with the security headers added where the response has not set them."""
    out = list(headers)
    present = {name.lower() for name, _ in out}
    extra = list(SECURITY_HEADERS)
    if not path.startswith("/docs"):  # Swagger UI runs inline script
        extra.append((b"content-security-policy", CONTENT_SECURITY_POLICY.encode()))
    out += [(name, value) for name, value in extra if name not in present]
    return out


def describe_key(app, auth: str) -> None:
    """Name the key in ``app``'s API description on the operations the guard asks it for (``auth.needs_key``)."""
    build = app.openapi

    def openapi() -> dict:
        schema = build()  # FastAPI's, built once and kept
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["APIKeyHeader"] = KEY_SCHEME
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                if needs_key(path, method.upper(), auth):
                    operation["security"] = [{"APIKeyHeader": []}]
        return schema

    app.openapi = openapi


class Guard:
    """ASGI middleware, outermost: checks the Host header, counts and times requests, refuses bodies over the
    request cap (413, chunked ones included) and requests without the right API key (401/403) before anything
    reads their body; times the body (408 when it comes too slowly, ``limits.BodyClock``), refuses a multipart
    body cut short (400), and adds the security headers to every response."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        reply = _Reply(scope, receive, send, self.state)
        counted = False
        try:
            headers = dict(scope["headers"])
            counted = self._take_slot(scope)
            self._admit(scope, headers)
            await self.app(scope, _Body(self.state, receive, headers, reply.refused), reply.from_app)
        except ApiError as exc:
            if reply.sent:
                raise
            await json_response(exc)(scope, receive, reply.send)
            self.state.metrics.count_error(exc.code)
        finally:
            if counted:
                self.state.in_flight -= 1
            self._record(scope, reply.status, started)

    def _take_slot(self, scope) -> bool:
        """Count the request as in progress (True), or refuse it with 503 past the cap; health is not counted."""
        settings = self.state.settings
        if scope["path"] == "/v1/health":  # health answers even when everything else is refused
            return False
        if self.state.in_flight >= settings.max_requests:
            raise retry_later("busy", "too many requests in progress; retry later", settings.retry_after_s)
        self.state.in_flight += 1
        return True

    def _admit(self, scope, headers: dict) -> None:
        """Raise the ApiError that refuses a request from its headers alone, if any."""
        state = self.state
        if host_of(headers.get(b"host")) not in state.allowed_hosts:
            raise ApiError(400, "host_not_allowed", "the Host header names a host this server does not answer for")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > state.request_limit):
            raise ApiError(413, "request_too_large", f"the request is over {state.settings.max_request_mb:g} MB")
        if needs_key(scope["path"], scope["method"], state.settings.auth):
            given = headers.get(b"x-api-key")
            if given is None:
                raise ApiError(401, "missing_api_key", "this endpoint needs an API key in the X-API-Key header")
            if not hmac.compare_digest(given, state.api_key.encode("utf-8")):
                raise ApiError(403, "invalid_api_key", "the API key is not valid")

    def _record(self, scope, status: int, started: float) -> None:
        metrics = self.state.metrics
        route = scope.get("route")
        name = getattr(route, "path", None) or ("/static" if scope["path"].startswith("/static/") else "unmatched")
        metrics.requests.labels(scope["method"], name, str(status)).inc()
        metrics.latency.labels(name).observe(time.perf_counter() - started)


class _Reply:
    """The response side of one request: its status (for the metrics), the security headers, and a refusal
    of its body (``refused``) answered in place of the app's response."""

    def __init__(self, scope, receive, send, state: ServerState):
        self.scope, self.receive, self._send, self.state = scope, receive, send, state
        self.status, self.sent, self.replaced = 500, False, False
        self.refused: list[ApiError] = []

    async def send(self, message) -> None:
        if message["type"] == "http.response.start":
            self.status, self.sent = message["status"], True
            message["headers"] = with_security_headers(message.get("headers") or [], self.scope["path"])
        await self._send(message)

    async def from_app(self, message) -> None:
        if self.refused and message["type"] == "http.response.start":
            self.replaced = True
            exc = self.refused[0]
            self.state.metrics.count_error(exc.code)
            return await json_response(exc)(self.scope, self.receive, self.send)
        if not self.replaced:
            await self.send(message)


class _Body:
    """``receive`` with the request cap, the body's clock and the multipart end check. The ApiError it raises is
    also put in ``refused``: the form parser turns any error into its own 400, which the guard replaces with it."""

    def __init__(self, state: ServerState, receive, headers: dict, refused: list):
        settings = state.settings
        self.state, self.receive, self.refused = state, receive, refused
        self.clock = BodyClock(settings.min_body_rate_kb * 1024, settings.body_grace_s, settings.body_idle_s)
        kind, _, params = headers.get(b"content-type", b"").partition(b";")
        multipart = kind.strip() == b"multipart/form-data"
        self.boundary = params.strip().removeprefix(b"boundary=").strip(b'"') if multipart else b""
        self.done, self.tail = False, b""

    async def __call__(self):
        try:
            return await self._next()
        except ApiError as exc:
            self.refused.append(exc)
            raise

    async def _next(self):
        if self.done:  # the body is in: what follows is a disconnect, waited for without a clock
            return await self.receive()
        try:
            message = await asyncio.wait_for(self.receive(), self.clock.wait_for_next())
        except (BodyTooSlow, TimeoutError) as exc:
            self.state.counts.timed_out += 1
            raise ApiError(408, "request_timeout", "the request body came too slowly") from exc
        if message["type"] != "http.request":
            return message
        body = message.get("body", b"")
        self.clock.received += len(body)
        if self.clock.received > self.state.request_limit:
            raise ApiError(413, "request_too_large", f"the request is over {self.state.settings.max_request_mb:g} MB")
        self.tail = (self.tail + body)[-(len(self.boundary) + 16) :]
        if not message.get("more_body", False):
            self.done = True
            if self.boundary and b"--" + self.boundary + b"--" not in self.tail:
                raise ApiError(400, "truncated_body", "the multipart body ends before its closing boundary")
        return message
