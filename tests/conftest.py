"""Shared fixtures for the whole test suite.

Databases
---------
``sqlite_url``    a file database in the test's tmp_path (``sqlite:///…/ledger.db``).
``postgres_url``  a fresh, empty PostgreSQL database ``ql_test_<hex>``, dropped afterwards (even
                  when the test fails). The server comes from ``QUOTA_LEDGER_TEST_PG_ADMIN_URL``
                  (default ``postgresql://postgres@127.0.0.1:5432/postgres``); CI guarantees it
                  runs, so an unreachable server FAILS the test instead of skipping it.
``db_url``        parametrized over both (ids ``sqlite`` / ``postgres``; the postgres case carries
                  ``pytest.mark.postgres``): use it for tests every backend must pass.
``engine``        ``make_engine(db_url)`` with the schema upgraded to head; disposed afterwards.

Select a backend with ``-k sqlite`` / ``-k postgres`` or ``-m postgres`` / ``-m "not postgres"``.

Broker and processes
--------------------
``redis_url``     a Redis database index of its own on 127.0.0.1:6379 (1–15, empty, claimed with a
                  SETNX marker), flushed afterwards.
``pipeline``      a factory of real ``quota-ledger`` processes (``worker``, ``beat``, …) on a fresh
                  PostgreSQL database and ``redis_url``, all stopped afterwards
                  (``tests.helpers.pipeline``).

Plain helpers (no fixtures) are in ``tests.helpers`` and ``tests.support``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from ledger.db import make_engine, normalize_url, upgrade
from ledger.policy import load_policy
from ledger.service import Ledger
from tests.helpers.ledger_harness import Harness
from tests.helpers.pipeline import Pipeline, pipeline_on
from tests.helpers.redis_db import private_redis_db
from tests.support import Numbers

PG_ADMIN_URL_ENV = "QUOTA_LEDGER_TEST_PG_ADMIN_URL"
PG_ADMIN_URL_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"


def _url_text(url: URL) -> str:
    return url.render_as_string(hide_password=False)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture(scope="session")
def pg_admin_engine() -> Iterator[Engine]:
    """An AUTOCOMMIT engine on the maintenance database, for CREATE/DROP DATABASE.

    Checked once per session: if the server does not answer, every PostgreSQL test errors
    with the same message instead of waiting for its own connect timeout.
    """
    url = normalize_url(os.environ.get(PG_ADMIN_URL_ENV, PG_ADMIN_URL_DEFAULT))
    engine = create_engine(
        url, isolation_level="AUTOCOMMIT", poolclass=NullPool, connect_args={"connect_timeout": 5}
    )
    problem = None
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        problem = exc
    if problem is not None:  # failed outside the except: no "during handling of…" noise
        engine.dispose()
        pytest.fail(
            f"PostgreSQL is required but does not answer at "
            f"{url.render_as_string(hide_password=True)} (set {PG_ADMIN_URL_ENV}): {problem}",
            pytrace=False,
        )
    yield engine
    engine.dispose()


@pytest.fixture
def postgres_url(pg_admin_engine: Engine) -> Iterator[str]:
    name = f"ql_test_{secrets.token_hex(6)}"
    with pg_admin_engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        # Plain ``postgresql://`` so psql/psycopg accept it too; make_engine picks psycopg 3.
        yield _url_text(pg_admin_engine.url.set(drivername="postgresql", database=name))
    finally:
        # FORCE terminates whatever the test left connected (PostgreSQL ≥ 13).
        with pg_admin_engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def db_url(request: pytest.FixtureRequest) -> str:
    """The URL of an empty database on each backend in turn."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on ``db_url`` with the schema at head."""
    eng = make_engine(db_url)
    try:
        upgrade(eng)
        yield eng
    finally:
        eng.dispose()


# -- a broker and real processes -----------------------------------------------------------------


@pytest.fixture
def redis_url() -> Iterator[str]:
    with private_redis_db() as url:
        yield url


@pytest.fixture
def pipeline(postgres_url: str, redis_url: str, tmp_path: Path) -> Iterator[Pipeline]:
    """A fresh PostgreSQL database, a Redis index, and whatever processes the test starts."""
    with pipeline_on(postgres_url, redis_url, tmp_path) as pipe:
        yield pipe


# -- a ledger service on a real database ------------------------------------------------------


@pytest.fixture(scope="module")
def sqlite_ledger(tmp_path_factory: pytest.TempPathFactory):
    """One SQLite ledger per test module (tests use distinct instance ids), with deterministic
    service numbers ``SN-1``, ``SN-2``, …"""
    url = f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield Harness(engine, Ledger(engine, load_policy(), new_number=Numbers()))
    engine.dispose()


@pytest.fixture
def any_ledger(engine: Engine):
    """A ledger service on every backend (``db_url``: SQLite and a fresh PostgreSQL)."""
    return Harness(engine, Ledger(engine, load_policy(), new_number=Numbers()))
