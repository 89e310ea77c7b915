"""The application's state and the dependencies every route uses (auth, sessions, time)."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine
from sqlmodel import Session

from events import parse_iso_utc
from ledger.policy import Policy
from ledger.service import Ledger
from ledger.settings import Settings
from worker.api.auth import Authenticator
from worker.api.errors import ApiError
from worker.api.sessions import RateLimiter, SessionStore

REALM = 'Bearer realm="quota-ledger"'
# SPEC §5: instance ids are 1–128 of [A-Za-z0-9._:-]; issued service numbers at most 64 of
# [A-Za-z0-9-]. Anything else cannot be in the ledger, so it is answered without a query (and
# a NUL or other oddity never reaches the database driver).
INSTANCE_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
SERVICE_NUMBER_RE = re.compile(r"[A-Za-z0-9-]{1,64}")


@dataclass
class ApiState:
    settings: Settings
    auth: Authenticator
    policy: Policy
    engine: Engine
    # Built once by worker.bootstrap: ingest dead-letters through it (Ledger.apply).
    ledger: Ledger
    queue: str
    sessions: SessionStore
    login_limiter: RateLimiter
    _schema_ready: bool = False
    _schema_lock: threading.Lock = field(default_factory=threading.Lock)

    def ensure_schema(self) -> None:
        """Bring the schema to head once per process (like the CLI does on a fresh database).

        Retried on later requests while the database is unreachable; its errors surface as 503.
        """
        if self._schema_ready:
            return
        from ledger.db import ensure_schema

        with self._schema_lock:
            if not self._schema_ready:
                ensure_schema(self.engine)
                self._schema_ready = True


def api_state(request: Request) -> ApiState:
    return request.app.state.api


bearer_scheme = HTTPBearer(
    auto_error=False,
    description="A token from QUOTA_LEDGER_API_TOKENS with the scope the endpoint needs "
    "(read for queries, ingest for POST /v1/events).",
)


def require_scope(scope: str):
    """A dependency: 401 without a valid bearer token, 403 when it lacks ``scope``."""

    async def check(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
    ) -> None:
        state = api_state(request)
        token = credentials.credentials if credentials is not None else None
        if token is None:
            raise ApiError(
                401,
                "unauthorized",
                "missing bearer token (send Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": REALM},
            )
        scopes = state.auth.scopes(token)
        if scopes is None:
            raise ApiError(
                401,
                "unauthorized",
                "invalid bearer token",
                headers={"WWW-Authenticate": f'{REALM}, error="invalid_token"'},
            )
        if scope not in scopes:
            raise ApiError(
                403,
                "forbidden",
                f"this token lacks the {scope!r} scope",
                headers={
                    "WWW-Authenticate": f'{REALM}, error="insufficient_scope", scope="{scope}"'
                },
            )

    return check


_metrics_scope = require_scope("metrics")


async def metrics_guard(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
) -> None:
    """/metrics stays open (for a scraper on a private network) until a token with the
    ``metrics`` scope is configured; from then on it needs such a token."""
    if api_state(request).auth.has_scope("metrics"):
        await _metrics_scope(request, credentials)


def db_session(request: Request) -> Iterator[Session]:
    state = api_state(request)
    state.ensure_schema()
    with Session(state.engine) as session:
        yield session


def parse_time_param(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_iso_utc(value)
    except ValueError as exc:
        raise ApiError(
            422,
            "invalid_parameter",
            f"{name}: {exc} (use ISO 8601 with a timezone, e.g. 2026-09-01T00:00:00Z)",
            extra={"details": [{"loc": ["query", name], "message": str(exc)}]},
        ) from None
