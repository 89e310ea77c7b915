"""The API process keeps CPython's collector as it is: the batch tuning of worker and CLI
processes (``worker.bootstrap.tune_for_batches``) is neither set by building the app nor
toggled by a request that writes to the ledger (dead letters go through ``Ledger.apply``)."""

from __future__ import annotations

import gc
import warnings
from pathlib import Path

import pytest

from ledger.settings import Settings
from tests.helpers.api import API_TOKENS, INGEST, closed_port
from worker.api import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


def test_the_api_never_changes_the_collector_thresholds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    changes: list[tuple[int, ...]] = []
    monkeypatch.setattr(gc, "set_threshold", lambda *thresholds: changes.append(thresholds))
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'api.db'}",
        broker_url=f"redis://127.0.0.1:{closed_port()}/0",  # not needed: nothing is valid
        api_tokens=API_TOKENS,
    )
    app = create_app(settings)
    with TestClient(app) as client:
        response = client.post("/v1/events", json=[{"junk": 1}], headers=INGEST)
        assert response.status_code == 202
        assert response.json()["invalid_count"] == 1
    app.state.api.engine.dispose()
    assert changes == []
