"""``quota-ledger serve`` for real: the console entry point starts uvicorn, answers, and stops on
SIGTERM; a malformed token setting is refused before anything listens."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port
from tests.helpers.api import API_TOKENS, READ, serve_env, serve_process
from tests.helpers.redis_db import private_redis_db

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]


def test_serve_answers_and_stops(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'serve.db'}"
    with private_redis_db() as broker:
        settings = {"QUOTA_LEDGER_API_TOKENS": API_TOKENS, "QUOTA_LEDGER_BROKER_URL": broker}
        with serve_process(db, settings) as server:
            base = server.base_url
            assert httpx.get(f"{base}/readyz", timeout=10).json()["status"] == "ready"
            page = httpx.get(f"{base}/v1/instances", headers=READ, timeout=10)
            assert page.json() == {"items": [], "next_cursor": None}
            assert httpx.get(f"{base}/v1/instances", timeout=10).status_code == 401
            assert "server" not in httpx.get(f"{base}/healthz").headers
    output = server.output()
    # uvicorn shuts down gracefully, then re-raises the signal (so exit status says SIGTERM).
    assert server.proc.returncode in (0, -signal.SIGTERM), output
    assert "Finished server process" in output, output


def test_serve_refuses_malformed_tokens(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker", "serve", "--port", str(free_port())],
        env=serve_env(
            QUOTA_LEDGER_API_TOKENS="read:abc,write:0123456789abcdefXYZ",
            QUOTA_LEDGER_DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "QUOTA_LEDGER_API_TOKENS: entry 1 (read)" in result.stderr
    assert "shorter than 16" in result.stderr
    assert "Traceback" not in result.stderr
    assert "0123456789abcdefXYZ" not in result.stderr
