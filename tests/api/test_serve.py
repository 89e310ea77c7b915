"""``quota-ledger serve`` for real: the console entry point starts uvicorn, answers, and stops on
SIGTERM; a malformed token setting is refused before anything listens."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.api.helpers import API_TOKENS, READ, private_redis_db

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTA_LEDGER_")}
    env.update(extra)
    return env


def test_serve_answers_and_stops(tmp_path: Path) -> None:
    port = _free_port()
    db = f"sqlite:///{tmp_path / 'serve.db'}"
    with private_redis_db() as broker:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "serve", "--port", str(port), "--db", db],
            env=_env(QUOTA_LEDGER_API_TOKENS=API_TOKENS, QUOTA_LEDGER_BROKER_URL=broker),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "serve did not come up"
                time.sleep(0.2)
            assert httpx.get(f"{base}/readyz", timeout=10).json()["status"] == "ready"
            page = httpx.get(f"{base}/v1/instances", headers=READ, timeout=10)
            assert page.json() == {"items": [], "next_cursor": None}
            assert httpx.get(f"{base}/v1/instances", timeout=10).status_code == 401
            assert "server" not in httpx.get(f"{base}/healthz").headers
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    output = proc.stdout.read() if proc.stdout else ""
    # uvicorn shuts down gracefully, then re-raises the signal (so exit status says SIGTERM).
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "Finished server process" in output, output


def test_serve_refuses_malformed_tokens(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker", "serve", "--port", str(_free_port())],
        env=_env(
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
