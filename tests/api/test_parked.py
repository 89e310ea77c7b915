"""Parked events (SPEC §9) through the API and the ops page: ``GET /v1/parked`` is the CLI's
``parked --json``; an instance with parked events only is shown (``status: unknown``,
``entries: 0``), and its page lists what waits."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import Engine

from events import parse_event_obj
from ledger.policy import load_policy
from ledger.resequencer import Tag
from ledger.service import Ledger
from tests.helpers.api import AT, READ, READ_TOKEN, cli_json
from tests.support import Events

pytestmark = pytest.mark.timeout(120)


def park_a_request(engine: Engine) -> str:
    """A request published after a purchase that has not arrived: number 2 waits for 1."""
    request = Events("parked").request("i-waiting", at=1)
    ledger = Ledger(engine, load_policy())
    (result,) = ledger.apply([parse_event_obj(request)], sequence=[Tag("i-waiting", 7, 2)])
    assert result.outcome == "parked"
    return request["event_id"]


def test_parked_is_the_cli_json_and_show_counts_it(client, engine: Engine, db_url: str) -> None:
    event_id = park_a_request(engine)
    response = client.get("/v1/parked", headers=READ)
    assert response.status_code == 200
    body = response.json()
    assert body == cli_json(db_url, "parked")
    assert [
        (r["instance_id"], r["epoch"], r["n"], r["event_id"], r["waiting_for"]) for r in body
    ] == [("i-waiting", 7, 2, event_id, 1)]
    assert client.get("/v1/parked", params={"instance": "i-other"}, headers=READ).json() == []

    view = client.get("/v1/instances/i-waiting", params={"at": AT}, headers=READ).json()
    assert (view["status"], view["entries"], view["parked"]) == ("unknown", 0, 1)
    assert view == cli_json(db_url, "show", "i-waiting", "--at", AT)
    assert client.get("/v1/instances/i-waiting/entries", headers=READ).json() == []
    assert client.get("/v1/parked", headers={}).status_code == 401


def test_the_instance_page_lists_parked_events(client, engine: Engine) -> None:
    event_id = park_a_request(engine)
    client.post("/ui/login", data={"token": READ_TOKEN, "next": "/ui/"}, follow_redirects=False)
    page = client.get("/ui/instances/i-waiting").text
    assert 'id="parked"' in page and event_id in page
    assert "waiting for publish number 1" in page
