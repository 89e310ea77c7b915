"""Fixtures of the fault suite (``tests/faults``); its plain helpers are ``tests.helpers.faults``.

The pipeline fixtures are the whole suite's (``tests/conftest.py``): a Redis database index of its
own (``redis_url``) and a factory of real ``quota-ledger`` processes, each in its own process
group, killed with the group at teardown (``pipeline``). This module adds:

- ``redis_server``: a private ``redis-server`` (AOF, ``appendfsync always`` or, parametrized,
  ``everysec``) on a free port and a tmp directory, which a test may SIGKILL and restart;
- ``pg_server`` / ``private_pipeline``: a private PostgreSQL cluster (initdb in a temporary
  directory, a free port) which a test may SIGKILL and restart, and the pipeline on it;
- ``pg_admin``: AUTOCOMMIT on the shared server's maintenance database;
- ``figures``: every fault test records what it injected and what it counted; the figures are
  printed and merged into ``test-artifacts/faults-summary.json`` (the README quotes them).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from tests.helpers import free_port
from tests.helpers.faults import PostgresServer, RedisServer
from tests.helpers.pipeline import Pipeline, pipeline_on

REPO = Path(__file__).resolve().parents[2]
SUMMARY = REPO / "test-artifacts" / "faults-summary.json"


# --- a private redis-server --------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A private Redis; ``appendfsync always`` unless parametrized (``indirect=True``)."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(free_port(), directory, getattr(request, "param", "always"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- a private PostgreSQL cluster -------------------------------------------------------------


@pytest.fixture
def pg_server() -> Iterator[PostgresServer]:
    # Not under pytest's tmp_path: that is private to root, and the cluster's user must enter.
    directory = Path(tempfile.mkdtemp(prefix="ql-faults-pg-"))
    server = PostgresServer(free_port(), directory)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def private_pipeline(
    pg_server: PostgresServer,
    redis_url: str,
    tmp_path: Path,
) -> Iterator[Pipeline]:
    """The ``pipeline`` fixture's process factory, on a database of the private cluster
    ``pg_server`` (which the test may kill) and a Redis index of its own."""
    with pipeline_on(pg_server.create_database("ledger"), redis_url, tmp_path) as pipe:
        yield pipe


# --- databases ---------------------------------------------------------------------------------


@pytest.fixture
def pg_admin(pg_admin_engine: Engine) -> Engine:
    """AUTOCOMMIT on the maintenance database (pg_stat_activity, pg_terminate_backend)."""
    return pg_admin_engine


# --- figures -----------------------------------------------------------------------------------


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A dict the test fills; printed and merged into ``test-artifacts/faults-summary.json``
    under the test's name once the test passed."""
    data: dict[str, Any] = {}
    started = time.monotonic()
    yield data
    report = getattr(request.node, "rep_call", None)
    if not data or report is None or not report.passed:
        return
    data["seconds"] = round(time.monotonic() - started, 1)
    data["recorded_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    SUMMARY.parent.mkdir(exist_ok=True)
    try:
        summary = json.loads(SUMMARY.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    summary[request.node.name] = data
    SUMMARY.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"\nfault figures {request.node.name}: {json.dumps(data, sort_keys=True)}")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
