"""``quota-ledger``: the operator CLI (SPEC §7).

Thin by design: every command parses its options, opens the database (upgrading a fresh one to
the current schema first), calls one function of ``ledger`` and prints the result, either as
JSON (``--json``: the shapes of ``ledger.views``, nothing else on stdout) or as Rich tables
built from the same dicts (``worker.render``).

Exit codes: 0 success; 1 a "no" the command is about (``apply``: some line was invalid;
``show`` / ``service-number``: not found; ``rebuild``: broken chains, or drift with
``--check``; ``verify``: broken chains; ``demo``: its ledger did not verify); 2 a usage,
configuration or I/O error (bad option or timestamp, unreadable file, broken policy file,
database unreachable, demo directory or database not fresh). User errors never print a
traceback.
"""

from __future__ import annotations

import enum
import functools
import json
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, BinaryIO, NoReturn, ParamSpec, TypeVar

import click
import pydantic
import sqlalchemy.exc
import typer
from sqlalchemy import func, select
from sqlalchemy.engine import Engine, make_url

from events import PRODUCT_TYPES, iso_utc, parse_event, parse_iso_utc
from ledger.policy import Policy, PolicyError, load_policy
from ledger.settings import get_settings
from worker import render

P = ParamSpec("P")
R = TypeVar("R")

#: Lines per transaction in ``apply``.
APPLY_BATCH = 500
#: Inputs at least this large (bytes) get a progress bar on a terminal.
PROGRESS_MIN_BYTES = 1 << 20
#: Ledgers at least this large (entries) get a progress bar in rebuild / verify.
PROGRESS_MIN_ENTRIES = 20_000
#: Rejected / invalid lines listed by ``apply`` without ``--json``.
APPLY_LISTED = 100

ELIGIBILITY_STATUSES = ("eligible", "ineligible", "unknown", "not_needed", "not_required")

EligibilityChoice = enum.Enum(  # type: ignore[misc]
    "EligibilityChoice", {s: s for s in ELIGIBILITY_STATUSES}, type=str
)
ProductChoice = enum.Enum("ProductChoice", {p: p for p in PRODUCT_TYPES}, type=str)  # type: ignore[misc]

app = typer.Typer(
    name="quota-ledger",
    help=(
        "ICP filing quota ledger (备案服务号): an append-only ledger of instance events that "
        "decides service numbers and filings and keeps each instance's eligibility and slots."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
db_app = typer.Typer(no_args_is_help=True, help="Database schema commands.")
app.add_typer(db_app, name="db", help="Database schema: `db upgrade` creates or migrates it.")


# --- options shared by every command ------------------------------------------------------------

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        metavar="URL",
        help="Database URL (sqlite:///PATH or postgresql://…); overrides "
        "QUOTA_LEDGER_DATABASE_URL.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print only JSON (SPEC §7 shapes).")]


@dataclass
class GlobalOptions:
    db: str | None = None
    json: bool = False
    policy: Path | None = None


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"quota-ledger {version('quota-ledger')}")
        except PackageNotFoundError:
            typer.echo("quota-ledger (not installed)")
        raise typer.Exit(0)


@app.callback()
def main(
    ctx: typer.Context,
    db: DbOption = None,
    as_json: JsonOption = False,
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            metavar="FILE",
            help="Policy file (TOML); overrides QUOTA_LEDGER_POLICY_FILE (default: shipped).",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """ICP filing quota ledger. Options given here apply to every command."""
    _utf8_stdout()
    ctx.obj = GlobalOptions(db=db, json=as_json, policy=policy)


def _utf8_stdout() -> None:
    # JSON is printed with ensure_ascii=False (Chinese messages stay readable): make sure a
    # non-UTF-8 locale cannot turn that into a UnicodeEncodeError.
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if encoding != "utf8" and hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8")


# --- errors --------------------------------------------------------------------------------------


class UserError(Exception):
    """A problem the operator can fix; printed without a traceback."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"quota-ledger: error: {message}", err=True)
    raise typer.Exit(code)


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _settings_problems(exc: pydantic.ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        name = "_".join(str(part) for part in error["loc"]).upper()
        problems.append(f"QUOTA_LEDGER_{name}: {error['msg']}")
    return "; ".join(problems) or _first_line(exc)


def guarded(func_: Callable[P, R]) -> Callable[P, R]:
    """Turn the errors an operator can fix into a message on stderr and exit code 2."""

    @functools.wraps(func_)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func_(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except UserError as exc:
            fail(exc.message, exc.code)
        except PolicyError as exc:
            fail(str(exc))
        except pydantic.ValidationError as exc:
            fail(f"invalid configuration: {_settings_problems(exc)}")
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as exc:
            fail(f"database error: {_first_line(exc)}")
        except BrokenPipeError:
            # The reader went away (`… | head`): nothing more to say to anybody.
            sys.stdout = open(  # noqa: SIM115 - replaces stdout until exit
                "/dev/null", "w", encoding="utf-8"
            )
            raise typer.Exit(2) from None
        except OSError as exc:
            fail(f"I/O error: {exc}")
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


# --- the per-command runtime ---------------------------------------------------------------------


@dataclass
class Runtime:
    """The resolved configuration of one command run."""

    url: str
    json: bool
    policy_file: Path | None

    @functools.cached_property
    def policy(self) -> Policy:
        return load_policy(self.policy_file)

    @property
    def safe_url(self) -> str:
        return mask_url(self.url)

    @contextmanager
    def engine(self, *, ensure: bool = True) -> Iterator[Engine]:
        """An engine on the database, its schema brought to head first (a fresh file works)."""
        from ledger.db import ensure_schema, make_engine

        try:
            engine = make_engine(self.url)
        except (ValueError, sqlalchemy.exc.ArgumentError) as exc:
            raise UserError(str(exc)) from None
        try:
            if ensure:
                ensure_schema(engine)
            yield engine
        finally:
            engine.dispose()


def mask_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable database URL>"


def runtime(ctx: typer.Context, db: str | None, as_json: bool) -> Runtime:
    glob = ctx.find_root().obj or GlobalOptions()
    settings = get_settings()
    return Runtime(
        url=db or glob.db or settings.database_url,
        json=as_json or glob.json,
        policy_file=glob.policy if glob.policy is not None else settings.policy_file,
    )


def parse_time(value: str | None, option: str) -> datetime | None:
    """An aware UTC datetime from ``--at`` / ``--now`` style options; naive ones are refused."""
    if value is None:
        return None
    try:
        return parse_iso_utc(value)
    except ValueError as exc:
        raise typer.BadParameter(
            f"{value!r}: {exc} (use ISO 8601 with a timezone, e.g. 2026-09-01T00:00:00Z)",
            param_hint=option,
        ) from None


def now_utc() -> datetime:
    return datetime.now(UTC)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
    sys.stdout.flush()


@contextmanager
def progress_bar(
    enabled: bool, total: int | None, description: str, *, in_bytes: bool = False
) -> Iterator[Callable[[int], None]]:
    """A ``rich.progress`` bar on the terminal, or a no-op; yields ``advance(n)``."""
    if not enabled:
        yield lambda _n: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    count = DownloadColumn() if in_bytes else MofNCompleteColumn()
    columns = [TextColumn("{task.description}"), BarColumn(), count]
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=render.console(), transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


def count_entries(engine: Engine) -> int:
    from sqlmodel import Session

    from ledger.tables import LedgerEntry

    with Session(engine) as session:
        return session.execute(select(func.count()).select_from(LedgerEntry)).scalar_one()


# --- db ------------------------------------------------------------------------------------------


@db_app.command("upgrade")
@guarded
def db_upgrade(ctx: typer.Context, db: DbOption = None, as_json: JsonOption = False) -> None:
    """Create or migrate the database schema to the current version (idempotent)."""
    from ledger.db import current_revision, upgrade

    run = runtime(ctx, db, as_json)
    with run.engine(ensure=False) as engine:
        upgrade(engine)
        revision = current_revision(engine)
    if run.json:
        print_json({"database": run.safe_url, "revision": revision})
    else:
        render.message(f"Schema of {run.safe_url} is at revision {revision}.", "green")


# --- apply ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Line:
    number: int
    item: Any  # an Event or an EventRejection
    raw: str | None


def _read_lines(stream: BinaryIO, advance: Callable[[int], None]) -> Iterator[_Line]:
    """Non-blank input lines, parsed. Bytes are decoded here so that a line that is not UTF-8
    is dead-lettered with that reason (and its bytes kept as ``\\xNN``) instead of crashing."""
    for number, data in enumerate(stream, 1):
        advance(len(data))
        try:
            text: str | None = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None:
            if not text.strip():
                continue  # blank lines are skipped (SPEC §5)
            yield _Line(number, parse_event(text), text.rstrip("\r\n"))
        else:
            yield _Line(number, parse_event(data), None)


def _batches(lines: Iterator[_Line], size: int) -> Iterator[list[_Line]]:
    batch: list[_Line] = []
    for line in lines:
        batch.append(line)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


@contextmanager
def _open_input(file: str) -> Iterator[tuple[BinaryIO, int | None, str]]:
    if file == "-":
        yield sys.stdin.buffer, None, "stdin"
        return
    path = Path(file)
    try:
        stream = path.open("rb")
    except OSError as exc:
        raise UserError(f"cannot read {file}: {exc.strerror or exc}") from None
    with stream:
        try:
            size: int | None = path.stat().st_size
        except OSError:
            size = None
        yield stream, size, file


@app.command()
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
    from ledger.service import Ledger

    run = runtime(ctx, db, as_json)
    policy = run.policy  # a broken policy file fails before any input is read
    counts: Counter[str] = Counter()
    notable: list[tuple[int, dict[str, Any]]] = []
    omitted = 0
    with _open_input(file) as (stream, size, label), run.engine() as engine:
        ledger = Ledger(engine, policy)
        show_progress = (
            not run.json and render.is_terminal() and (size is None or size >= PROGRESS_MIN_BYTES)
        )
        with progress_bar(show_progress, size, f"applying {label}", in_bytes=True) as advance:
            for batch in _batches(_read_lines(stream, advance), APPLY_BATCH):
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
                if run.json:
                    sys.stdout.flush()
    if not run.json:
        render.apply_summary(label, counts, notable, omitted)
    if counts["invalid"]:
        raise typer.Exit(1)


# --- queries -------------------------------------------------------------------------------------


@app.command()
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
    from sqlmodel import Session

    from ledger.queries import show_instance

    when = parse_time(at, "--at") or now_utc()
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


@app.command()
@guarded
def history(
    ctx: typer.Context,
    instance_id: Annotated[str, typer.Argument(metavar="ID", help="The instance id.")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """The instance's ledger entries, oldest first (empty if none)."""
    from sqlmodel import Session

    from ledger.queries import instance_history

    run = runtime(ctx, db, as_json)
    with run.engine() as engine, Session(engine) as session:
        entries = instance_history(session, instance_id=instance_id)
    if run.json:
        print_json(entries)
    else:
        render.history(instance_id, entries)


@app.command()
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
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """List instances, filtered by eligibility at T, product type and expiry."""
    from sqlmodel import Session

    from ledger.queries import list_instances

    when = parse_time(at, "--at") or now_utc()
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
        )
    if run.json:
        print_json(rows)
    else:
        render.instances(rows, iso_utc(when))


@app.command("service-number")
@guarded
def service_number(
    ctx: typer.Context,
    number: Annotated[str, typer.Argument(metavar="SN", help="The service number.")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """One service number: instance, status, issue/invalidation, filing; exit 1 if unknown."""
    from sqlmodel import Session

    from ledger.queries import service_number_info

    run = runtime(ctx, db, as_json)
    with run.engine() as engine, Session(engine) as session:
        info = service_number_info(session, number=number)
    if info is None:
        raise UserError(f"no service number {number!r} was ever issued", 1)
    if run.json:
        print_json(info)
    else:
        render.service_number(info)


@app.command()
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
    from sqlmodel import Session

    from ledger.queries import rejected_events

    run = runtime(ctx, db, as_json)
    with run.engine() as engine, Session(engine) as session:
        rows = rejected_events(session, limit=limit)
    if run.json:
        print_json(rows)
    else:
        render.rejected(rows)


@app.command()
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
    from sqlmodel import Session

    from ledger.queries import parked_events

    run = runtime(ctx, db, as_json)
    with run.engine() as engine, Session(engine) as session:
        rows = parked_events(session, instance_id=instance_id, limit=limit)
    if run.json:
        print_json(rows)
    else:
        render.parked(rows)


# --- sweep, rebuild, verify ----------------------------------------------------------------------


@app.command()
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
    from ledger.service import Ledger

    when = parse_time(now, "--now") or now_utc()
    run = runtime(ctx, db, as_json)
    policy = run.policy
    with run.engine() as engine:
        expired = Ledger(engine, policy).sweep(now=when, chunk_size=get_settings().sweep_chunk_size)
    report = {"as_of": iso_utc(when), "expired": expired}
    if run.json:
        print_json(report)
    else:
        render.sweep(report)


@app.command()
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
    from ledger.audit import rebuild as rebuild_projections

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


@app.command()
@guarded
def verify(ctx: typer.Context, db: DbOption = None, as_json: JsonOption = False) -> None:
    """Check every instance's hash chain against its head; exit 1 naming broken ones."""
    from ledger.audit import verify as verify_chains

    run = runtime(ctx, db, as_json)
    with run.engine() as engine:
        total = count_entries(engine) if not run.json and render.is_terminal() else 0
        enabled = total >= PROGRESS_MIN_ENTRIES
        with progress_bar(enabled, total, "verifying") as advance:
            report = verify_chains(engine, progress=advance).to_json()
    if run.json:
        print_json(report)
    else:
        render.verify(report)
    if report["broken"]:
        if not run.json:
            typer.echo(f"quota-ledger: broken chains: {', '.join(report['broken'])}", err=True)
        raise typer.Exit(1)


# --- demo ----------------------------------------------------------------------------------------


@app.command()
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
    from worker.demo import SCENARIO_CLOCK, DemoError, run_demo

    glob = ctx.find_root().obj or GlobalOptions()
    as_json = as_json or glob.json
    url = db or glob.db  # only an explicit --db: the configured database is left alone
    policy = load_policy(glob.policy if glob.policy is not None else get_settings().policy_file)
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
    render.sweep(data["sweep"])
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


from worker.api.cli import serve_command  # noqa: E402  (the HTTP API; imports FastAPI lazily)

app.command("serve", help="Serve the HTTP API and the ops page (/ui/).")(serve_command)

from worker.pipeline_cli import beat_command, publish_command, worker_command  # noqa: E402

app.command("publish", help="Validate JSONL events and enqueue them for workers.")(publish_command)
app.command("worker", help="Run a Celery worker that applies queued events.")(worker_command)
app.command("beat", help="Run Celery beat: the expiry sweep every few minutes.")(beat_command)
