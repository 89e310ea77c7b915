"""``quota-ledger changes``: read the change feed from a cursor (docs/changes.md).

A consumer passes the last position it processed as ``--after`` and gets what came since, in
order; ``--follow`` keeps waiting for new changes (the long poll of ``ledger.changefeed``). With
``--json`` each change is one JSON line (JSONL), flushed as it comes, so a pipe sees it at once.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from ledger.changefeed import wait_for_changes
from worker.cli.options import DbOption, JsonOption, guarded, runtime

#: Changes read per query; a larger --limit is read in several pages.
PAGE = 1000
#: How long one wait of --follow lasts before it asks again (it asks at once when woken).
FOLLOW_WAIT_S = 5.0


def _line(change: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(change, ensure_ascii=False, separators=(",", ":"))
    data = " ".join(f"{key}={value}" for key, value in change["data"].items())
    where = change["instance_id"] or "-"
    return f"{change['position']:>8}  {change['occurred_at']}  {change['kind']:<30} {where}  {data}"


@guarded
def changes(
    ctx: typer.Context,
    after: Annotated[
        int,
        typer.Option(
            "--after", min=0, metavar="POS", help="Only changes after this position (a cursor)."
        ),
    ] = 0,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, metavar="N", help="At most N changes, then stop."),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", help="Keep waiting for new changes (Ctrl-C stops).")
    ] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """The change feed after a position: numbers issued, used, invalidated or revived, filing
    decisions, status and eligibility changes, dead letters, renewal reminders."""

    run = runtime(ctx, db, as_json)
    cursor, printed = after, 0
    with run.engine() as engine:
        try:
            while limit is None or printed < limit:
                size = PAGE if limit is None else min(PAGE, limit - printed)
                page = wait_for_changes(
                    engine, after=cursor, limit=size, wait=FOLLOW_WAIT_S if follow else 0
                )
                for change in page:
                    sys.stdout.write(_line(change, run.json) + "\n")
                sys.stdout.flush()
                if page:
                    cursor, printed = page[-1]["position"], printed + len(page)
                elif not follow:
                    break
        except KeyboardInterrupt:
            pass  # --follow ends on Ctrl-C; everything printed so far was flushed
