"""Webhook endpoints and their delivery log: every SQL statement of the webhooks.

Delivery happens outside any transaction (an HTTP call must not hold a lock): a deliverer
*claims* an endpoint with a lease (``lease_token``, ``lease_until``) in one short UPDATE that
only one deliverer can win, posts the changes after the endpoint's cursor in order, and
records each outcome in a short transaction guarded by its token. A deliverer that dies loses
its lease when it runs out and the next one starts again from the cursor: at least once, in
order.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Engine

from ledger.store.feed import feed_head
from ledger.tables import WebhookDelivery, WebhookEndpoint, core_table

__all__ = [
    "add_endpoint",
    "claim_due",
    "delivery_log",
    "list_endpoints",
    "pass_over",
    "record_attempt",
    "release",
    "remove_endpoint",
]

_ENDPOINTS = core_table(WebhookEndpoint)
_DELIVERIES = core_table(WebhookDelivery)
#: Delivery log rows kept per endpoint (older ones are deleted as new ones come).
LOG_KEPT = 1000


def _row(row: Any) -> dict[str, Any]:
    return dict(row._mapping)


def add_endpoint(
    engine: Engine,
    *,
    url: str,
    kinds: Sequence[str],
    secret: str,
    now: datetime,
    from_start: bool = False,
) -> dict[str, Any]:
    """Register ``url``. It receives the changes committed from now on (its cursor starts at
    the feed's head), or the whole feed with ``from_start``."""
    with engine.begin() as connection:
        cursor = 0 if from_start else feed_head(connection)
        values = {
            "url": url,
            "secret": secret,
            "kinds": list(kinds),
            "enabled": True,
            "created_at": now,
            "cursor": cursor,
            "failures": 0,
            "next_attempt_at": now,
        }
        key = connection.execute(insert(_ENDPOINTS).values(values)).inserted_primary_key
        assert key is not None  # a single-row INSERT has one
        new_id = key[0]
        return _row(connection.execute(select(_ENDPOINTS).where(_ENDPOINTS.c.id == new_id)).one())


def list_endpoints(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        return [_row(r) for r in connection.execute(select(_ENDPOINTS).order_by(_ENDPOINTS.c.id))]


def remove_endpoint(engine: Engine, endpoint_id: int) -> bool:
    with engine.begin() as connection:
        connection.execute(delete(_DELIVERIES).where(_DELIVERIES.c.endpoint_id == endpoint_id))
        gone = connection.execute(delete(_ENDPOINTS).where(_ENDPOINTS.c.id == endpoint_id))
        return bool(gone.rowcount)


def claim_due(
    engine: Engine, *, now: datetime, lease: timedelta, limit: int
) -> list[dict[str, Any]]:
    """Claim up to ``limit`` enabled endpoints whose next attempt is due and that nobody holds:
    each UPDATE succeeds for one deliverer only (its WHERE re-checks the lease)."""
    free = (_ENDPOINTS.c.lease_until.is_(None)) | (_ENDPOINTS.c.lease_until < now)
    due = _ENDPOINTS.c.enabled.is_(True) & (_ENDPOINTS.c.next_attempt_at <= now) & free
    claimed: list[dict[str, Any]] = []
    with engine.connect() as connection:
        candidates = [
            endpoint_id
            for (endpoint_id,) in connection.execute(
                select(_ENDPOINTS.c.id)
                .where(due)
                .order_by(_ENDPOINTS.c.next_attempt_at)
                .limit(limit)
            )
        ]
    for endpoint_id in candidates:
        token = secrets.token_hex(16)
        with engine.begin() as connection:
            won = connection.execute(
                update(_ENDPOINTS)
                .where(_ENDPOINTS.c.id == endpoint_id, due)
                .values(lease_token=token, lease_until=now + lease)
            ).rowcount
            if won:
                row = connection.execute(
                    select(_ENDPOINTS).where(_ENDPOINTS.c.id == endpoint_id)
                ).one()
                claimed.append(_row(row))
    return claimed


def _held(endpoint_id: int, token: str) -> Any:
    return (_ENDPOINTS.c.id == endpoint_id) & (_ENDPOINTS.c.lease_token == token)


def record_attempt(
    engine: Engine,
    *,
    endpoint_id: int,
    token: str,
    position: int,
    attempt: int,
    status: int | None,
    error: str | None,
    duration_ms: int,
    now: datetime,
    endpoint: dict[str, Any],
) -> bool:
    """Log attempt number ``attempt`` at ``position`` and store the endpoint's new state
    (``endpoint``: ``cursor``, ``failures``, ``failing_since``, ``next_attempt_at``,
    ``enabled``, ``disabled_reason``, ``last_status``, ``last_error``). False when the lease
    was lost (the outcome is then not recorded: the next holder tries again)."""
    with engine.begin() as connection:
        moved = connection.execute(
            update(_ENDPOINTS).where(_held(endpoint_id, token)).values(**endpoint)
        ).rowcount
        if not moved:
            return False
        connection.execute(
            insert(_DELIVERIES).values(
                endpoint_id=endpoint_id,
                position=position,
                attempt=attempt,
                status=status,
                error=error,
                duration_ms=duration_ms,
                attempted_at=now,
            )
        )
        # Keep the log bounded: the newest LOG_KEPT rows of this endpoint.
        oldest_kept = connection.execute(
            select(_DELIVERIES.c.id)
            .where(_DELIVERIES.c.endpoint_id == endpoint_id)
            .order_by(_DELIVERIES.c.id.desc())
            .offset(LOG_KEPT - 1)
            .limit(1)
        ).scalar_one_or_none()
        if oldest_kept is not None:
            connection.execute(
                delete(_DELIVERIES).where(
                    _DELIVERIES.c.endpoint_id == endpoint_id, _DELIVERIES.c.id < oldest_kept
                )
            )
        return True


def pass_over(engine: Engine, *, endpoint_id: int, token: str, cursor: int) -> None:
    """Move the cursor over changes of kinds the endpoint does not want."""
    with engine.begin() as connection:
        connection.execute(
            update(_ENDPOINTS)
            .where(_held(endpoint_id, token), _ENDPOINTS.c.cursor < cursor)
            .values(cursor=cursor)
        )


def release(engine: Engine, *, endpoint_id: int, token: str) -> None:
    with engine.begin() as connection:
        connection.execute(
            update(_ENDPOINTS)
            .where(_held(endpoint_id, token))
            .values(lease_token=None, lease_until=None)
        )


def delivery_log(engine: Engine, endpoint_id: int, *, limit: int = 100) -> list[dict[str, Any]]:
    """The endpoint's latest attempts, newest first."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(_DELIVERIES)
            .where(_DELIVERIES.c.endpoint_id == endpoint_id)
            .order_by(_DELIVERIES.c.id.desc())
            .limit(limit)
        )
        return [_row(r) for r in rows]
