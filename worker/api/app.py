"""The application factory: ``create_app(settings) -> FastAPI``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect

from ledger.settings import Settings, get_settings
from worker import bootstrap
from worker.api import feed, routes, ui
from worker.api.auth import Authenticator, parse_tokens
from worker.api.broker import close_clients, events_queue_name
from worker.api.deps import ApiState
from worker.api.errors import (
    DATABASE_ERRORS,
    ApiJSONResponse,
    database_error_handler,
    error_body,
    http_error_payload,
    internal_error_handler,
    validation_error_handler,
)
from worker.api.middleware import (
    BodyLimitMiddleware,
    RequestMetricsMiddleware,
    SecurityHeadersMiddleware,
)
from worker.api.sessions import RateLimiter, SessionStore

log = logging.getLogger(__name__)

DESCRIPTION = """\
The ICP filing quota ledger over HTTP: the same JSON as the CLI's `--json` (SPEC §7).

* Queries need a token with the `read` scope, `POST /v1/events` one with `ingest`
  (`Authorization: Bearer <token>`; tokens come from `QUOTA_LEDGER_API_TOKENS`).
* Lists are paginated with opaque cursors: `?limit=` (1–1000, default 100) and
  `?cursor=<next_cursor of the previous page>`; `next_cursor` is null on the last page.
* Errors are `{"error": code, "message": text}` with a 4xx status for bad input, 503 when the
  database or broker is unreachable.
* `/healthz` and `/readyz` need no token; `/metrics` needs one with the `metrics` scope once
  such a token is configured. The ops page is at `/ui/`. Threat model: docs/security.md.
"""


def _version() -> str:
    try:
        return version("quota-ledger")
    except PackageNotFoundError:
        return "0.0.0"


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for ``settings`` (default: the environment).

    Refuses to build (raising :class:`~worker.api.auth.TokenConfigError`, a ``ValueError``) when
    ``QUOTA_LEDGER_API_TOKENS`` is malformed, and ``PolicyError`` when the policy file is
    broken, so a misconfigured server never starts. The database is not contacted here: the
    schema is brought to head at startup if the database answers, else on first use.
    """
    settings = settings or get_settings()
    tokens = parse_tokens(_secret_text(settings.api_tokens))
    policy = bootstrap.policy_of(settings)
    # The schema is brought to head in the lifespan (or on first use), not here. No process
    # tuning either (bootstrap.tune_for_batches): request threads keep the default collector.
    engine = bootstrap.open_engine(settings, schema=False)
    state = ApiState(
        settings=settings,
        auth=Authenticator(tokens),
        policy=policy,
        engine=engine,
        ledger=bootstrap.build_ledger(settings, engine, policy),
        queue=events_queue_name(),
        sessions=SessionStore(settings.ui_session_lifetime),
        login_limiter=RateLimiter(settings.ui_login_attempts_per_minute, 60.0),
    )
    if not tokens:
        log.warning("QUOTA_LEDGER_API_TOKENS is empty: every /v1 endpoint and /ui/ answer 401")

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            await anyio.to_thread.run_sync(state.ensure_schema)
        except Exception as exc:  # not fatal: /readyz says so and requests retry it
            log.warning("database not ready at startup: %s", str(exc).splitlines()[0:1])
        try:
            yield
        finally:
            engine.dispose()
            close_clients()

    app = FastAPI(
        title="quota-ledger",
        summary="ICP filing quota ledger: eligibility, slots and service numbers",
        description=DESCRIPTION,
        version=_version(),
        lifespan=lifespan,
        default_response_class=ApiJSONResponse,
        # Swagger UI loads its script from a CDN (no pinning, no SRI, same origin as /ui): only
        # when asked for. /openapi.json is always there.
        docs_url="/docs" if settings.api_docs else None,
        redoc_url=None,
        openapi_url="/openapi.json",
        # Starlette's slash redirects are absolute URLs built from the Host header; the one
        # redirect people need (/ui → /ui/) is a relative route of its own.
        redirect_slashes=False,
    )
    app.state.api = state

    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(ui.LoginRequired, ui.login_required_handler)
    app.add_exception_handler(ClientDisconnect, _client_disconnect_handler)
    for error in DATABASE_ERRORS:
        app.add_exception_handler(error, _database_handler)
    app.add_exception_handler(Exception, internal_error_handler)

    # Added innermost first: metrics see every answer (a refused Host included), every answer
    # gets the security headers, and the body limit guards everything inside.
    app.add_middleware(
        BodyLimitMiddleware,
        path_limits={path: ui.MAX_LOGIN_BODY for path in ui.SMALL_FORM_PATHS},
        body_timeout=settings.api_body_timeout,
    )
    app.add_middleware(
        TrustedHostMiddleware, allowed_hosts=settings.api_allowed_hosts, www_redirect=False
    )
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(RequestMetricsMiddleware)

    app.include_router(routes.api)
    app.include_router(feed.router)
    app.include_router(routes.ops)
    app.include_router(ui.router)
    app.mount("/ui/static", ui.static_files(), name="ui-static")
    return app


def _secret_text(value: SecretStr | str) -> str:
    # ``Settings.model_copy(update=...)`` does not validate, so a plain str may arrive too.
    return value.get_secret_value() if isinstance(value, SecretStr) else value


async def _client_disconnect_handler(request: Request, exc: Exception) -> Response:
    # The client went away mid-request (an aborted upload): nothing failed here, and nobody is
    # listening for an answer. 499 is nginx's "client closed request", for the metrics.
    log.debug("client disconnected during %s %s", request.method, request.url.path)
    return Response(status_code=499)


async def _http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code, message, extra = http_error_payload(exc)
    if ui.is_ui_request(request):
        return ui.error_page(request, exc.status_code, message, headers=exc.headers)
    return ApiJSONResponse(error_body(code, message, **extra), exc.status_code, headers=exc.headers)


async def _validation_handler(request: Request, exc: Exception) -> Response:
    if ui.is_ui_request(request):
        assert isinstance(exc, RequestValidationError)
        return ui.error_page(request, 422, "invalid request parameters")
    return await validation_error_handler(request, exc)


async def _database_handler(request: Request, exc: Exception) -> Response:
    response = await database_error_handler(request, exc)
    if ui.is_ui_request(request):
        return ui.error_page(
            request, 503, "The database is unreachable or not ready; retry later.", {}
        )
    return response
