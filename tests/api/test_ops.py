"""/healthz, /readyz, /metrics and the OpenAPI document (with live responses validated
against it)."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
import redis

from tests.helpers.api import AT, INGEST, QUEUE, READ, SCENARIO, closed_port
from tests.support import Events

pytestmark = pytest.mark.timeout(120)

METRIC_NAMES = [
    "quota_ledger_events_total",
    "quota_ledger_apply_seconds",
    "quota_ledger_batch_size",
    "quota_ledger_dead_letters_total",
    "quota_ledger_queue_depth",
    "quota_ledger_sweep_runs_total",
    "quota_ledger_sweep_expired_total",
    "quota_ledger_api_ingested_total",
    "quota_ledger_api_requests_total",
]


def test_healthz(client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_ok(client) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}


def test_readyz_names_the_broker_when_it_is_down(make_client, engine) -> None:
    port = closed_port()
    client = make_client(broker_url=f"redis://127.0.0.1:{port}/0")
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"] == {"database": "ok", "broker": "error"}
    assert body["message"] == "unreachable: broker"
    assert str(port) not in response.text  # where it is and why: the log's business
    # The process is still alive, and queries still work without the broker.
    assert client.get("/healthz").status_code == 200
    assert client.get("/v1/instances", headers=READ).status_code == 200


@pytest.mark.postgres
def test_readyz_names_the_database_when_it_is_down(make_client, postgres_url: str) -> None:
    """A server that is not there: readiness says database, queries say 503 (never 500)."""
    dead = re.sub(r"@[^/]+/", f"@127.0.0.1:{closed_port()}/", postgres_url)
    client = make_client(database_url=dead)
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["checks"] == {"database": "error", "broker": "ok"}
    assert body["message"] == "unreachable: database"
    response = client.get(f"/v1/instances/{SCENARIO.web}", headers=READ)
    assert response.status_code == 503
    assert response.json()["error"] == "database_unavailable"
    response = client.post("/v1/events", json=[{"junk": True}], headers=INGEST)
    assert response.status_code == 503


def _sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        metric, _, value = line.rpartition(" ")
        if metric.split("{", 1)[0] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', metric))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return None


def test_metrics_exposes_every_metric_and_measures_the_queue(client, redis_url: str) -> None:
    connection = redis.Redis.from_url(redis_url)
    try:
        connection.rpush(QUEUE, "a", "b", "c")
        connection.rpush(QUEUE + "\x06\x163", "d")  # a priority list of kombu's transport
    finally:
        connection.close()
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    body = response.text
    for name in METRIC_NAMES:
        assert f"# TYPE {name.removesuffix('_total')}" in body, name
    assert _sample(body, "quota_ledger_queue_depth", queue=QUEUE) == 4.0
    # OpenMetrics on request.
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")


def test_metrics_count_ingested_and_dead_lettered_events(client) -> None:
    before = client.get("/metrics").text
    ev = Events("metric")
    body = [ev.purchase("i-metric-1", "ecs"), ev.release("i-metric-1", at=5), {"x": 1}]
    assert client.post("/v1/events", json=body, headers=INGEST).status_code == 202
    after = client.get("/metrics").text

    def delta(name: str, **labels: str) -> float:
        return (_sample(after, name, **labels) or 0.0) - (_sample(before, name, **labels) or 0.0)

    assert delta("quota_ledger_api_ingested_total", type="instance.purchased") == 1
    assert delta("quota_ledger_api_ingested_total", type="instance.released") == 1
    assert delta("quota_ledger_dead_letters_total", code="invalid_event") == 1
    assert delta("quota_ledger_events_total", type="unknown", outcome="invalid") == 1
    assert (
        delta("quota_ledger_api_requests_total", method="POST", route="/v1/events", status="202")
        == 1
    )


def test_metrics_survive_a_dead_broker(make_client, engine) -> None:
    client = make_client(broker_url=f"redis://127.0.0.1:{closed_port()}/0")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert "quota_ledger_events_total" in response.text


# --- OpenAPI ------------------------------------------------------------------------------------


def _schema_for(doc: dict[str, Any], path: str, method: str, status: str) -> dict[str, Any]:
    content = doc["paths"][path][method]["responses"][status]["content"]
    schema = content["application/json"]["schema"]
    # Resolve "#/components/..." references against the whole document.
    return {**schema, "components": doc["components"]}


def _validate(doc: dict[str, Any], path: str, method: str, response) -> None:
    schema = _schema_for(doc, path, method, str(response.status_code))
    jsonschema.validate(response.json(), schema, cls=jsonschema.Draft202012Validator)


def test_openapi_is_served_and_responses_conform(client) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"].startswith("3.")
    for path in (
        "/v1/instances/{instance_id}",
        "/v1/instances/{instance_id}/entries",
        "/v1/instances",
        "/v1/service-numbers/{number}",
        "/v1/rejected",
        "/v1/events",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in doc["paths"], path
    assert not any(path.startswith("/ui") for path in doc["paths"])
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"

    checks = [
        ("/v1/instances/{instance_id}", "get", f"/v1/instances/{SCENARIO.web}?at={AT}"),
        ("/v1/instances/{instance_id}", "get", f"/v1/instances/{SCENARIO.hk}"),
        ("/v1/instances/{instance_id}", "get", "/v1/instances/i-nope"),
        ("/v1/instances/{instance_id}/entries", "get", f"/v1/instances/{SCENARIO.web}/entries"),
        ("/v1/instances", "get", "/v1/instances?limit=2"),
        ("/v1/instances", "get", "/v1/instances?limit=x"),
        ("/v1/instances", "get", "/v1/instances?at=nope"),
        ("/v1/service-numbers/{number}", "get", f"/v1/service-numbers/{SCENARIO.used_number}"),
        ("/v1/service-numbers/{number}", "get", "/v1/service-numbers/SN-NONE"),
        ("/v1/rejected", "get", "/v1/rejected"),
        ("/healthz", "get", "/healthz"),
        ("/readyz", "get", "/readyz"),
    ]
    for path, method, url in checks:
        response = client.get(url, headers=READ)
        _validate(doc, path, method, response)
    _validate(doc, "/v1/instances", "get", client.get("/v1/instances"))
    _validate(doc, "/v1/instances", "get", client.get("/v1/instances", headers=INGEST))

    ev = Events("oas")
    response = client.post(
        "/v1/events", json=[ev.purchase("i-oas", "ecs"), {"bad": 1}], headers=INGEST
    )
    _validate(doc, "/v1/events", "post", response)
    response = client.post(
        "/v1/events", content=b"[", headers={**INGEST, "Content-Type": "application/json"}
    )
    _validate(doc, "/v1/events", "post", response)

    rejected = client.get("/v1/rejected", headers=READ).json()
    assert rejected["items"], "the bad event above was dead-lettered"
    _validate(doc, "/v1/rejected", "get", client.get("/v1/rejected", headers=READ))


def test_docs_page_is_off_unless_asked_for(client, make_client) -> None:
    assert client.get("/docs").status_code == 404
    json.dumps(client.get("/openapi.json").json())  # the document itself is always there
    response = make_client(api_docs=True).get("/docs")
    assert response.status_code == 200
    assert "openapi.json" in response.text
