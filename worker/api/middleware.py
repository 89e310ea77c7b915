"""Pure ASGI middleware: the request-body limit and the per-route request counter."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.api.errors import ApiError, error_response
from worker.api.metrics import HTTP_REQUESTS

MAX_BODY_BYTES = 5 * 1024 * 1024  # 5 MiB


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            "payload_too_large",
            f"the request body is over the limit of {limit} bytes (5 MiB); "
            "split the events over several requests",
        )


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413, never reading more than that.

    A ``Content-Length`` over the limit is refused before a byte of the body is read; a body
    without one (``Transfer-Encoding: chunked``) or lying about it is counted while it streams
    in, and refused as soon as the count passes the limit. The refusal is raised from
    ``receive`` as an HTTP 413 exception, so FastAPI's body parsing re-raises it untouched and
    the exception handler answers with the JSON error; if it reaches this middleware instead,
    the 413 is sent here.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            await error_response(413, "payload_too_large", BodyTooLarge(self.max_bytes).detail)(
                scope, receive, send
            )
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await error_response(413, "payload_too_large", exc.detail)(scope, receive, send)


class RequestMetricsMiddleware:
    """Counts requests by method, route template (not the raw path: bounded labels) and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
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
