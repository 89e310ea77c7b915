"""``GET /v1/changes``: the change feed after a cursor, with an optional long poll
(docs/changes.md). Read scope, like the other queries. And the webhook endpoints
(``/v1/webhooks``), admin scope.

The wait is spent in the event loop (``anyio.sleep``), not in a worker thread: each poll is one
short read of the feed's one-row head in the thread pool, so a hundred waiting consumers hold
no threads and no database connections between polls.
"""

from __future__ import annotations

import time

import anyio
from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from ledger.changefeed import POLL_INTERVAL_S, changes_after, current_position
from ledger.clock import utcnow
from ledger.store import webhooks
from ledger.webhooks import delivery_view, endpoint_problem, endpoint_view, new_secret
from worker.api import schemas
from worker.api.deps import ApiState, api_state, require_scope
from worker.api.errors import ApiError, ApiJSONResponse
from worker.api.routes import DEFAULT_LIMIT, MAX_LIMIT, _blocking, _responses, read

#: The longest a request may wait for a change: below common proxy idle timeouts (60 s).
MAX_WAIT_S = 30.0

router = APIRouter(prefix="/v1")


@router.get(
    "/changes",
    dependencies=read,
    response_model=None,
    responses=_responses(schemas.ChangesPage),
    summary="The change feed after a position, oldest first; `wait` long-polls for new ones",
)
async def list_changes(
    after: int = Query(0, ge=0, le=2**63 - 1, description="Changes after this position."),
    limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="Page size (1–1000)."),
    wait: float = Query(
        0,
        ge=0,
        le=MAX_WAIT_S,
        description="Seconds to wait for a first change when there is none yet (0–30).",
    ),
    state: ApiState = Depends(api_state),
) -> Response:
    await _blocking(state.ensure_schema)
    deadline = time.monotonic() + wait
    items: list[dict[str, object]] = []
    while True:
        if await _blocking(current_position, state.engine) > after:
            items = await _blocking(changes_after, state.engine, after=after, limit=limit)
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        await anyio.sleep(min(POLL_INTERVAL_S, remaining))
    next_after = items[-1]["position"] if items else after
    return ApiJSONResponse({"items": items, "next_after": next_after})


# --- webhook endpoints (admin scope) --------------------------------------------------------------

admin = [Depends(require_scope("admin"))]


@router.post(
    "/webhooks",
    dependencies=admin,
    status_code=201,
    response_model=None,
    responses={
        **_responses(schemas.WebhookEndpoint),
        201: {"model": schemas.WebhookEndpoint},
        # FastAPI reads a JSON body before the scope check runs: a body that is not JSON is a 400.
        400: {"model": schemas.Error, "description": "The body is not JSON"},
    },
    summary="Register a webhook endpoint; the answer carries its signing secret (only this once)",
)
async def create_webhook(
    body: schemas.WebhookCreate, state: ApiState = Depends(api_state)
) -> Response:
    problem = endpoint_problem(body.url, body.kinds)
    if problem is not None:
        raise ApiError(422, "invalid_parameter", problem)
    await _blocking(state.ensure_schema)
    row = await _blocking(
        webhooks.add_endpoint,
        state.engine,
        url=body.url,
        kinds=body.kinds,
        secret=new_secret(),
        now=utcnow(),
        from_start=body.from_start,
    )
    return ApiJSONResponse(endpoint_view(row, with_secret=True), 201)


@router.get(
    "/webhooks",
    dependencies=admin,
    response_model=None,
    responses=_responses(list[schemas.WebhookEndpoint]),
    summary="Webhook endpoints, their cursor and delivery state",
)
async def list_webhooks(state: ApiState = Depends(api_state)) -> Response:
    await _blocking(state.ensure_schema)
    rows = await _blocking(webhooks.list_endpoints, state.engine)
    return ApiJSONResponse([endpoint_view(row) for row in rows])


@router.delete(
    "/webhooks/{endpoint_id}",
    dependencies=admin,
    status_code=204,
    response_model=None,
    responses={**_responses(schemas.WebhookEndpoint, 404), 204: {"description": "Removed"}},
    summary="Remove a webhook endpoint and its delivery log",
)
async def delete_webhook(endpoint_id: int, state: ApiState = Depends(api_state)) -> Response:
    await _blocking(state.ensure_schema)
    if not await _blocking(webhooks.remove_endpoint, state.engine, endpoint_id):
        raise ApiError(404, "not_found", f"no webhook endpoint {endpoint_id}")
    return Response(status_code=204)


@router.get(
    "/webhooks/{endpoint_id}/deliveries",
    dependencies=admin,
    response_model=None,
    responses=_responses(list[schemas.WebhookDelivery]),
    summary="An endpoint's latest delivery attempts, newest first",
)
async def list_deliveries(
    endpoint_id: int,
    limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="At most this many."),
    state: ApiState = Depends(api_state),
) -> Response:
    await _blocking(state.ensure_schema)
    rows = await _blocking(webhooks.delivery_log, state.engine, endpoint_id, limit=limit)
    return ApiJSONResponse([delivery_view(row) for row in rows])
