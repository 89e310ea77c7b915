"""Pure ASGI middleware: the request-body limits, the per-route request counter and the
headers every response carries."""

from __future__ import annotations

from collections.abc import Mapping

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.api.errors import ApiError, error_response
from worker.api.metrics import HTTP_REQUESTS

MAX_BODY_BYTES = 5 * 1024 * 1024  # 5 MiB
DEFAULT_BODY_TIMEOUT_S = 60.0
_CLOSE = (b"connection", b"close")


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        hint = (
            " (5 MiB); split the events over several requests"
            if limit == MAX_BODY_BYTES
            else " for this route"
        )
        super().__init__(
            413, "payload_too_large", f"the request body is over the limit of {limit} bytes{hint}"
        )


class BodyTimeout(ApiError):
    def __init__(self, seconds: float) -> None:
        super().__init__(
            408, "request_timeout", f"the request body did not arrive within {seconds:g} s"
        )


def _header(scope: Scope, wanted: bytes) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == wanted:
            return bytes(value)
    return None


def _declared_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _route_path(scope: Scope) -> str:
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class BodyLimitMiddleware:
    """Refuse bodies over the limit with 413, never reading more than that; give up on bodies
    that take longer than ``body_timeout`` with 408.

    The limit is ``max_bytes``, or ``path_limits[path]`` for the routes that only ever take a
    small form (the ops page's sign-in: a stranger must not be able to park 5 MiB there). A
    ``Content-Length`` over the limit is refused before a byte of the body is read; a body
    without one (``Transfer-Encoding: chunked``) or lying about it is counted while it streams
    in, and refused as soon as the count passes the limit. The refusal is raised from
    ``receive`` as an HTTP exception, so FastAPI's body parsing re-raises it untouched and the
    exception handler answers with the JSON error; if it reaches this middleware instead, the
    error is sent here.

    The body deadline starts when the app first asks for the body (after authentication), so
    a half-sent body cannot hold a request, and its buffers, open forever. Any answer sent
    before the client finished sending its body (a 401 to an unauthenticated upload, a 413, a
    408) carries ``Connection: close``: the server then drops the socket instead of swallowing
    whatever the client keeps sending.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int = MAX_BODY_BYTES,
        path_limits: Mapping[str, int] | None = None,
        body_timeout: float = DEFAULT_BODY_TIMEOUT_S,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = dict(path_limits or {})
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.path_limits.get(_route_path(scope), self.max_bytes)
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            response = error_response(
                413,
                "payload_too_large",
                BodyTooLarge(limit).detail,
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return

        has_body = bool(declared) or _header(scope, b"transfer-encoding") is not None
        received = 0
        body_done = not has_body
        started = False
        deadline: float | None = None

        async def limited_receive() -> Message:
            nonlocal received, body_done, deadline
            if body_done:
                return await receive()
            if deadline is None:
                deadline = anyio.current_time() + self.body_timeout
            try:
                with anyio.fail_after(max(deadline - anyio.current_time(), 0.0)):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(self.body_timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                body_done = not message.get("more_body", False)
            else:  # http.disconnect
                body_done = True
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not body_done:
                    headers = list(message.get("headers", ()))
                    if _CLOSE not in headers:
                        message = {**message, "headers": [*headers, _CLOSE]}
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (BodyTooLarge, BodyTimeout) as exc:
            if started:
                raise
            response = error_response(
                exc.status_code, exc.code, exc.detail, headers={"Connection": "close"}
            )
            await response(scope, receive, send)


class _HTTPMiddleware:
    """A pure ASGI middleware for HTTP requests; lifespan (and anything else) passes through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class SecurityHeadersMiddleware(_HTTPMiddleware):
    """``X-Content-Type-Options: nosniff`` on every answer (JSON, static files, errors), so no
    browser ever guesses a script or a page out of a response."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(name.lower() == b"x-content-type-options" for name, _ in headers):
                    headers.append((b"x-content-type-options", b"nosniff"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class RequestMetricsMiddleware(_HTTPMiddleware):
    """Counts requests by method, route template (not the raw path: bounded labels) and status."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "GET")
            if method not in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
                method = "other"
            HTTP_REQUESTS.labels(method=method, route=template, status=str(status)).inc()
