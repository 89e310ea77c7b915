"""The benchmark's bulk-loaded ledgers are real ledgers: ``rebuild --check`` finds no drift and
``verify`` passes over them, and templated instances equal re-recorded ones."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import data
from ledger.db import make_engine, upgrade
from ledger.policy import load_policy
from ledger.service import Ledger

pytestmark = pytest.mark.postgres


def _cli(url: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "--db", url, *args, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_loaded_ledger_rebuilds_without_drift_and_verifies(postgres_url: str) -> None:
    upgrade(postgres_url)
    instances, due = 400, 7
    entries = data.load_ledger(postgres_url, instances=instances, due=due, processes=2)
    assert entries == data.expected_entries(instances, due)
    rebuilt = _cli(postgres_url, "rebuild", "--check")
    assert rebuilt == {"instances": instances, "entries": entries, "drift": [], "broken": []}
    verified = _cli(postgres_url, "verify")
    assert verified == {"ok": True, "entries": entries, "instances": instances, "broken": []}
    # The due instances are exactly what the sweep expires.
    engine = make_engine(postgres_url)
    try:
        assert Ledger(engine, load_policy()).sweep(now=data.NOW) == due
    finally:
        engine.dispose()
    assert _cli(postgres_url, "verify")["ok"]


def test_templated_instances_equal_recorded_ones() -> None:
    for index in range(0, 200, 7):
        data.spot_check(index, 200, 9, data.random_numbers(2))


def test_event_stream_is_valid_and_interleaved(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        lines = data.event_lines(1200)
        outcomes = [r.outcome for r in Ledger(engine, load_policy()).apply_lines(lines)]
    finally:
        engine.dispose()
    assert len(outcomes) == 1200
    assert "invalid" not in outcomes and "duplicate" not in outcomes
    assert {"applied", "rejected"} <= set(outcomes)
