"""The CLI commands of the distributed pipeline: ``publish``, ``reconcile``, ``worker`` and
``beat``.

Plain functions with Typer annotations, registered in ``worker/cli/app.py`` with
``app.command(...)(publish_command)``; they share ``worker.cli.options`` with the ledger commands.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from contextlib import ExitStack
from typing import Annotated, Any

import kombu.exceptions
import sqlalchemy.exc
import typer
from kombu.utils.url import maybe_sanitize_url
from rich.table import Table
from rich.text import Text
from sqlmodel import Session

from events import BaseEvent, EventRejection
from events.jsonl import batches, read_lines
from events.publish import (
    DEFAULT_BATCH_SIZE,
    MAX_BATCH_SIZE,
    QUEUE_EVENTS,
    QUEUE_SWEEP,
    enqueue_batches,
)
from ledger.db import error_line, make_engine
from ledger.queries import unaccounted_event_ids
from ledger.results import ApplyResult
from ledger.service import Ledger
from worker import bootstrap, render
from worker.api.broker import broker_backlog
from worker.cli.options import (
    UserError,
    cli_settings,
    fail,
    guarded,
    open_input,
    progress_bar,
    runtime,
)
from worker.ingest import BrokerUnavailable, enqueue_to, ingest

__all__ = ["beat_command", "publish_command", "reconcile_command", "worker_command"]

#: Invalid lines listed by ``publish`` without ``--json``.
PUBLISH_LISTED = 100

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        metavar="URL",
        help="Database URL for dead letters (invalid lines); overrides QUOTA_LEDGER_DATABASE_URL.",
        show_default=False,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print only JSON: one object per input line.")
]
LogLevelOption = Annotated[
    str,
    typer.Option(
        "--loglevel",
        "-l",
        metavar="L",
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL.",
    ),
]


# --- publish -------------------------------------------------------------------------------------


def publish_command(
    ctx: typer.Context,
    file: Annotated[
        str, typer.Argument(metavar="FILE|-", help="A JSONL file of events, or - for stdin.")
    ],
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            min=1,
            max=MAX_BATCH_SIZE,
            metavar="N",
            help="Input lines per queue message (one worker transaction each).",
        ),
    ] = DEFAULT_BATCH_SIZE,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Validate JSONL events and enqueue them for the workers; invalid lines are dead-lettered
    in the database and reported with their line numbers (exit 1)."""
    guarded(_publish)(ctx, file, batch_size, db, as_json)


def _publish(ctx: typer.Context, file: str, batch_size: int, db: str | None, as_json: bool) -> None:

    # The input reading is apply's (events.jsonl), so both commands treat every line alike.
    run = runtime(ctx, db, as_json)
    broker_url = run.settings.broker_url
    enqueue = enqueue_to(broker_url, batch_size=batch_size)
    queued = invalid = messages = 0
    listed: list[tuple[int, dict[str, Any]]] = []
    with ExitStack() as stack:
        stream, size, label = stack.enter_context(open_input(file))
        ledger: Ledger | None = None

        def dead_letter(rejections: list[EventRejection]) -> list[ApplyResult]:
            # The database is opened only when a line is invalid: a clean file needs none.
            nonlocal ledger
            if ledger is None:
                engine = stack.enter_context(run.engine())
                ledger = bootstrap.build_ledger(run.settings, engine, run.policy)
            return ledger.apply(rejections)

        show_progress = not run.json and render.is_terminal()
        bar = stack.enter_context(
            progress_bar(show_progress, size, f"publishing {label}", in_bytes=True)
        )
        for chunk in batches(read_lines(stream, bar), batch_size):
            try:
                done = ingest(
                    [line.item for line in chunk], enqueue=enqueue, dead_letter=dead_letter
                )
            except BrokerUnavailable as exc:
                raise UserError(f"broker error ({_mask(broker_url)}): {exc}") from None
            if done.queued:  # a chunk is at most batch_size lines: one message
                messages += 1
                queued += len(done.queued)
            for line, answer in zip(chunk, done.answers, strict=True):
                data = answer.to_json()
                if answer.outcome == "invalid":
                    invalid += 1
                    if len(listed) < PUBLISH_LISTED:
                        listed.append((line.number, data))
                if run.json:
                    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
            if run.json:
                sys.stdout.flush()
    if not run.json:
        _publish_summary(label, queued, messages, invalid, listed, run.safe_url)
    if invalid:
        raise typer.Exit(1)


def _mask(url: str) -> str:

    return str(maybe_sanitize_url(url))


def _publish_summary(
    label: str,
    queued: int,
    messages: int,
    invalid: int,
    listed: list[tuple[int, dict[str, Any]]],
    database: str,
) -> None:

    out = render.console()
    if listed:
        table = Table(title="Invalid lines (dead-lettered, not queued)")
        for column in ("line", "event", "code", "error"):
            table.add_column(column)
        for number, result in listed:
            table.add_row(
                str(number),
                result["event_id"] or "",
                ", ".join(result["reasons"]),
                result.get("error") or "",
            )
        out.print(table)
        if invalid > len(listed):
            out.print(Text(f"… and {invalid - len(listed)} more invalid lines.", style="dim"))
    out.print(
        Text(
            f"Published {label}: {queued} event(s) queued in {messages} message(s) "
            f"on {QUEUE_EVENTS}; {invalid} invalid line(s)"
            + (f" dead-lettered in {database}." if invalid else "."),
            style="bold",
        )
    )


# --- reconcile -----------------------------------------------------------------------------------


def reconcile_command(
    ctx: typer.Context,
    file: Annotated[
        str, typer.Argument(metavar="FILE|-", help="The JSONL file that was published, or -.")
    ],
    republish: Annotated[
        bool,
        typer.Option("--republish", help="Publish the unaccounted events again (idempotent)."),
    ] = False,
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print only JSON.")] = False,
) -> None:
    """The publisher-side check: which valid events of FILE the ledger has neither appended,
    nor dead-lettered, nor parked. Run it once the broker holds no message (the answer says
    whether it does): an event still unaccounted for then was lost by the broker (a Redis that
    crashed with appendfsync everysec), and --republish sends it again. Exit 1 if any is
    unaccounted."""
    guarded(_reconcile)(ctx, file, republish, db, as_json)


def _reconcile(
    ctx: typer.Context, file: str, republish: bool, db: str | None, as_json: bool
) -> None:

    run = runtime(ctx, db, as_json)
    broker_url = run.settings.broker_url
    events: dict[str, BaseEvent] = {}
    with open_input(file) as (stream, _size, label):
        for line in read_lines(stream, lambda _n: None):
            if isinstance(line.item, BaseEvent):  # invalid lines were dead-lettered by publish
                events.setdefault(line.item.event_id, line.item)
    try:
        backlog = broker_backlog(broker_url, QUEUE_EVENTS)
    except Exception as exc:
        raise UserError(f"broker error ({_mask(broker_url)}): {exc}") from None
    with run.engine() as engine, Session(engine) as session:
        missing = unaccounted_event_ids(session, event_ids=list(events))
    republished = 0
    if republish and missing:
        try:
            republished = enqueue_batches([events[i] for i in missing], broker_url=broker_url)
        except kombu.exceptions.OperationalError as exc:
            raise UserError(f"broker error ({_mask(broker_url)}): {exc}") from None
    settled = backlog is not None and backlog == {"queued": 0, "unacked": 0}
    report = {
        "checked": len(events),
        "unaccounted": missing,
        "broker": backlog,
        "settled": settled,
        "republished": republished,
    }
    if run.json:
        sys.stdout.write(json.dumps(report, ensure_ascii=False) + "\n")
    else:
        out = render.console()
        for event_id in missing[:PUBLISH_LISTED]:
            out.print(event_id)
        state = (
            "the broker holds no message, so these were lost"
            if settled
            else f"the broker still holds messages ({backlog}): run again once it is empty"
        )
        out.print(
            Text(
                f"Reconciled {label}: {len(events)} event(s), {len(missing)} not applied,"
                " dead-lettered or parked"
                + (f" ({state})" if missing else "")
                + (f"; {republished} republished." if republish else "."),
                style="bold",
            )
        )
    if missing:
        raise typer.Exit(1)


# --- worker and beat -----------------------------------------------------------------------------


def worker_command(
    ctx: typer.Context,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency",
            "-c",
            min=1,
            metavar="N",
            help="Worker processes (default: the number of CPUs).",
            show_default=False,
        ),
    ] = None,
    pool: Annotated[
        str,
        typer.Option("--pool", "-P", metavar="P", help="prefork, threads or solo (Celery's pool)."),
    ] = "prefork",
    queues: Annotated[
        str,
        typer.Option("--queues", "-Q", metavar="Q", help="Comma-separated queues to consume."),
    ] = f"{QUEUE_EVENTS},{QUEUE_SWEEP}",
    loglevel: LogLevelOption = "INFO",
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            metavar="URL",
            help="Database the worker applies to; overrides QUOTA_LEDGER_DATABASE_URL.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run a Celery worker that applies queued events and runs the sweeps."""
    guarded(_worker)(ctx, concurrency, pool, queues, loglevel, db)


def _worker(
    ctx: typer.Context,
    concurrency: int | None,
    pool: str,
    queues: str,
    loglevel: str,
    db: str | None,
) -> None:
    settings = cli_settings(ctx, db)
    _refuse_unusable_database(settings.database_url)
    if settings.metrics_port is not None:
        _serve_metrics(settings.metrics_port)

    # The Celery app (and with it the tasks and the transport) only for the commands that run it.
    from worker.celery_app import create_app

    celery = create_app(settings)
    argv = [
        "worker",
        f"--loglevel={loglevel}",
        f"--pool={pool}",
        f"--queues={queues}",
        # Unique per process, so that two workers on one host are two nodes.
        f"--hostname=quota-ledger-{os.getpid()}@%h",
        # No revokes or worker-to-worker events are used: skip the start-up handshake (mingle,
        # about a second) and the gossip chatter; remote control (inspect ping) stays on.
        "--without-mingle",
        "--without-gossip",
    ]
    if concurrency is not None:
        argv.append(f"--concurrency={concurrency}")
    celery.worker_main(argv)


def _refuse_unusable_database(url: str) -> None:
    """A database URL that can never work (malformed, or a SQLite file in a directory that does
    not exist) is a usage error at start-up, not a traceback every few seconds from a running
    worker. A database that is only down is waited for: the worker retries."""
    try:
        make_engine(url).dispose()  # builds the engine without connecting
    except (ValueError, sqlalchemy.exc.ArgumentError) as exc:
        fail(error_line(exc))


def _serve_metrics(port: int) -> None:
    """Serve Prometheus metrics of every pool process on ``port`` (prometheus-client's
    multiprocess mode: each process writes its samples to a shared directory)."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="quota-ledger-metrics-")
    # Imported only now: prometheus_client reads PROMETHEUS_MULTIPROC_DIR when it is imported.
    from celery.signals import worker_process_shutdown
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    start_http_server(port, registry=registry)

    @worker_process_shutdown.connect(weak=False)
    def _mark_dead(pid: int | None = None, **_: Any) -> None:
        multiprocess.mark_process_dead(pid or os.getpid())


def beat_command(ctx: typer.Context, loglevel: LogLevelOption = "INFO") -> None:
    """Run Celery beat: the expiry sweep every QUOTA_LEDGER_SWEEP_INTERVAL seconds (run exactly
    one beat; a second one is harmless, its overlapping sweeps are skipped)."""
    guarded(_beat)(ctx, loglevel)


def _beat(ctx: typer.Context, loglevel: str) -> None:
    from worker.celery_app import beat_schedule_path, create_app

    settings = cli_settings(ctx)
    _refuse_unusable_database(settings.database_url)
    celery = create_app(settings)
    schedule = beat_schedule_path(settings)
    celery.Beat(loglevel=loglevel, schedule=str(schedule)).run()
