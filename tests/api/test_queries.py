"""The query endpoints on both backends: the same JSON as the CLI's ``--json``, 404s, filters,
``?at=`` and cursor pagination."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from events import validate_event
from ledger.policy import load_policy
from ledger.service import Ledger
from tests.helpers.api import AT, READ, SCENARIO, cli_json
from tests.support import Events, ts

pytestmark = pytest.mark.timeout(120)


def test_instance_is_the_cli_show_json(client, db_url: str) -> None:
    response = client.get(f"/v1/instances/{SCENARIO.web}", params={"at": AT}, headers=READ)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body == cli_json(db_url, "show", SCENARIO.web, "--at", AT)
    assert body["eligibility"]["status"] == "ineligible"
    assert [r["code"] for r in body["eligibility"]["reasons"]] == [
        "remaining_term_too_short",
        "no_public_bandwidth",
    ]
    assert body["websites"] == {"cap": 5, "used": 1, "reserved": 2, "remaining": 2}
    assert body["subjects"] == {"cap": 5, "used": 1, "remaining": 4}


def test_at_changes_eligibility_and_accepts_offsets(client) -> None:
    early = client.get(
        f"/v1/instances/{SCENARIO.nat}", params={"at": "2026-10-28T08:00:00+08:00"}, headers=READ
    ).json()
    assert early["eligibility"] == {
        "status": "eligible",
        "as_of": "2026-10-28T00:00:00Z",
        "reasons": [],
    }
    late = client.get(f"/v1/instances/{SCENARIO.nat}", params={"at": AT}, headers=READ).json()
    assert late["eligibility"]["status"] == "ineligible"
    assert [r["code"] for r in late["eligibility"]["reasons"]] == ["instance_expired"]


def test_without_at_is_evaluated_now(client) -> None:
    body = client.get(f"/v1/instances/{SCENARIO.hk}", headers=READ).json()
    assert body["eligibility"]["status"] == "not_required"
    assert body["eligibility"]["as_of"].endswith("Z")


@pytest.mark.parametrize(
    "bad",
    ["yesterday", "2026-01-01T00:00:00", "2026-13-01T00:00:00Z", "", "x" * 10_000, "２０２６"],
)
def test_bad_at_is_422(client, bad: str) -> None:
    response = client.get(f"/v1/instances/{SCENARIO.web}", params={"at": bad}, headers=READ)
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "invalid_parameter"
    assert body["message"].startswith("at: ")


@pytest.mark.parametrize(
    "instance_id",
    ["i-nobody", "%00", "a%00b", "x" * 129, "%E4%B8%AD%E6%96%87", "%F0%9F%98%80", "a b", "a:b:c"],
)
def test_unknown_instance_is_a_404_json_error(client, instance_id: str) -> None:
    response = client.get(f"/v1/instances/{instance_id}", headers=READ)
    assert response.status_code == 404
    body = response.json()
    assert body["error"] == "not_found"
    assert "no entry for instance" in body["message"]


def test_entries_are_the_cli_history_json(client, db_url: str) -> None:
    response = client.get(f"/v1/instances/{SCENARIO.web}/entries", headers=READ)
    assert response.status_code == 200
    entries = response.json()
    assert entries == cli_json(db_url, "history", SCENARIO.web)
    assert [e["outcome"] for e in entries] == ["applied"] * 6 + ["rejected"]
    assert entries[-1]["reasons"] == ["no_public_bandwidth"]
    assert entries[0]["prev_hash"] == "0" * 64
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(entries))
    # Like the CLI: an instance without entries has an empty history.
    assert client.get("/v1/instances/i-nobody/entries", headers=READ).json() == []
    assert client.get("/v1/instances/%00/entries", headers=READ).json() == []


def test_service_number_is_the_cli_json(client, db_url: str) -> None:
    response = client.get(f"/v1/service-numbers/{SCENARIO.used_number}", headers=READ)
    assert response.status_code == 200
    body = response.json()
    assert body == cli_json(db_url, "service-number", SCENARIO.used_number)
    assert body["status"] == "used" and body["filing_id"] == SCENARIO.filing
    for missing in ("SN-NOPE", "%00", "x" * 65, "SN%20API"):
        response = client.get(f"/v1/service-numbers/{missing}", headers=READ)
        assert response.status_code == 404, missing
        assert response.json()["error"] == "not_found"


def test_instances_are_the_cli_rows(client, db_url: str) -> None:
    response = client.get("/v1/instances", params={"at": AT}, headers=READ)
    assert response.status_code == 200
    page = response.json()
    assert page["next_cursor"] is None
    assert page["items"] == cli_json(db_url, "instances", "--at", AT)
    assert [row["instance_id"] for row in page["items"]] == sorted(
        [SCENARIO.web, SCENARIO.nat, SCENARIO.hk, SCENARIO.shop]
    )


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"eligibility": "ineligible"}, ["i-nat-1", "i-web-1"]),
        ({"eligibility": "not_required"}, ["i-hk-1"]),
        ({"eligibility": "not_needed"}, ["i-shop-1"]),
        ({"eligibility": "eligible"}, []),
        ({"product": "ecs"}, ["i-hk-1", "i-web-1"]),
        ({"product": "ecs", "eligibility": "ineligible"}, ["i-web-1"]),
        ({"expiring_before": ts(331)}, ["i-nat-1"]),
        ({"expiring_before": ts(330)}, []),
    ],
)
def test_instance_filters(client, db_url: str, params: dict[str, str], expected: list[str]):
    response = client.get("/v1/instances", params={**params, "at": AT}, headers=READ)
    assert response.status_code == 200
    items = response.json()["items"]
    assert [row["instance_id"] for row in items] == expected
    args = [f"--{key.replace('_', '-')}={value}" for key, value in params.items()]
    assert items == cli_json(db_url, "instances", "--at", AT, *args)


@pytest.mark.parametrize(
    "params",
    [
        {"eligibility": "maybe"},
        {"product": "mainframe"},
        {"product": "ecs\x00"},
        {"expiring_before": "soon"},
        {"at": "2026-01-01"},
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "ten"},
        {"limit": "1e3"},
        {"cursor": "not-a-cursor"},
        {"cursor": "e30"},  # base64 of {}
        {"cursor": "%%%"},
        {"cursor": "x" * 5000},
    ],
)
def test_bad_list_parameters_are_422(client, params: dict[str, str]) -> None:
    response = client.get("/v1/instances", params=params, headers=READ)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] in ("invalid_parameter", "invalid_cursor")
    assert body["message"]


def _walk(client, path: str, params: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    items: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    while True:
        query = dict(params)
        if cursor is not None:
            query["cursor"] = cursor
        response = client.get(path, params=query, headers=READ)
        assert response.status_code == 200, response.text
        page = response.json()
        assert set(page) == {"items", "next_cursor"}
        assert len(page["items"]) <= params["limit"]
        items.extend(page["items"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            return items, pages
        assert pages < 100


def test_instances_cursor_walks_every_item_once(engine: Engine, empty_client) -> None:
    ev = Events("page")
    ledger = Ledger(engine, load_policy())
    ids = [f"i-page-{n:03d}" for n in range(23)]
    purchases = [
        validate_event(ev.purchase(iid, "ecs", at=0, bandwidth=n % 2)) for n, iid in enumerate(ids)
    ]
    ledger.apply(purchases)

    items, pages = _walk(empty_client, "/v1/instances", {"limit": 5, "at": AT})
    assert [row["instance_id"] for row in items] == ids
    assert pages == 5
    # Every page of a walk without ?at= uses the first page's instant (carried in the cursor).
    items, _ = _walk(empty_client, "/v1/instances", {"limit": 4})
    assert [row["instance_id"] for row in items] == ids
    # Filtered walks page over the matching rows only.
    items, pages = _walk(
        empty_client, "/v1/instances", {"limit": 3, "at": AT, "eligibility": "ineligible"}
    )
    assert [row["instance_id"] for row in items] == ids
    items, pages = _walk(empty_client, "/v1/instances", {"limit": 3, "at": ts(100)})
    eligible = [row["instance_id"] for row in items if row["eligibility"] == "eligible"]
    assert eligible == ids[1::2]  # odd ones have bandwidth
    # An exact multiple of the page size ends with next_cursor null, not an empty page.
    items, pages = _walk(empty_client, "/v1/instances", {"limit": 23, "at": AT})
    assert len(items) == 23 and pages == 1


def test_rejected_is_the_cli_json_and_paginates(engine: Engine, empty_client, db_url: str):
    ledger = Ledger(engine, load_policy())
    lines = [f'{{"event_id": "bad-{n}", "type": "nope"}}' for n in range(11)]
    lines += ["not json", "[1, 2]"]
    results = list(ledger.apply_lines(lines))
    assert all(r.outcome == "invalid" for r in results)

    items, pages = _walk(empty_client, "/v1/rejected", {"limit": 4})
    assert pages == 4
    assert items == cli_json(db_url, "rejected")
    assert [row["raw"] for row in items] == lines
    assert len({row["id"] for row in items}) == 13
    assert items[0]["event_id"] == "bad-0" and items[0]["code"] == "invalid_event"

    # A cursor of another list is refused.
    instances_cursor = empty_client.get("/v1/instances", params={"limit": 1}, headers=READ)
    assert instances_cursor.status_code == 200
    first = empty_client.get("/v1/rejected", params={"limit": 1}, headers=READ).json()
    response = empty_client.get(
        "/v1/instances", params={"cursor": first["next_cursor"]}, headers=READ
    )
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_cursor"
