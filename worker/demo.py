"""The demo scenario: two JSONL files applied through the ordinary write path.

* ``examples/demo.jsonl`` — purchases, conversions, bandwidth changes, a release and service
  number requests (issued ones and a refusal of every common kind). It is a plain event file:
  ``quota-ledger apply examples/demo.jsonl`` works on it too.
* ``examples/demo-filings.jsonl`` — filings, a withdrawal, an expiry and a late renewal. Filings
  must present service numbers, which are random, so this file is a *template*: a placeholder
  ``{{number:INSTANCE:K}}`` stands for the K-th number issued to INSTANCE by the first file
  (1-based, in the order they were issued). The demo fills the placeholders in from the
  answers the ledger gave for the first file, then applies the second file.

Both files travel the real pipeline: they go down the ingest path of ``quota-ledger publish``
(``worker.ingest``) to an embedded Redis (``fakeredis`` over TCP) and are applied by a real
Celery worker (a thread, solo pool, the production tasks) — no Redis or PostgreSQL server is
needed. Each answer is read
back from the ledger once every event has arrived (``worker.embedded``).

Then the expiry sweep runs at the scenario's fixed clock (:data:`SCENARIO_CLOCK`, in-process:
beat's sweep uses the wall clock) and the instances are listed as of that clock, so everything
but the random numbers is the same on every run.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from events import iso_utc
from ledger.audit import verify
from ledger.db import session_scope
from ledger.policy import Policy
from ledger.queries import list_instances
from ledger.service import ApplyResult
from ledger.settings import Settings
from ledger.tables import DeadLetter, LedgerEntry
from worker import bootstrap
from worker.embedded import embedded_pipeline

EVENTS_FILE = "demo.jsonl"
FILINGS_FILE = "demo-filings.jsonl"
DATABASE_FILE = "quota-ledger.db"

#: The demo's "now": after every scenario event, so the sweep and the listing are stable.
SCENARIO_CLOCK = datetime(2026, 9, 1, tzinfo=UTC)

PLACEHOLDER = re.compile(r"\{\{number:([^{}]+):([0-9]+)\}\}")


class DemoError(RuntimeError):
    """The demo cannot run (examples missing, directory not fresh, broken template)."""


def examples_dir() -> Traversable:
    """The shipped examples: inside an installed wheel (``ledger/examples``), else the repo's."""
    try:
        packaged = resources.files("ledger") / "examples"
        if packaged.is_dir() and (packaged / EVENTS_FILE).is_file():
            return packaged
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        pass
    checkout = Path(__file__).resolve().parent.parent / "examples"
    if (checkout / EVENTS_FILE).is_file():
        return checkout
    raise DemoError(
        f"cannot find the demo scenario ({EVENTS_FILE}) in the installed package "
        f"(ledger/examples) nor in {checkout}"
    )


def fill_placeholders(line: str, issued: dict[str, list[str]]) -> str:
    """Replace every ``{{number:INSTANCE:K}}`` by the K-th number issued to INSTANCE."""

    def number(match: re.Match[str]) -> str:
        instance_id, k = match[1], int(match[2])
        numbers = issued.get(instance_id, [])
        if not 1 <= k <= len(numbers):
            raise DemoError(
                f"{FILINGS_FILE} refers to {match[0]}, but {instance_id} was issued "
                f"{len(numbers)} number(s) by {EVENTS_FILE}"
            )
        return numbers[k - 1]

    return PLACEHOLDER.sub(number, line)


@dataclass
class DemoReport:
    directory: Path | None
    database_url: str
    policy_version: str
    events: list[dict[str, Any]] = field(default_factory=list)
    filings: list[dict[str, Any]] = field(default_factory=list)
    sweep_expired: int = 0
    swept: list[str] = field(default_factory=list)  # the instances the sweep expired
    instances: list[dict[str, Any]] = field(default_factory=list)
    verify: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory) if self.directory is not None else None,
            "database_url": self.database_url,
            "policy_version": self.policy_version,
            "scenario_clock": iso_utc(SCENARIO_CLOCK),
            "events": self.events,
            "filings": self.filings,
            "sweep": {"as_of": iso_utc(SCENARIO_CLOCK), "expired": self.sweep_expired},
            "instances": self.instances,
            "verify": self.verify,
        }


def _steps(source: str, lines: list[str], results: Iterable[ApplyResult]) -> list[dict[str, Any]]:
    """One row per non-blank line: its result plus the type and instance read from the line."""
    rows = []
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    for (line_no, line), result in zip(numbered, results, strict=True):
        try:
            data = json.loads(line)
        except ValueError:
            data = {}
        data = data if isinstance(data, dict) else {}
        rows.append(
            {
                "file": source,
                "line": line_no,
                "type": data.get("type"),
                "instance_id": data.get("instance_id"),
                **result.to_json(),
            }
        )
    return rows


def prepare_directory(directory: Path) -> str:
    """The SQLite URL of a new database in ``directory`` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    database = directory / DATABASE_FILE
    if database.exists():
        raise DemoError(
            f"{database} already exists: the demo needs a fresh directory "
            "(remove it or pass another --dir)"
        )
    return f"sqlite:///{database}"


def _require_empty(engine: Engine) -> None:
    url = engine.url
    with session_scope(engine) as session:
        entries = session.execute(select(func.count()).select_from(LedgerEntry)).scalar_one()
        letters = session.execute(select(func.count()).select_from(DeadLetter)).scalar_one()
    if entries or letters:
        raise DemoError(
            f"the database {url.render_as_string(hide_password=True)} already holds "
            f"{entries} ledger entries and {letters} dead letters: the demo needs an empty "
            "database"
        )


def run_demo(
    policy: Policy, *, directory: Path | None = None, database_url: str | None = None
) -> DemoReport:
    """Run the scenario on ``database_url`` (which must be empty) or, without one, on a new
    SQLite database in ``directory``."""
    source = examples_dir()
    events_lines = (source / EVENTS_FILE).read_text(encoding="utf-8").splitlines()
    filing_template = (source / FILINGS_FILE).read_text(encoding="utf-8").splitlines()
    if database_url is None:
        if directory is None:
            raise DemoError("the demo needs a directory or a database URL")
        database_url = prepare_directory(directory)

    settings = Settings(database_url=database_url)
    engine = bootstrap.open_engine(settings)
    try:
        _require_empty(engine)
        ledger = bootstrap.build_ledger(settings, engine, policy)
        report = DemoReport(directory, database_url, policy.version)

        # Steps 1 and 2 go through the real queue: an embedded Redis (fakeredis) and a Celery
        # worker thread running the production tasks; the answers are read back from the ledger.
        with embedded_pipeline(engine, policy) as pipeline:
            # Step 1: the plain event file.
            report.events = _steps(EVENTS_FILE, events_lines, pipeline.apply_lines(events_lines))
            issued: dict[str, list[str]] = defaultdict(list)
            for step in report.events:
                if (
                    step["type"] == "service_number.requested"
                    and step["outcome"] == "applied"
                    and step["service_number"]
                ):
                    issued[step["instance_id"]].append(step["service_number"])

            # Step 2: the filing template, placeholders filled from step 1's answers.
            filing_lines = [fill_placeholders(line, issued) for line in filing_template]
            report.filings = _steps(FILINGS_FILE, filing_lines, pipeline.apply_lines(filing_lines))

        # Step 3: the expiry sweep at the scenario's clock, then the state as of that clock.
        with session_scope(engine) as session:
            before = list_instances(session, policy=policy, at=SCENARIO_CLOCK)
        report.sweep_expired = ledger.sweep(now=SCENARIO_CLOCK)
        with session_scope(engine) as session:
            report.instances = list_instances(session, policy=policy, at=SCENARIO_CLOCK)
        was_expired = {row["instance_id"] for row in before if row["status"] == "expired"}
        report.swept = [
            row["instance_id"]
            for row in report.instances
            if row["status"] == "expired" and row["instance_id"] not in was_expired
        ]
        report.verify = verify(engine).to_json()
        return report
    finally:
        engine.dispose()
