"""The ops page through HTTP (no browser): login and cookie, access control, the instance page's
content, ``?at=``, lookups, errors and security headers."""

from __future__ import annotations

import re

import pytest

from tests.helpers.api import (
    AT,
    BOTH_TOKEN,
    INGEST_TOKEN,
    READ,
    READ_TOKEN,
    SCENARIO,
    WRONG_TOKEN,
)
from tests.helpers.api import ui_login as login

pytestmark = pytest.mark.timeout(120)


def test_pages_redirect_to_login_without_a_token(client) -> None:
    for path in ("/ui/", f"/ui/instances/{SCENARIO.web}?at={AT}", "/ui/lookup?q=x"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303, path
        location = response.headers["location"]
        assert location.startswith("/ui/login?next=")
    response = client.get("/ui/login")
    assert response.status_code == 200
    assert 'name="token"' in response.text
    assert "text/html" in response.headers["content-type"]


def test_login_sets_a_strict_httponly_cookie(client) -> None:
    response = login(client, next_path=f"/ui/instances/{SCENARIO.web}")
    assert response.status_code == 303
    assert response.headers["location"] == f"/ui/instances/{SCENARIO.web}"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("quota_ledger_session=")
    assert READ_TOKEN not in cookie  # a server-side session id, never the token itself
    lowered = cookie.lower()
    assert "httponly" in lowered
    assert "samesite=strict" in lowered
    assert "path=/ui" in lowered
    assert "secure" not in lowered  # plain http here; set when served over https
    assert client.get("/ui/", follow_redirects=False).status_code == 200

    # Logout clears it.
    response = client.post("/ui/logout", follow_redirects=False)
    assert response.status_code == 303
    assert client.get("/ui/", follow_redirects=False).status_code == 303


def test_login_refuses_wrong_and_ingest_tokens(client) -> None:
    response = login(client, WRONG_TOKEN)
    assert response.status_code == 401
    assert "set-cookie" not in response.headers
    assert "Unknown token" in response.text
    response = login(client, INGEST_TOKEN)
    assert response.status_code == 403
    assert "read scope" in response.text
    # A token that can also ingest is not for a browser: read-only tokens only.
    response = login(client, BOTH_TOKEN)
    assert response.status_code == 403
    assert "set-cookie" not in response.headers
    assert "read-only token" in response.text
    response = client.post("/ui/login", content=b"\xff\xfe=\x00&&&", follow_redirects=False)
    assert response.status_code == 401
    response = client.post("/ui/login", content=b"&" * 50, follow_redirects=False)
    assert response.status_code == 401  # over parse_qs's field limit: not a 500


@pytest.mark.parametrize(
    "target",
    ["https://evil.example/", "//evil.example/ui/", "/ui/\\evil", "/v1/instances", "/ui//evil"],
)
def test_login_never_redirects_off_the_page(client, target: str) -> None:
    response = login(client, next_path=target)
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/"


@pytest.mark.parametrize("token", [READ_TOKEN, INGEST_TOKEN])
def test_a_cookie_holding_a_token_is_no_session(client, token: str) -> None:
    for name in ("quota_ledger_session", "quota_ledger_token"):
        client.cookies.set(name, token, path="/ui")
    response = client.get("/ui/", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/ui/login?next=")


def test_a_bearer_token_without_read_is_forbidden(client) -> None:
    response = client.get("/ui/", headers={"Authorization": f"Bearer {INGEST_TOKEN}"})
    assert response.status_code == 403
    assert "text/html" in response.headers["content-type"]


def test_instance_page_shows_everything(client) -> None:
    login(client)
    response = client.get(f"/ui/instances/{SCENARIO.web}", params={"at": AT})
    assert response.status_code == 200
    page = response.text
    assert 'id="eligibility-badge"' in page
    assert re.search(r'class="badge badge-ineligible"[^>]*data-status="ineligible"', page)
    # Every reason in Chinese and English with its remediation.
    for text in (
        "remaining_term_too_short",
        "包年包月的剩余时长已不满足备案要求",
        "Less than 30 days of the subscription remain.",
        "Renew the subscription (续费).",
        "no_public_bandwidth",
        "未开通公网带宽",
        "The ECS instance has no public bandwidth.",
        "Add public bandwidth (升降配).",
    ):
        assert text in page, text
    # Slots: used 1 / reserved 2 / remaining 2 of 5; subjects 1 used, 4 left of 5.
    assert re.search(r'id="websites-used">1<', page)
    assert re.search(r'id="websites-reserved">2<', page)
    assert re.search(r'id="websites-remaining">2<', page)
    assert re.search(r'id="websites-cap">5<', page)
    assert re.search(r'id="subjects-used">1<', page)
    assert re.search(r'id="subjects-remaining">4<', page)
    assert page.count('class="bar-used"') == 2
    # Tables and timeline.
    for number in (SCENARIO.used_number, *SCENARIO.reserved_numbers):
        assert number in page
    assert SCENARIO.filing in page and "shop.example.com" in page
    history = client.get(f"/v1/instances/{SCENARIO.web}/entries", headers=READ).json()
    assert page.count('class="tl-item') == len(history)
    for entry in history:
        assert entry["hash"][:12] in page
    assert "service_number.requested" in page and "rejected" in page
    assert "2026-12-07 00:00:00 UTC" in page  # as of ?at=


def test_instance_page_at_and_statuses(client) -> None:
    login(client)
    page = client.get(f"/ui/instances/{SCENARIO.nat}", params={"at": "2026-10-28T00:00:00Z"})
    assert 'data-status="eligible"' in page.text
    page = client.get(f"/ui/instances/{SCENARIO.hk}")
    assert 'data-status="not_required"' in page.text
    page = client.get(f"/ui/instances/{SCENARIO.shop}")
    assert 'data-status="not_needed"' in page.text
    response = client.get(f"/ui/instances/{SCENARIO.web}", params={"at": "tomorrow"})
    assert response.status_code == 422
    assert "text/html" in response.headers["content-type"]
    assert "at: " in response.text


def test_page_escapes_and_unknowns(client) -> None:
    login(client)
    response = client.get("/ui/instances/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E")
    assert response.status_code == 404
    assert "<img" not in response.text
    assert "&lt;img src=x onerror=alert(1)&gt;" in response.text
    response = client.get("/ui/service-numbers/SN-NONE")
    assert response.status_code == 404
    response = client.get("/ui/lookup", params={"q": "nothing-here"})
    assert response.status_code == 404
    assert "Nothing in the ledger matches" in response.text
    assert client.get("/ui/instances/%00").status_code == 404


def test_lookup_finds_instances_and_service_numbers(client) -> None:
    login(client)
    response = client.get("/ui/lookup", params={"q": SCENARIO.web}, follow_redirects=False)
    assert response.headers["location"] == f"/ui/instances/{SCENARIO.web}"
    response = client.get(
        "/ui/lookup", params={"q": f" {SCENARIO.used_number} "}, follow_redirects=False
    )
    assert response.headers["location"] == f"/ui/service-numbers/{SCENARIO.used_number}"
    page = client.get(f"/ui/service-numbers/{SCENARIO.used_number}")
    assert page.status_code == 200
    assert SCENARIO.filing in page.text and f"/ui/instances/{SCENARIO.web}" in page.text
    response = client.get(
        "/ui/lookup", params={"q": "SN-X", "kind": "instance"}, follow_redirects=False
    )
    assert response.headers["location"] == "/ui/instances/SN-X"


def test_security_headers_and_static_css(client) -> None:
    login(client)
    response = client.get("/ui/")
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "style-src 'self'" in csp
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["cache-control"] == "no-store"
    css = client.get("/ui/static/ui.css")
    assert css.status_code == 200
    assert "text/css" in css.headers["content-type"]
    assert "http://" not in css.text and "https://" not in css.text  # no CDN
    assert "style=" not in client.get(f"/ui/instances/{SCENARIO.web}").text


def test_bearer_header_also_works_for_tools(client) -> None:
    response = client.get(f"/ui/instances/{SCENARIO.web}", headers=READ)
    assert response.status_code == 200
