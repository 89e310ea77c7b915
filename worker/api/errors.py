"""One JSON error shape for every failure: ``{"error": code, "message": text}`` (plus
``"details"`` for invalid parameters), and the exception handlers that produce it.

Nothing a client sends may turn into a 500: bad input is a 4xx with this shape, an unreachable
database or broker a 503.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import sqlalchemy.exc
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from ledger.db import error_line

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 500

ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_parameter",
    500: "internal_error",
    503: "unavailable",
}


class ApiJSONResponse(JSONResponse):
    """Compact UTF-8 JSON; a lone surrogate (which no UTF-8 encoder accepts) is written as its
    ``\\udXXX`` escape instead of failing the response."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8", "backslashreplace")


class ApiError(StarletteHTTPException):
    """An HTTP error with a machine-readable ``code`` (the ``error`` field)."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(status_code, message, headers)
        self.code = code
        self.extra = extra or {}


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def quoted(value: str, limit: int = 80) -> str:
    """``value`` for a message: repr-quoted and clipped (it may be huge or odd)."""
    return repr(clip(value, limit))


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": code, "message": clip(message), **extra}


def error_response(
    status_code: int,
    code: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    return ApiJSONResponse(error_body(code, message, **extra), status_code, headers=headers)


def http_error_payload(exc: StarletteHTTPException) -> tuple[str, str, dict[str, Any]]:
    code = getattr(exc, "code", None) or ERROR_CODES.get(exc.status_code, "error")
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, default=str)
    return code, detail, dict(getattr(exc, "extra", {}) or {})


def validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Pydantic's errors without the offending input (it may be huge, or not encodable)."""
    details = []
    for error in exc.errors()[:20]:
        loc = [part if isinstance(part, int) else clip(str(part), 80) for part in error["loc"]]
        details.append({"loc": loc, "message": clip(str(error.get("msg", "invalid")), 200)})
    return details


async def validation_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    details = validation_details(exc)
    summary = "; ".join(
        f"{'.'.join(str(p) for p in d['loc'])}: {d['message']}" for d in details[:5]
    )
    return error_response(422, "invalid_parameter", summary or "invalid request", details=details)


async def database_error_handler(request: Request, exc: Exception) -> Response:
    log.warning("database unavailable: %s", error_line(exc))
    return error_response(
        503,
        "database_unavailable",
        "the database is unreachable or not ready; retry later",
        headers={"Retry-After": "5"},
    )


async def internal_error_handler(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal error")


DATABASE_ERRORS: tuple[type[Exception], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.DisconnectionError,
    sqlalchemy.exc.TimeoutError,
)
