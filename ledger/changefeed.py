"""Reading the change feed (docs/changes.md): a page after a consumer's cursor, and the long
poll behind ``quota-ledger changes --follow`` and ``GET /v1/changes?wait=S``.

A consumer keeps its own cursor (the last position it processed) and asks for
``position > cursor``: positions are gap-free and become visible in order (``ledger.store.feed``),
so "everything after my cursor" never skips a change that commits later, and any number of
consumers read at their own pace without the ledger knowing about them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session

from events import iso_utc
from ledger.store.feed import feed_head, read_changes

__all__ = [
    "POLL_INTERVAL_S",
    "change_view",
    "changes_after",
    "current_position",
    "wait_for_changes",
]

#: How often a waiting reader looks at the feed's head: one primary-key read of a one-row table.
POLL_INTERVAL_S = 0.25


def change_view(row: dict[str, Any]) -> dict[str, Any]:
    """The JSON of one change, the same for the CLI (one JSONL line) and the API."""
    return {
        "position": row["position"],
        "kind": row["kind"],
        "instance_id": row["instance_id"],
        "seq": row["seq"],
        "event_id": row["event_id"],
        "instance_seq": row["instance_seq"],
        "occurred_at": iso_utc(row["occurred_at"]),
        "recorded_at": iso_utc(row["recorded_at"]),
        "data": row["data"],
    }


def changes_after(engine: Engine, *, after: int, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` changes with a position above ``after``, oldest first, as JSON views."""
    with Session(engine) as session:
        rows = read_changes(session.connection(), after=after, limit=limit)
    return [change_view(row) for row in rows]


def current_position(engine: Engine) -> int:
    """The position of the newest committed change (0 on an empty feed)."""
    with Session(engine) as session:
        return feed_head(session.connection())


def wait_for_changes(
    engine: Engine,
    *,
    after: int,
    limit: int,
    wait: float,
    poll_interval: float = POLL_INTERVAL_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[dict[str, Any]]:
    """Changes after ``after``, waiting up to ``wait`` seconds for the first one to commit;
    an empty list when none came. Polls the head row (no connection is held while sleeping),
    and reads the page only once the head has moved past ``after``."""
    deadline = clock() + max(wait, 0.0)
    while True:
        if current_position(engine) > after:
            return changes_after(engine, after=after, limit=limit)
        remaining = deadline - clock()
        if remaining <= 0:
            return []
        sleep(min(poll_interval, remaining))
