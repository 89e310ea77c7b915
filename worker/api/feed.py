"""``GET /v1/changes``: the change feed after a cursor, with an optional long poll
(docs/changes.md). Read scope, like the other queries.

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
from worker.api import schemas
from worker.api.deps import ApiState, api_state
from worker.api.errors import ApiJSONResponse
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
