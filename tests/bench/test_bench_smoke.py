"""The benchmark suite at a tiny scale, so its code cannot rot. Asserts the shape of
``results.json`` and that every figure is a number — never a speed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from bench.env import pg_admin_url
from ledger.db import normalize_url

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = {
    "embedded",
    "query",
    "rebuild",
    "sweep",
    "sweep_tuned",
    "celery_single",
    "celery_batched",
    "resequencer",
    "scaling",
    "profile",
}
#: Scenarios that inform and have no target to meet.
INFORMATIONAL = {"resequencer", "scaling", "profile"}


def _bench_databases() -> set[str]:
    engine = create_engine(normalize_url(pg_admin_url()), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT datname FROM pg_database WHERE datname LIKE 'ql_bench_%'")
            )
            return {name for (name,) in rows}
    finally:
        engine.dispose()


def _numbers(value: object) -> None:
    if isinstance(value, dict):
        for item in value.values():
            _numbers(item)
    elif isinstance(value, list):
        for item in value:
            _numbers(item)
    elif isinstance(value, bool | str) or value is None:
        return
    else:
        assert isinstance(value, int | float) and math.isfinite(value), value


def test_smoke_run_writes_results(tmp_path: Path) -> None:
    before = _bench_databases()
    output = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--scale", "0.002", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    document = json.loads(output.read_text())
    machine = document["machine"]
    for key in ("cpu_model", "cores", "ram_bytes", "python", "postgresql", "redis", "date"):
        assert machine[key], key
    results = {r["scenario"]: r for r in document["scenarios"]}
    assert set(results) == SCENARIOS
    for name, result in results.items():
        assert "error" not in result, (name, result.get("error"))
        assert result["figures"], name
        _numbers(result["figures"] | {"ratio": result["ratio"]})
        # An informational scenario (the resequencer's cost, the profile) has no target.
        assert isinstance(result["met"], bool) or (name in INFORMATIONAL and result["met"] is None)
        assert result["target"]
        if name == "profile":
            assert result["baseline"] is None and result["ratio"] is None
        else:
            _numbers({k: v for k, v in result["baseline"].items() if k != "what"})
            assert result["ratio"] > 0
    # The loaded ledger is real: rebuild finds no drift and no broken chain.
    assert results["rebuild"]["figures"]["drift"] == 0
    assert results["rebuild"]["figures"]["broken"] == 0
    # Every worker process count ran, and each party's CPU per event was read.
    scaling = results["scaling"]["figures"]
    for label in ("single", "batched"):
        for processes in (1, 2, 4):
            run = scaling[f"{label}_{processes}"]
            assert run["events_per_s"] > 0
            assert set(run["cpu_us_per_event"]) == {"worker", "postgres", "redis", "publisher"}
            assert run["cpu_us_per_event"]["worker"] > 0
    # The profile ran after celery_batched and so estimated the Celery share; every stage was
    # timed on both paths (a stage never called would mean a wrapper no longer on the path).
    profile = results["profile"]["figures"]
    assert "celery_overhead_us_per_event" in profile
    for path in ("embedded_sqlite", "batched_postgresql"):
        called = set(profile[path]["calls"])
        assert called >= {"parse and validate", "canonical form", "lock and load", "decide"}
        assert called >= {"hash", "fold", "write", "commit", "idempotency lookup"}
        assert sum(profile[path]["share"].values()) == pytest.approx(1.0, abs=0.01)
    # Everything it created is gone.
    assert _bench_databases() <= before
