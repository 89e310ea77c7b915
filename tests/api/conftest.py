"""Fixtures of the HTTP API tests: an app on each backend (``db_url``) with the scenario applied,
a private Redis database as its broker, and a TestClient."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine

from ledger.settings import Settings
from tests.helpers.api import API_TOKENS, seed
from worker.api import create_app

with warnings.catch_warnings():
    # Newer Starlette prefers "httpx2" for its TestClient; httpx is what this project uses.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


@pytest.fixture
def settings(db_url: str, redis_url: str) -> Settings:
    return Settings(database_url=db_url, broker_url=redis_url, api_tokens=API_TOKENS)


@pytest.fixture
def make_client(settings: Settings) -> Iterator:
    """``make_client(**overrides)``: a started TestClient on an app built from the settings."""
    apps = []
    clients = []

    def make(**overrides: object) -> TestClient:
        app = create_app(settings.model_copy(update=overrides))
        apps.append(app)
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
    for app in apps:
        app.state.api.engine.dispose()


@pytest.fixture
def client(engine: Engine, make_client) -> TestClient:
    """A client on a database holding the scenario of ``tests.helpers.api``."""
    seed(engine)
    return make_client()


@pytest.fixture
def empty_client(engine: Engine, make_client) -> TestClient:
    return make_client()
