"""``GET /v1/changes`` on both backends: pages after a cursor, the long poll, read scope, and
answers that conform to the OpenAPI document."""

from __future__ import annotations

import threading
import time

import jsonschema
import pytest
from sqlalchemy.engine import Engine

from events import parse_event_obj
from ledger.changefeed import changes_after
from ledger.policy import load_policy
from ledger.service import Ledger
from tests.helpers.api import INGEST, READ, seed
from tests.support import Events

pytestmark = pytest.mark.timeout(120)


def test_pages_follow_the_cursor_and_match_the_ledger(client, engine: Engine) -> None:
    everything = changes_after(engine, after=0, limit=1000)
    assert everything, "the scenario writes changes"
    cursor, seen = 0, []
    while True:
        body = client.get("/v1/changes", params={"after": cursor, "limit": 3}, headers=READ).json()
        if not body["items"]:
            assert body["next_after"] == cursor
            break
        seen += body["items"]
        cursor = body["next_after"]
        assert cursor == body["items"][-1]["position"]
    assert seen == everything


def test_the_long_poll_waits_for_a_change_and_is_bounded(client, engine: Engine) -> None:
    head = len(changes_after(engine, after=0, limit=1000))
    started = time.monotonic()
    body = client.get("/v1/changes", params={"after": head, "wait": 0.5}, headers=READ).json()
    assert body == {"items": [], "next_after": head}
    assert 0.4 <= time.monotonic() - started < 5
    ledger = Ledger(engine, load_policy())
    ev = Events("poll")
    timer = threading.Timer(
        0.3, ledger.apply, args=[[parse_event_obj(ev.purchase("i-poll", "virtual_host"))]]
    )
    timer.start()
    try:
        body = client.get("/v1/changes", params={"after": head, "wait": 20}, headers=READ).json()
    finally:
        timer.join()
    assert [c["instance_id"] for c in body["items"]] == ["i-poll", "i-poll"]
    assert body["items"][0]["position"] == head + 1


@pytest.mark.parametrize(
    "params",
    [{"after": -1}, {"after": "x"}, {"limit": 0}, {"limit": 1001}, {"wait": 31}, {"wait": -1}],
)
def test_bad_parameters_are_422(client, params) -> None:
    response = client.get("/v1/changes", params=params, headers=READ)
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_parameter"


def test_read_scope_is_required(client) -> None:
    assert client.get("/v1/changes").status_code == 401
    assert client.get("/v1/changes", headers=INGEST).status_code == 403


def test_answers_conform_to_the_openapi_document(client) -> None:
    doc = client.get("/openapi.json").json()
    assert "/v1/changes" in doc["paths"]
    for params, status in (({"limit": 5}, "200"), ({"limit": 0}, "422")):
        response = client.get("/v1/changes", params=params, headers=READ)
        assert str(response.status_code) == status
        content = doc["paths"]["/v1/changes"]["get"]["responses"][status]["content"]
        schema = {**content["application/json"]["schema"], "components": doc["components"]}
        jsonschema.validate(response.json(), schema, cls=jsonschema.Draft202012Validator)


def test_an_empty_feed(make_client, engine: Engine) -> None:
    client = make_client()
    assert client.get("/v1/changes", headers=READ).json() == {"items": [], "next_after": 0}
    seed(engine)
    assert client.get("/v1/changes", headers=READ).json()["items"]


def test_metrics_show_the_feed_position(client, engine: Engine) -> None:
    head = len(changes_after(engine, after=0, limit=1000))
    text = client.get("/metrics").text
    assert f"quota_ledger_feed_position {float(head)}" in text


# --- webhook endpoints (admin scope) -------------------------------------------------------------

ADMIN_TOKEN = "admin-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_webhook_endpoints_need_the_admin_scope(make_client, engine: Engine) -> None:
    from tests.helpers.api import API_TOKENS

    client = make_client(api_tokens=f"{API_TOKENS},admin:{ADMIN_TOKEN}")
    hook = {"url": "https://hooks.example.com/x", "kinds": ["filing.accepted"]}
    assert client.post("/v1/webhooks", json=hook).status_code == 401
    assert client.post("/v1/webhooks", json=hook, headers=READ).status_code == 403
    assert client.get("/v1/webhooks", headers=INGEST).status_code == 403

    created = client.post("/v1/webhooks", json=hook, headers=ADMIN)
    assert created.status_code == 201
    endpoint = created.json()
    assert endpoint["secret"].startswith("whsec_") and endpoint["kinds"] == ["filing.accepted"]
    doc = client.get("/openapi.json").json()
    content = doc["paths"]["/v1/webhooks"]["post"]["responses"]["201"]["content"]
    schema = {**content["application/json"]["schema"], "components": doc["components"]}
    jsonschema.validate(endpoint, schema, cls=jsonschema.Draft202012Validator)

    for bad in (
        {"url": "ftp://x"},
        {"url": "https://x", "kinds": ["nope"]},
        {"url": "https://x", "extra": 1},
        {},
    ):
        response = client.post("/v1/webhooks", json=bad, headers=ADMIN)
        assert response.status_code == 422, bad

    (listed,) = client.get("/v1/webhooks", headers=ADMIN).json()
    assert "secret" not in listed and listed["id"] == endpoint["id"]
    deliveries = client.get(f"/v1/webhooks/{endpoint['id']}/deliveries", headers=ADMIN)
    assert deliveries.status_code == 200 and deliveries.json() == []
    assert client.delete(f"/v1/webhooks/{endpoint['id']}", headers=ADMIN).status_code == 204
    assert client.delete(f"/v1/webhooks/{endpoint['id']}", headers=ADMIN).status_code == 404
    assert client.get("/v1/webhooks", headers=ADMIN).json() == []


def test_the_ops_page_lists_instances_due_for_renewal(client, engine: Engine) -> None:
    from datetime import timedelta

    from events import iso_utc
    from ledger.clock import utcnow
    from tests.helpers.api import ui_login as login

    ev, now = Events("renew"), utcnow()
    purchase = ev.purchase("i-renew-soon", "virtual_host")
    purchase.update(occurred_at=iso_utc(now - timedelta(days=300)))
    purchase.update(expires_at=iso_utc(now + timedelta(days=10)))
    request = ev.request("i-renew-soon")
    request["occurred_at"] = iso_utc(now - timedelta(days=1))
    Ledger(engine, load_policy()).apply([parse_event_obj(purchase), parse_event_obj(request)])
    login(client)
    page = client.get("/ui/")
    assert page.status_code == 200
    assert "Due for renewal" in page.text and "/ui/instances/i-renew-soon" in page.text
