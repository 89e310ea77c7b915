"""What every ``quota-ledger`` command shares: global options, the guard that turns operator
errors into one line and exit code 2, the runtime (settings, policy, engine), time parsing,
JSON printing, progress bars and input files."""

from __future__ import annotations

import enum
import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, BinaryIO, NoReturn, ParamSpec, TypeVar

import click
import pydantic
import sqlalchemy.exc
import typer
from sqlalchemy import func, select
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session

from events import PRODUCT_TYPES, parse_iso_utc
from ledger.db import error_line
from ledger.policy import Policy, PolicyError
from ledger.rules import ELIGIBILITY_STATUSES
from ledger.settings import Settings, get_settings
from ledger.tables import LedgerEntry
from worker import bootstrap, render

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


EligibilityChoice = enum.Enum(  # type: ignore[misc]
    "EligibilityChoice", {s: s for s in ELIGIBILITY_STATUSES}, type=str
)
ProductChoice = enum.Enum("ProductChoice", {p: p for p in PRODUCT_TYPES}, type=str)  # type: ignore[misc]


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


def _settings_problems(exc: pydantic.ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        name = "_".join(str(part) for part in error["loc"]).upper()
        problems.append(f"QUOTA_LEDGER_{name}: {error['msg']}")
    return "; ".join(problems) or error_line(exc)


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
            fail(f"database error: {error_line(exc)}")
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
    """The resolved configuration of one command run: the settings (with ``--db`` and
    ``--policy`` applied) and whether to print JSON. Engine, policy and ledger come from
    ``worker.bootstrap``, like every other process's."""

    settings: Settings
    json: bool

    @property
    def url(self) -> str:
        return self.settings.database_url

    @functools.cached_property
    def policy(self) -> Policy:
        return bootstrap.policy_of(self.settings)

    @property
    def safe_url(self) -> str:
        return mask_url(self.url)

    @contextmanager
    def engine(self, *, ensure: bool = True) -> Iterator[Engine]:
        """An engine on the database, its schema brought to head first (a fresh file works)."""
        # A CLI command that opens the database works in batches (apply, rebuild, verify,
        # sweep, publish's dead letters) and is the whole process: tune it for that.
        bootstrap.tune_for_batches()
        try:
            engine = bootstrap.open_engine(self.settings, schema=ensure)
        except (ValueError, sqlalchemy.exc.ArgumentError) as exc:
            raise UserError(str(exc)) from None
        try:
            yield engine
        finally:
            engine.dispose()


def mask_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable database URL>"


def cli_settings(ctx: typer.Context, db: str | None = None) -> Settings:
    """The environment's settings with the command's ``--db`` (else the global one) and the
    global ``--policy`` applied: resolved here only, for every command."""
    glob = ctx.find_root().obj or GlobalOptions()
    settings = get_settings()
    update: dict[str, Any] = {}
    if db or glob.db:
        update["database_url"] = db or glob.db
    if glob.policy is not None:
        update["policy_file"] = glob.policy
    return settings.model_copy(update=update) if update else settings


def runtime(ctx: typer.Context, db: str | None, as_json: bool) -> Runtime:
    glob = ctx.find_root().obj or GlobalOptions()
    return Runtime(cli_settings(ctx, db), json=as_json or glob.json)


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

    with Session(engine) as session:
        return session.execute(select(func.count()).select_from(LedgerEntry)).scalar_one()


# --- db ------------------------------------------------------------------------------------------


@contextmanager
def open_input(file: str) -> Iterator[tuple[BinaryIO, int | None, str]]:
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
