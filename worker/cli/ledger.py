"""The ledger commands of ``quota-ledger`` (SPEC §7): each parses its options, opens the
database, calls one function of ``ledger`` and prints JSON (``--json``) or Rich tables."""

from __future__ import annotations

import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlmodel import Session

from events import iso_utc
from events.jsonl import batches, read_lines
from ledger.audit import rebuild as rebuild_projections
from ledger.audit import verify as verify_chains
from ledger.clock import utcnow
from ledger.db import current_revision, upgrade
from ledger.queries import (
    instance_history,
    list_instances,
    parked_events,
    rejected_events,
    service_number_info,
    show_instance,
)
from worker import bootstrap, render
from worker.cli.options import (
    APPLY_BATCH,
    APPLY_LISTED,
    PROGRESS_MIN_BYTES,
    PROGRESS_MIN_ENTRIES,
    DbOption,
    EligibilityChoice,
    GlobalOptions,
    JsonOption,
    ProductChoice,
    UserError,
    cli_settings,
    count_entries,
    guarded,
    mask_url,
    open_input,
    parse_time,
    print_json,
    progress_bar,
    runtime,
)


@guarded
def db_upgrade(ctx: typer.Context, db: DbOption = None, as_json: JsonOption = False) -> None:
    """Create or migrate the database schema to the current version (idempotent)."""

    run = runtime(ctx, db, as_json)
    with run.engine(ensure=False) as engine:
        upgrade(engine)
        revision = current_revision(engine)
    if run.json:
        print_json({"database": run.safe_url, "revision": revision})
    else:
        render.message(f"Schema of {run.safe_url} is at revision {revision}.", "green")


# --- apply ---------------------------------------------------------------------------------------


@guarded
def apply(
    ctx: typer.Context,
    file: Annotated[
        str, typer.Argument(metavar="FILE|-", help="A JSONL file of events, or - for stdin.")
    ],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Apply JSONL events in-process (no broker); exit 1 if any line was invalid."""
    run = runtime(ctx, db, as_json)
    policy = run.policy  # a broken policy file fails before any input is read
    counts: Counter[str] = Counter()
    notable: list[tuple[int, dict[str, Any]]] = []
    omitted = 0
    # Every number issued: the operator hands each one to the filing it authorises.
    issued: list[tuple[int, str, str]] = []
    with open_input(file) as (stream, size, label), run.engine() as engine:
        ledger = bootstrap.build_ledger(run.settings, engine, policy)
        show_progress = (
            not run.json and render.is_terminal() and (size is None or size >= PROGRESS_MIN_BYTES)
        )
        with progress_bar(show_progress, size, f"applying {label}", in_bytes=True) as advance:
            for batch in batches(read_lines(stream, advance), APPLY_BATCH):
                raws = [line.raw for line in batch]
                results = ledger.apply([line.item for line in batch], raws=raws)
                for line, result in zip(batch, results, strict=True):
                    data = result.to_json()
                    counts[data["outcome"]] += 1
                    if run.json:
                        sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
                    elif data["outcome"] in ("rejected", "invalid"):
                        if len(notable) < APPLY_LISTED:
                            notable.append((line.number, data))
                        else:
                            omitted += 1
                    elif (
                        data["outcome"] == "applied"
                        and getattr(line.item, "type", None) == "service_number.requested"
                        and data["service_number"]
                    ):
                        issued.append((line.number, line.item.instance_id, data["service_number"]))
                if run.json:
                    sys.stdout.flush()
    if not run.json:
        render.apply_summary(label, counts, notable, omitted, issued)
    if counts["invalid"]:
        raise typer.Exit(1)


# --- queries -------------------------------------------------------------------------------------


@guarded
def show(
    ctx: typer.Context,
    instance_id: Annotated[str, typer.Argument(metavar="ID", help="The instance id.")],
    at: Annotated[
        str | None,
        typer.Option(
            "--at", metavar="T", help="Evaluate eligibility at T (ISO 8601); default now."
        ),
    ] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """One instance: eligibility at T with reasons, slots, service numbers, filings."""

    when = parse_time(at, "--at") or utcnow()
    run = runtime(ctx, db, as_json)
    policy = run.policy
    with run.engine() as engine, Session(engine) as session:
        view = show_instance(session, instance_id=instance_id, at=when, policy=policy)
    if view is None:
        raise UserError(
            f"the ledger has no entry and no parked event for instance {instance_id!r}", 1
        )
    if run.json:
        print_json(view)
    else:
        names = {code: f"{p.name_zh} / {p.name_en}" for code, p in policy.products.items()}
        render.show(view, names)


@guarded
def history(
    ctx: typer.Context,
    instance_id: Annotated[str, typer.Argument(metavar="ID", help="The instance id.")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """The instance's ledger entries, oldest first (empty if none)."""

    run = runtime(ctx, db, as_json)
    with run.engine() as engine, Session(engine) as session:
        entries = instance_history(session, instance_id=instance_id)
    if run.json:
        print_json(entries)
    else:
        render.history(instance_id, entries)


@guarded
def instances(
    ctx: typer.Context,
    eligibility: Annotated[
        EligibilityChoice | None,
        typer.Option("--eligibility", metavar="S", help="Only instances with this eligibility."),
    ] = None,
    product: Annotated[
        ProductChoice | None,
        typer.Option("--product", metavar="P", help="Only instances of this product type."),
    ] = None,
    expiring_before: Annotated[
        str | None,
        typer.Option(
            "--expiring-before", metavar="T", help="Only instances whose end is before T."
        ),
    ] = None,
    at: Annotated[
        str | None,
        typer.Option("--at", metavar="T", help="Evaluate eligibility at T; default now."),
    ] = None,
    renewal_due: Annotated[
        bool,
        typer.Option(
            "--renewal-due",
            help="Only active subscriptions with numbers or filings that end within the "
            "policy's largest renewal reminder threshold of T.",
        ),
    ] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """List instances, filtered by eligibility at T, product type, expiry, renewal due."""

    when = parse_time(at, "--at") or utcnow()
    before = parse_time(expiring_before, "--expiring-before")
    run = runtime(ctx, db, as_json)
    policy = run.policy
    with run.engine() as engine, Session(engine) as session:
        rows = list_instances(
            session,
            policy=policy,
            at=when,
            eligibility=eligibility.value if eligibility is not None else None,
            product=product.value if product is not None else None,
            expiring_before=before,
            renewal_due=renewal_due,
        )
    if run.json:
        print_json(rows)
    else:
        render.instances(rows, iso_utc(when))


@guarded
def service_number(
    ctx: typer.Context,
    number: Annotated[str, typer.Argument(metavar="SN", help="The service number.")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """One service number: instance, status, issue/invalidation, filing; exit 1 if unknown."""

    run = runtime(ctx, db, as_json)
    with run.engine() as engine, Session(engine) as session:
        info = service_number_info(session, number=number)
    if info is None:
        raise UserError(f"no service number {number!r} was ever issued", 1)
    if run.json:
        print_json(info)
    else:
        render.service_number(info)


@guarded
def rejected(
    ctx: typer.Context,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, metavar="N", help="At most N dead letters, oldest first."),
    ] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """The dead-letter store: inputs that were never appended, with code and error."""

    run = runtime(ctx, db, as_json)
    with run.engine() as engine, Session(engine) as session:
        rows = rejected_events(session, limit=limit)
    if run.json:
        print_json(rows)
    else:
        render.rejected(rows)


@guarded
def parked(
    ctx: typer.Context,
    instance_id: Annotated[
        str | None,
        typer.Option("--instance", metavar="ID", help="Only this instance's parked events."),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, metavar="N", help="At most N, oldest first."),
    ] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Events waiting behind a gap in their instance's publish numbers (SPEC §9)."""

    run = runtime(ctx, db, as_json)
    with run.engine() as engine, Session(engine) as session:
        rows = parked_events(session, instance_id=instance_id, limit=limit)
    if run.json:
        print_json(rows)
    else:
        render.parked(rows)


# --- sweep, rebuild, verify ----------------------------------------------------------------------


@guarded
def sweep(
    ctx: typer.Context,
    now: Annotated[
        str | None,
        typer.Option("--now", metavar="T", help="Sweep as of T (ISO 8601); default now."),
    ] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run the expiry sweep once: expire subscriptions whose end is at or before T."""
    when = parse_time(now, "--now") or utcnow()
    run = runtime(ctx, db, as_json)
    policy = run.policy
    with run.engine() as engine:
        ledger = bootstrap.build_ledger(run.settings, engine, policy)
        expired = ledger.sweep(now=when, chunk_size=run.settings.sweep_chunk_size)
    report = {"as_of": iso_utc(when), "expired": expired}
    if run.json:
        print_json(report)
    else:
        render.sweep(report)


@guarded
def rebuild(
    ctx: typer.Context,
    check: Annotated[
        bool, typer.Option("--check", help="Only compare; write nothing; exit 1 on drift.")
    ] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Recompute every projection from the ledger; exit 1 if broken (or drift with --check)."""

    run = runtime(ctx, db, as_json)
    with run.engine() as engine:
        total = count_entries(engine) if not run.json and render.is_terminal() else 0
        enabled = total >= PROGRESS_MIN_ENTRIES
        with progress_bar(enabled, total, "rebuilding") as advance:
            report = rebuild_projections(engine, check=check, progress=advance).to_json()
    if run.json:
        print_json(report)
    else:
        render.rebuild(report, check=check)
    if report["broken"] or (check and report["drift"]):
        raise typer.Exit(1)


@guarded
def verify(ctx: typer.Context, db: DbOption = None, as_json: JsonOption = False) -> None:
    """Check every instance's hash chain against its head; exit 1 naming broken ones."""

    run = runtime(ctx, db, as_json)
    with run.engine() as engine:
        total = count_entries(engine) if not run.json and render.is_terminal() else 0
        enabled = total >= PROGRESS_MIN_ENTRIES
        with progress_bar(enabled, total, "verifying") as advance:
            verified = verify_chains(engine, progress=advance)
    report, feed = verified.to_json(), verified.feed.to_json()
    if run.json:
        print_json(report)  # SPEC §7's keys; the feed's figures go to stderr below
    else:
        render.verify({**report, "feed": feed})
    if report["broken"]:
        if not run.json:
            typer.echo(f"quota-ledger: broken chains: {', '.join(report['broken'])}", err=True)
        raise typer.Exit(1)
    if not report["ok"]:  # the change feed does not match the ledger (docs/changes.md)
        typer.echo(f"quota-ledger: change feed does not match the ledger: {feed}", err=True)
        raise typer.Exit(1)


# --- demo ----------------------------------------------------------------------------------------


@guarded
def demo(
    ctx: typer.Context,
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            metavar="D",
            file_okay=False,
            help="Directory for the demo's SQLite database (default: a new temporary one).",
        ),
    ] = None,
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            metavar="URL",
            help="Run on this (empty) database instead of a new SQLite file.",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Run the example scenario on a fresh embedded database and show the whole flow."""
    # Imported here, not at the top: the demo brings fakeredis and an embedded worker, which
    # every other command would pay for at start-up.
    from worker.demo import SCENARIO_CLOCK, DemoError, run_demo

    glob = ctx.find_root().obj or GlobalOptions()
    as_json = as_json or glob.json
    url = db or glob.db  # only an explicit --db: the configured database is left alone
    policy = bootstrap.policy_of(cli_settings(ctx))
    if url is None and directory is None:
        directory = Path(tempfile.mkdtemp(prefix="quota-ledger-demo-"))
    try:
        report = run_demo(policy, directory=None if url else directory, database_url=url)
    except DemoError as exc:
        raise UserError(str(exc)) from None
    except ValueError as exc:  # an unsupported --db URL
        raise UserError(str(exc)) from None
    data = report.to_json()
    data["database_url"] = mask_url(data["database_url"])
    if as_json:
        print_json(data)
        return
    clock = iso_utc(SCENARIO_CLOCK)
    where = f"directory {report.directory}" if report.directory else "the database given"
    render.message(f"Demo on {where}: {data['database_url']} (policy {report.policy_version})")
    render.demo_events("Step 1: examples/demo.jsonl (purchases, changes, requests)", data["events"])
    render.demo_events(
        "Step 2: examples/demo-filings.jsonl (numbers filled in from step 1)", data["filings"]
    )
    render.sweep(data["sweep"], report.swept)
    render.instances(data["instances"], clock)
    render.verify(data["verify"])
    db_arg = f"--db '{data['database_url']}'"
    render.message("Explore it further, for example:", "bold")
    for example in (
        f"quota-ledger {db_arg} show i-ecs-good --at {clock}",
        f"quota-ledger {db_arg} history i-nat-gw",
        f"quota-ledger {db_arg} instances --eligibility ineligible --at {clock}",
        f"quota-ledger {db_arg} verify",
    ):
        render.message(f"  {example}")
    if not data["verify"]["ok"]:
        raise typer.Exit(1)
