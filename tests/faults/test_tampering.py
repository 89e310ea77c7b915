"""Tampering (fault suite item 8), on both databases, through the operator's commands.

UPDATE, DELETE (and on PostgreSQL TRUNCATE) of ledger entries are refused by the database's own
triggers; with the triggers dropped, an edited, removed, inserted or reordered entry is found by
``quota-ledger verify``, which names the instance and exits 1, and ``rebuild`` leaves it alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from ledger.db import make_engine
from tests.support import Events

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]


def cli(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args, "--db", db_url],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def ledger_file(tmp_path: Path) -> Path:
    ev = Events("tamper")
    events = [
        ev.purchase("victim"),
        ev.request("victim", at=2),
        ev.request("victim", at=3),
        ev.purchase("bystander"),
        ev.request("bystander", at=2),
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def _drop_triggers(engine) -> None:
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            names = conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger'"))
            for (name,) in names.all():
                conn.execute(text(f'DROP TRIGGER "{name}"'))
        else:
            conn.execute(text("ALTER TABLE ledger_entries DISABLE TRIGGER USER"))


TAMPERINGS = {
    "edit": [
        "UPDATE ledger_entries SET reasons = '[\"forged\"]' WHERE instance_id = 'victim' AND instance_seq = 2"
    ],
    "remove-middle": [
        "DELETE FROM ledger_entries WHERE instance_id = 'victim' AND instance_seq = 2"
    ],
    "remove-last": ["DELETE FROM ledger_entries WHERE instance_id = 'victim' AND instance_seq = 3"],
    "reorder": [
        "UPDATE ledger_entries SET instance_seq = 100 WHERE instance_id = 'victim' AND instance_seq = 2",
        "UPDATE ledger_entries SET instance_seq = 2 WHERE instance_id = 'victim' AND instance_seq = 3",
        "UPDATE ledger_entries SET instance_seq = 3 WHERE instance_id = 'victim' AND instance_seq = 100",
    ],
    "insert": [
        "INSERT INTO ledger_entries (instance_id, instance_seq, event_id, type, occurred_at, recorded_at,"
        " payload, outcome, reasons, result, policy_version, prev_hash, hash)"
        " SELECT instance_id, 4, 'forged-4', type, occurred_at, recorded_at, payload, outcome, reasons,"
        " result, policy_version, hash, hash FROM ledger_entries"
        " WHERE instance_id = 'victim' AND instance_seq = 3"
    ],
}


def test_the_database_refuses_update_delete_and_truncate(db_url: str, ledger_file: Path) -> None:
    assert cli(db_url, "apply", str(ledger_file)).returncode == 0
    engine = make_engine(db_url)
    statements = ["UPDATE ledger_entries SET outcome = 'applied'", "DELETE FROM ledger_entries"]
    if engine.dialect.name == "postgresql":
        statements.append("TRUNCATE ledger_entries")
    try:
        for statement in statements:
            with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
                conn.execute(text(statement))
    finally:
        engine.dispose()
    result = cli(db_url, "verify", "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["ok"] is True


@pytest.mark.parametrize("tampering", list(TAMPERINGS))
def test_verify_names_the_tampered_instance(db_url: str, ledger_file: Path, tampering: str) -> None:
    assert cli(db_url, "apply", str(ledger_file)).returncode == 0
    engine = make_engine(db_url)
    try:
        _drop_triggers(engine)
        with engine.begin() as conn:
            for statement in TAMPERINGS[tampering]:
                conn.execute(text(statement))
    finally:
        engine.dispose()
    result = cli(db_url, "verify", "--json")
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["broken"] == ["victim"]
    rebuilt = cli(db_url, "rebuild", "--json")
    assert rebuilt.returncode == 1
    assert json.loads(rebuilt.stdout)["broken"] == ["victim"]
    # The bystander's chain is untouched and still sound.
    shown = cli(db_url, "show", "bystander", "--json", "--at", "2026-02-01T00:00:00Z")
    assert shown.returncode == 0 and json.loads(shown.stdout)["entries"] == 2
