"""Bearer tokens and scopes: 401 without or with a wrong token, 403 for the wrong scope, open
health/readiness/metrics, constant-time comparison, and refusal of malformed settings."""

from __future__ import annotations

import hmac

import pytest
import typer
from typer.testing import CliRunner

from ledger.settings import Settings
from tests.helpers.api import (
    BOTH_TOKEN,
    INGEST,
    INGEST_TOKEN,
    READ,
    READ_TOKEN,
    SCENARIO,
    WRONG_TOKEN,
    auth,
)
from worker.api import TokenConfigError, create_app
from worker.api import auth as auth_module
from worker.api.auth import Authenticator, bearer_token, parse_tokens
from worker.api.cli import serve_command

pytestmark = pytest.mark.timeout(120)

READ_ENDPOINTS = [
    f"/v1/instances/{SCENARIO.web}",
    f"/v1/instances/{SCENARIO.web}/entries",
    "/v1/instances",
    f"/v1/service-numbers/{SCENARIO.used_number}",
    "/v1/rejected",
]
EVENT = '{"event_id":"auth-1","type":"instance.released","occurred_at":"2026-01-01T00:00:00Z","instance_id":"i-auth"}'


def _assert_401(response) -> None:
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith('Bearer realm="quota-ledger"')
    assert response.json()["error"] == "unauthorized"


def test_every_read_endpoint_needs_a_token(client) -> None:
    for path in READ_ENDPOINTS:
        _assert_401(client.get(path))
        _assert_401(client.get(path, headers=auth(WRONG_TOKEN)))
        _assert_401(client.get(path, headers={"Authorization": "Bearer"}))
        _assert_401(client.get(path, headers={"Authorization": f"Basic {READ_TOKEN}"}))
        _assert_401(client.get(path, headers={"Authorization": READ_TOKEN}))
        _assert_401(client.get(path, headers=auth(READ_TOKEN[:-1])))
        _assert_401(client.get(path, headers=auth(READ_TOKEN + "x")))
        forbidden = client.get(path, headers=INGEST)
        assert forbidden.status_code == 403, path
        assert forbidden.json()["error"] == "forbidden"
        assert 'error="insufficient_scope"' in forbidden.headers["www-authenticate"]
        assert client.get(path, headers=READ).status_code == 200, path
        assert client.get(path, headers=auth(BOTH_TOKEN)).status_code == 200, path
        lower = client.get(path, headers={"Authorization": f"bearer {READ_TOKEN}"})
        assert lower.status_code == 200, path


def test_wrong_token_error_says_invalid_token(client) -> None:
    response = client.get("/v1/instances", headers=auth(WRONG_TOKEN))
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert response.json()["message"] == "invalid bearer token"


def test_ingest_needs_the_ingest_scope(client) -> None:
    headers = {"Content-Type": "application/x-ndjson"}
    _assert_401(client.post("/v1/events", content=EVENT, headers=headers))
    _assert_401(client.post("/v1/events", content=EVENT, headers={**headers, **auth(WRONG_TOKEN)}))
    response = client.post("/v1/events", content=EVENT, headers={**headers, **READ})
    assert response.status_code == 403
    assert response.json()["error"] == "forbidden"
    assert 'scope="ingest"' in response.headers["www-authenticate"]


def test_unauthenticated_bodies_are_not_read(client) -> None:
    """Auth is decided before the body is parsed: junk from a stranger is a 401, not a 400."""
    _assert_401(client.post("/v1/events", content=b"\xff\xfe junk"))


def test_health_readiness_and_metrics_are_open(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.get("/openapi.json").status_code == 200


def test_no_configured_token_means_401_everywhere(make_client, engine) -> None:
    client = make_client(api_tokens="")
    _assert_401(client.get("/v1/instances", headers=READ))
    assert client.get("/healthz").status_code == 200


def test_tokens_are_compared_in_constant_time_with_every_token(monkeypatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    tokens = parse_tokens(f"read:{READ_TOKEN},ingest:{INGEST_TOKEN},read:{'z' * 40}")
    checker = Authenticator(tokens)
    for presented, expected in [
        (READ_TOKEN, {"read"}),
        (INGEST_TOKEN, {"ingest"}),
        (WRONG_TOKEN, None),
    ]:
        calls.clear()
        scopes = checker.scopes(presented)
        assert (set(scopes) if scopes else None) == expected
        # Every configured token is compared, whichever matched (no early exit), on digests of
        # equal length so that the comparison time does not depend on the token's length.
        assert len(calls) == 3
        assert {len(a) for a, _ in calls} | {len(b) for _, b in calls} == {32}


def test_bearer_header_parsing() -> None:
    assert bearer_token(f"Bearer {READ_TOKEN}") == READ_TOKEN
    assert bearer_token(f"BEARER   {READ_TOKEN}  ") == READ_TOKEN
    assert bearer_token("Bearer") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(f"Token {READ_TOKEN}") is None
    assert bearer_token(None) is None


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("read", "has no ':'"),
        (f"read:{READ_TOKEN},", "entry 2 is empty"),
        (f"root:{READ_TOKEN}", "unknown scope"),
        (f"{READ_TOKEN}:read", "unknown scope"),
        ("read:", "empty token"),
        ("read:short", "shorter than 16"),
        (f"read:{READ_TOKEN} with spaces", "may only contain"),
        (f"read:{READ_TOKEN}\x00", "may only contain"),
        (f"read:{READ_TOKEN};ingest:{INGEST_TOKEN}", "may only contain"),
        ("read:令牌令牌令牌令牌令牌令牌令牌令牌", "may only contain"),
    ],
)
def test_malformed_token_settings_are_refused(setting: str, message: str) -> None:
    with pytest.raises(TokenConfigError) as info:
        parse_tokens(setting)
    text = str(info.value)
    assert message in text
    assert "QUOTA_LEDGER_API_TOKENS" in text
    # The message never repeats a secret.
    assert READ_TOKEN not in text and INGEST_TOKEN not in text
    with pytest.raises(TokenConfigError):
        create_app(Settings(database_url="sqlite://", api_tokens=setting))


def test_well_formed_settings() -> None:
    assert parse_tokens("") == ()
    assert parse_tokens("   ") == ()
    tokens = parse_tokens(f" read:{READ_TOKEN} , ingest:{INGEST_TOKEN} ")
    assert [t.scope for t in tokens] == ["read", "ingest"]
    assert Authenticator(tokens).scopes(READ_TOKEN) == frozenset({"read"})


def test_serve_refuses_a_malformed_setting(monkeypatch) -> None:
    monkeypatch.setenv("QUOTA_LEDGER_API_TOKENS", "read:tooshort")
    monkeypatch.setenv("QUOTA_LEDGER_DATABASE_URL", "sqlite://")
    cli = typer.Typer()
    cli.command()(serve_command)
    result = CliRunner().invoke(cli, ["--port", "1"])
    assert result.exit_code == 2
    assert "QUOTA_LEDGER_API_TOKENS" in result.output
    assert "shorter than 16" in result.output
