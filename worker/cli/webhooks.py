"""``quota-ledger webhooks …``: register, list and remove webhook endpoints, read an
endpoint's delivery log, run a delivery pass now (docs/changes.md). Operators with the
database's URL are the admins here; the HTTP API offers the same to the ``admin`` scope."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

import typer

from ledger.clock import utcnow
from ledger.settings import get_settings
from ledger.store.webhooks import add_endpoint, delivery_log, list_endpoints, remove_endpoint
from ledger.webhooks import delivery_view, endpoint_problem, endpoint_view, new_secret
from worker.cli.options import DbOption, JsonOption, UserError, guarded, print_json, runtime
from worker.webhooks import DeliveryPolicy, deliver_due

webhooks_app = typer.Typer(no_args_is_help=True, help="Webhook endpoints of the change feed.")


def check_endpoint(url: str, kinds: list[str]) -> None:

    problem = endpoint_problem(url, kinds)
    if problem is not None:
        raise UserError(problem)


@webhooks_app.command("add")
@guarded
def add(
    ctx: typer.Context,
    url: Annotated[str, typer.Argument(help="Where to POST each change (http or https).")],
    kinds: Annotated[
        list[str] | None,
        typer.Option("--kind", metavar="KIND", help="Only this kind (repeat); default: all."),
    ] = None,
    from_start: Annotated[
        bool, typer.Option("--from-start", help="Deliver the whole feed, not only new changes.")
    ] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Register an endpoint; prints its signing secret (shown this once)."""

    chosen = list(kinds or [])
    check_endpoint(url, chosen)
    run = runtime(ctx, db, as_json)
    with run.engine() as engine:
        row = add_endpoint(
            engine, url=url, kinds=chosen, secret=new_secret(), now=utcnow(), from_start=from_start
        )
    view = endpoint_view(row, with_secret=True)
    if run.json:
        print_json(view)
    else:
        typer.echo(f"endpoint {view['id']}: {url} from position {view['cursor']}")
        typer.echo(f"signing secret (keep it; it is not shown again): {view['secret']}")


@webhooks_app.command("list")
@guarded
def list_(ctx: typer.Context, db: DbOption = None, as_json: JsonOption = False) -> None:
    """Registered endpoints, their cursor and state."""

    run = runtime(ctx, db, as_json)
    with run.engine() as engine:
        rows = [endpoint_view(row) for row in list_endpoints(engine)]
    if run.json:
        print_json(rows)
        return
    for row in rows:
        state = "enabled" if row["enabled"] else f"DISABLED ({row['disabled_reason']})"
        kinds = ",".join(row["kinds"]) or "all kinds"
        typer.echo(
            f"{row['id']:>4}  {row['url']}  {kinds}  cursor={row['cursor']}  {state}"
            f"  failures={row['failures']}  last_status={row['last_status']}"
        )


@webhooks_app.command("remove")
@guarded
def remove(
    ctx: typer.Context,
    endpoint_id: Annotated[int, typer.Argument(metavar="ID")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove an endpoint and its delivery log; exit 1 if there is none."""

    run = runtime(ctx, db, as_json)
    with run.engine() as engine:
        removed = remove_endpoint(engine, endpoint_id)
    if run.json:
        print_json({"id": endpoint_id, "removed": removed})
    elif removed:
        typer.echo(f"endpoint {endpoint_id} removed")
    if not removed:
        raise UserError(f"no endpoint {endpoint_id}", code=1)


@webhooks_app.command("log")
@guarded
def log(
    ctx: typer.Context,
    endpoint_id: Annotated[int, typer.Argument(metavar="ID")],
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, metavar="N")] = 50,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """An endpoint's latest delivery attempts, newest first."""

    run = runtime(ctx, db, as_json)
    with run.engine() as engine:
        rows = [delivery_view(row) for row in delivery_log(engine, endpoint_id, limit=limit)]
    if run.json:
        print_json(rows)
        return
    for row in rows:
        outcome = row["status"] if row["status"] is not None else row["error"]
        typer.echo(
            f"{row['attempted_at']}  position {row['position']}  attempt {row['attempt']}"
            f"  {outcome}  {row['duration_ms']} ms"
        )


@webhooks_app.command("deliver")
@guarded
def deliver(ctx: typer.Context, db: DbOption = None, as_json: JsonOption = False) -> None:
    """Run one delivery pass now (beat runs one every QUOTA_LEDGER_WEBHOOK_INTERVAL seconds)."""

    run = runtime(ctx, db, as_json)
    days = get_settings().webhook_disable_after_days
    with run.engine() as engine:
        report = deliver_due(engine, policy=DeliveryPolicy(disable_after=timedelta(days=days)))
    if run.json:
        print_json(report.to_json())
    else:
        typer.echo(
            f"{report.endpoints} endpoint(s): {report.delivered} delivered, {report.failed} failed"
        )
