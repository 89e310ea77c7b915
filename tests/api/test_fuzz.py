"""No input makes the API answer 500: a small hypothesis fuzz of path ids, query parameters,
headers and bodies, on both backends (PostgreSQL refuses NUL in text, SQLite does not).

The TestClient re-raises server exceptions, so a crash fails the test even before the status
check; every answer must also be JSON with the error shape.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.api import INGEST, READ, seed, ui_login

pytestmark = pytest.mark.timeout(240)

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Any text a URL can carry (httpx percent-encodes it; lone surrogates cannot be UTF-8 encoded
# by any client, so they cannot arrive).
texts = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=80
) | st.sampled_from(
    [
        "\x00",
        "a\x00b",
        "‮evil",
        "Ａ",
        "i-web-1\n",
        "2026-01-01T00:00:00Z\x00",
        "9" * 400,
        "-1",
        "１０",
        "e30",
        "eyJrIjoiaW5zdGFuY2VzIiwiYSI6MX0",  # a cursor whose key is not a string
        "eyJrIjoicmVqZWN0ZWQiLCJhIjotMX0",  # a negative dead-letter id
        "eyJrIjoicmVqZWN0ZWQiLCJhIjp0cnVlfQ",  # a boolean id
        "x" * 3000,
    ]
)


def _assert_json_answer(response, allowed: set[int]) -> None:
    assert response.status_code in allowed, (response.status_code, response.text[:300])
    body = response.json()
    if response.status_code >= 400:
        assert isinstance(body["error"], str) and isinstance(body["message"], str)


@FUZZ
@given(instance_id=texts.filter(bool), at=st.none() | texts)
def test_fuzz_instance_paths(client, instance_id: str, at: str | None) -> None:
    params = {} if at is None else {"at": at}
    path = quote(instance_id, safe="")
    response = client.get(f"/v1/instances/{path}", params=params, headers=READ)
    _assert_json_answer(response, {200, 404, 422})
    response = client.get(f"/v1/instances/{path}/entries", headers=READ)
    _assert_json_answer(response, {200, 404})  # 404: a "/" in the id matches no route
    response = client.get(f"/v1/service-numbers/{path}", headers=READ)
    _assert_json_answer(response, {200, 404})


@FUZZ
@given(
    params=st.dictionaries(
        st.sampled_from(
            ["eligibility", "product", "expiring_before", "at", "limit", "cursor", "other"]
        ),
        texts,
        max_size=6,
    )
)
def test_fuzz_list_parameters(client, params: dict[str, str]) -> None:
    response = client.get("/v1/instances", params=params, headers=READ)
    _assert_json_answer(response, {200, 422})
    response = client.get("/v1/rejected", params=params, headers=READ)
    _assert_json_answer(response, {200, 422})


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "event_id",
                    "type",
                    "occurred_at",
                    "instance_id",
                    "account_id",
                    "x",
                    "product_type",
                ]
            )
            | st.text(max_size=5),
            inner,
            max_size=5,
        )
    ),
    max_leaves=12,
)
content_types = st.sampled_from(
    [
        None,
        "application/json",
        "application/x-ndjson",
        "text/plain",
        "application/octet-stream",
        "application/json; charset=latin-1",
        "multipart/form-data",
        "application/vnd.api+json",
        "text/html; charset=utf-8",
        "",
        ";;;",
    ]
)


@FUZZ
@given(body=st.binary(max_size=300), content_type=content_types)
def test_fuzz_raw_bodies(client, body: bytes, content_type: str | None) -> None:
    headers = dict(INGEST)
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = client.post("/v1/events", content=body, headers=headers)
    _assert_json_answer(response, {202, 400, 415})


@FUZZ
@given(value=json_values, as_lines=st.booleans())
def test_fuzz_json_bodies(client, value: object, as_lines: bool) -> None:
    if as_lines and isinstance(value, list):
        body = "\n".join(json.dumps(item, ensure_ascii=False) for item in value)
        headers = {**INGEST, "Content-Type": "application/x-ndjson"}
    else:
        body = json.dumps(value, ensure_ascii=False)
        headers = {**INGEST, "Content-Type": "application/json"}
    response = client.post("/v1/events", content=body.encode("utf-8"), headers=headers)
    _assert_json_answer(response, {202, 400})
    if response.status_code == 202:
        result = response.json()
        assert result["accepted"] + len(result["invalid"]) >= 0


@FUZZ
@given(token=texts, scheme=st.sampled_from(["Bearer", "bearer", "Basic", "", "Bearer  "]))
def test_fuzz_authorization_headers(client, token: str, scheme: str) -> None:
    value = f"{scheme} {token}".encode()  # raw bytes: what a server may receive
    response = client.get("/v1/instances", headers={"Authorization": value})
    _assert_json_answer(response, {401})


@FUZZ
@given(
    body=st.binary(max_size=200)
    | st.text(alphabet="&=;token%xyz\x00", max_size=200).map(str.encode)
)
def test_fuzz_login_bodies(login_client, body: bytes) -> None:
    response = login_client.post("/ui/login", content=body, follow_redirects=False)
    assert response.status_code in (303, 401), response.text[:300]
    assert "text/html" in response.headers["content-type"] or response.status_code == 303


@pytest.fixture
def login_client(engine, make_client):
    """The sign-in form without its rate limit: this fuzz is about parsing, not throttling."""
    seed(engine)
    return make_client(ui_login_attempts_per_minute=1_000_000)


@FUZZ
@given(value=texts, at=st.none() | texts, kind=st.sampled_from(["auto", "instance", "x", ""]))
def test_fuzz_ui_pages(client, value: str, at: str | None, kind: str) -> None:
    if "quota_ledger_session" not in client.cookies:
        assert ui_login(client).status_code == 303
    path = quote(value, safe="") or "x"
    params = {} if at is None else {"at": at}
    response = client.get(f"/ui/instances/{path}", params=params, follow_redirects=False)
    assert response.status_code in (200, 404, 422), response.text[:300]
    response = client.get(f"/ui/service-numbers/{path}", follow_redirects=False)
    assert response.status_code in (200, 404), response.text[:300]
    response = client.get("/ui/lookup", params={"q": value, "kind": kind}, follow_redirects=False)
    assert response.status_code in (303, 404, 422), response.text[:300]
