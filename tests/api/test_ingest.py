"""POST /v1/events: JSON arrays and JSONL, validation, enqueueing to a real Redis (a private
database index), dead letters through the ledger service, the 5 MiB limit and bad bodies."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.helpers.api import (
    INGEST,
    READ,
    closed_port,
    live_server,
    queue_length,
    raw_request,
)
from tests.support import Events, message_body
from worker.api.middleware import MAX_BODY_BYTES

pytestmark = pytest.mark.timeout(120)


def _events(n: int, prefix: str = "in") -> list[dict[str, Any]]:
    ev = Events(prefix)
    return [ev.purchase(f"i-{prefix}-{k}", "ecs", at=0) for k in range(n)]


def _dead_letters(engine: Engine) -> list[tuple[str | None, str, str]]:
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT event_id, code, raw FROM dead_letters ORDER BY id"))
        return [tuple(row) for row in rows]


def _ledger_entries(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.execute(text("SELECT count(*) FROM ledger_entries")).scalar_one()


def test_json_array_enqueues_valid_and_dead_letters_invalid(
    client, engine: Engine, redis_url: str
) -> None:
    entries_before = _ledger_entries(engine)
    good = _events(3)
    bad_type = {**good[0], "event_id": "bad-1", "type": "instance.teleported"}
    naive = {**good[1], "event_id": "bad-2", "occurred_at": "2026-01-01T00:00:00"}
    body = (
        "["
        + ",".join(
            [
                json.dumps(good[0]),
                json.dumps(bad_type),
                json.dumps(good[1]),
                '{"event_id": "dup-keys", "type": "instance.released", "type": "instance.released"}',
                json.dumps(naive),
                "42",
                json.dumps(good[2]),
            ]
        )
        + "]"
    )
    response = client.post(
        "/v1/events", content=body, headers={**INGEST, "Content-Type": "application/json"}
    )
    assert response.status_code == 202, response.text
    result = response.json()
    assert result["accepted"] == 3
    invalid = result["invalid"]
    assert [item["index"] for item in invalid] == [1, 3, 4, 5]
    assert all(item["code"] == "invalid_event" for item in invalid)
    assert "type" in invalid[0]["error"] and invalid[0]["event_id"] == "bad-1"
    assert "duplicate key" in invalid[1]["error"]
    assert "occurred_at" in invalid[2]["error"]
    assert "expected a JSON object" in invalid[3]["error"]

    # One apply_batch message for the three valid events, on the real Redis.
    assert queue_length(redis_url) == 1
    # The invalid ones went through Ledger.apply into dead_letters, with their own text.
    letters = _dead_letters(engine)
    assert [letter[0] for letter in letters] == ["bad-1", None, "bad-2", None]
    assert letters[1][2].startswith('{"event_id": "dup-keys"')
    assert letters[3][2] == "42"
    # Nothing was appended to the ledger by the API itself: the worker does that.
    assert _ledger_entries(engine) == entries_before
    # And the dead letters are visible through the API.
    rejected = client.get("/v1/rejected", headers=READ).json()["items"]
    assert [row["event_id"] for row in rejected] == ["bad-1", None, "bad-2", None]


def test_enqueued_messages_are_apply_batch_tasks(client, redis_url: str) -> None:

    import redis

    events = _events(1201, prefix="many")
    response = client.post("/v1/events", json=events, headers=INGEST)
    assert response.status_code == 202
    assert response.json() == {"accepted": 1201, "invalid": [], "invalid_count": 0}
    assert queue_length(redis_url) == 3  # batches of 500

    connection = redis.Redis.from_url(redis_url)
    try:
        raw = connection.lrange("quota_ledger.events", 0, -1)
    finally:
        connection.close()
    ids = []
    for message in reversed(raw):  # LPUSHed: the oldest is last
        envelope = json.loads(message)
        assert envelope["headers"]["task"] == "quota_ledger.apply_batch"
        args, _kwargs, _embed = message_body(envelope)
        ids.extend(event["event_id"] for event in args[0])
    assert ids == [event["event_id"] for event in events]


def test_jsonl_body_with_blank_lines(client, engine: Engine, redis_url: str) -> None:
    good = _events(2, prefix="jl")
    lines = [json.dumps(good[0]), "", "   ", "{not json", json.dumps(good[1]), "\r", "[]"]
    body = "\r\n".join(lines) + "\n"
    response = client.post(
        "/v1/events", content=body, headers={**INGEST, "Content-Type": "application/x-ndjson"}
    )
    assert response.status_code == 202, response.text
    result = response.json()
    assert result["accepted"] == 2
    assert [(i["index"], i["code"]) for i in result["invalid"]] == [
        (3, "invalid_event"),
        (6, "invalid_event"),
    ]
    assert queue_length(redis_url) == 1
    assert [letter[2] for letter in _dead_letters(engine)] == ["{not json", "[]"]


@pytest.mark.parametrize(
    ("content_type", "body_kind"),
    [
        (None, "array"),
        (None, "jsonl"),
        ("application/octet-stream", "array"),
        ("application/x-www-form-urlencoded", "jsonl"),
        ("text/plain; charset=utf-8", "jsonl"),
        ("application/jsonl", "jsonl"),
        ("application/json; charset=utf-8", "array"),
        ("application/json", "object"),
    ],
)
def test_formats_by_content_type_or_sniffed(
    client, redis_url: str, content_type: str | None, body_kind: str
) -> None:
    events = _events(2, prefix="fmt")
    if body_kind == "array":
        body = "\ufeff\n " + json.dumps(events)
    elif body_kind == "object":
        body = json.dumps(events[0])
    else:
        body = "\n".join(json.dumps(e) for e in events)
    headers = dict(INGEST)
    if content_type:
        headers["Content-Type"] = content_type
    response = client.post("/v1/events", content=body.encode(), headers=headers)
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == (1 if body_kind == "object" else 2)


def test_too_large_event_is_dead_lettered(client, engine: Engine) -> None:
    event = _events(1, prefix="big")[0]
    event["account_id"] = "a" * (64 * 1024)
    response = client.post("/v1/events", json=[event], headers=INGEST)
    assert response.status_code == 202
    assert response.json()["invalid"][0]["code"] == "too_large"
    assert _dead_letters(engine)[0][1] == "too_large"


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"", "application/json", 400, "empty_body"),
        (b"  \n ", "application/x-ndjson", 400, "empty_body"),
        (b"[", "application/json", 400, "invalid_json"),
        (b"[{}", "application/json", 400, "invalid_json"),
        (b"[{},]", "application/json", 400, "invalid_json"),
        (b"[{}] []", "application/json", 400, "invalid_json"),
        (b"[{} {}]", "application/json", 400, "invalid_json"),
        (b'{"a": 1}\n{"b": 2}', "application/json", 400, "invalid_json"),
        (b"42", "application/json", 400, "invalid_json"),
        (b'"events"', "application/json", 400, "invalid_json"),
        (b"[" * 100_000, "application/json", 400, "invalid_json"),
        (b"[1" + b"0" * 5000 + b"]", "application/json", 400, "invalid_json"),
        (b"[\xff\xfe]", "application/json", 400, "invalid_encoding"),
        (b"[]", "multipart/form-data; boundary=x", 415, "unsupported_media_type"),
        (b"[]", "application/xml", 415, "unsupported_media_type"),
        (b"[]", "image/png", 415, "unsupported_media_type"),
    ],
)
def test_malformed_bodies_are_4xx_json(
    client, engine: Engine, body: bytes, content_type: str, status: int, code: str
) -> None:
    response = client.post(
        "/v1/events", content=body, headers={**INGEST, "Content-Type": content_type}
    )
    assert response.status_code == status, response.text
    assert response.json()["error"] == code
    assert _dead_letters(engine) == []


def test_jsonl_odd_lines_are_dead_lettered_not_500(client, engine: Engine) -> None:
    lines = [
        b"\xff\xfe\x00",
        b"[" * 50_000,
        b'{"event_id": "nan", "type": "instance.released", "x": NaN}',
        b'"\\ud800"',
        '{"event_id": "zh-事件", "type": "instance.released"}'.encode(),
        b"\x00",
        b'{"event_id": "a", "occurred_at": "\\u0000"}',
    ]
    response = client.post(
        "/v1/events", content=b"\n".join(lines), headers={**INGEST, "Content-Type": "text/plain"}
    )
    assert response.status_code == 202, response.text
    assert [item["index"] for item in response.json()["invalid"]] == list(range(len(lines)))
    letters = _dead_letters(engine)
    assert len(letters) == len(lines)
    assert letters[0][2] == "\\xff\\xfe\\x00"


def test_empty_array_and_all_invalid(client, redis_url: str) -> None:
    response = client.post("/v1/events", json=[], headers=INGEST)
    assert response.status_code == 202
    assert response.json() == {"accepted": 0, "invalid": [], "invalid_count": 0}
    response = client.post("/v1/events", json=[{}, []], headers=INGEST)
    assert response.status_code == 202
    assert response.json()["accepted"] == 0
    assert len(response.json()["invalid"]) == 2
    assert response.json()["invalid_count"] == 2
    assert queue_length(redis_url) == 0


def test_broker_down_is_503_and_nothing_is_recorded(make_client, engine: Engine) -> None:
    client = make_client(broker_url=f"redis://127.0.0.1:{closed_port()}/0")
    good = _events(1, prefix="down")
    started = time.monotonic()
    response = client.post("/v1/events", json=[good[0], {"junk": 1}], headers=INGEST)
    assert response.status_code == 503
    assert response.json()["error"] == "broker_unavailable"
    assert response.headers["retry-after"] == "5"
    assert time.monotonic() - started < 10
    assert _dead_letters(engine) == []
    # Without any valid event nothing needs the broker: the invalid ones are dead-lettered.
    response = client.post("/v1/events", json=[{"junk": 1}], headers=INGEST)
    assert response.status_code == 202
    assert len(_dead_letters(engine)) == 1


# --- the 5 MiB limit ---------------------------------------------------------------------------


def test_content_length_over_the_limit_is_413(client, redis_url: str) -> None:
    body = b"[" + b" " * MAX_BODY_BYTES + b"]"
    response = client.post(
        "/v1/events", content=body, headers={**INGEST, "Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert queue_length(redis_url) == 0


def test_limit_applies_before_auth_and_everywhere(client) -> None:
    body = b"x" * (MAX_BODY_BYTES + 1)
    assert client.post("/v1/events", content=body).status_code == 413
    assert client.post("/ui/login", content=body).status_code == 413
    assert client.post("/v1/events", content=b"x" * MAX_BODY_BYTES).status_code == 401


def test_chunked_body_over_the_limit_is_413(client, redis_url: str) -> None:
    def chunks():
        chunk = b" " * 65536
        for _ in range(MAX_BODY_BYTES // len(chunk) + 2):
            yield chunk

    response = client.post(
        "/v1/events", content=chunks(), headers={**INGEST, "Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"


def test_exactly_the_limit_is_accepted(client, redis_url: str) -> None:
    events = json.dumps(_events(1, prefix="edge"))
    body = events + " " * (MAX_BODY_BYTES - len(events))
    assert len(body) == MAX_BODY_BYTES
    response = client.post(
        "/v1/events", content=body, headers={**INGEST, "Content-Type": "application/json"}
    )
    assert response.status_code == 202
    assert response.json()["accepted"] == 1


def test_chunked_upload_to_a_real_server_is_cut_at_the_limit(client) -> None:
    """On the wire: a chunked request (no Content-Length) gets its 413 as soon as the body
    passes 5 MiB; the server never waits for the end of the upload."""
    chunk = b" " * 65536
    count = MAX_BODY_BYTES // len(chunk) + 1  # just over the limit; no terminating chunk sent
    encoded = [b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(count)]
    head = (
        b"POST /v1/events HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nAuthorization: Bearer "
        + INGEST["Authorization"].split()[1].encode()
        + b"\r\n\r\n"
    )
    with live_server(client.app) as base_url:
        response = raw_request(base_url, head, encoded)
    status_line, _, rest = response.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), response[:300]
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body["error"] == "payload_too_large"
