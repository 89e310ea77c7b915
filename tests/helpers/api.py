"""Shared by the API and browser tests: tokens, a ledger scenario, the CLI's JSON for comparison,
a live uvicorn server in a thread, and a real ``quota-ledger serve`` process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from events import validate_event
from ledger.policy import load_policy
from ledger.service import Ledger
from tests.helpers import free_port
from tests.support import Events, Numbers, ts
from worker.cli import app as cli_app

READ_TOKEN = "read-token-0123456789abcdef"
INGEST_TOKEN = "ingest-token-0123456789abcdef"
BOTH_TOKEN = "both-token-0123456789abcdef"
WRONG_TOKEN = "wrong-token-0123456789abcdef"
API_TOKENS = f"read:{READ_TOKEN},ingest:{INGEST_TOKEN},read:{BOTH_TOKEN},ingest:{BOTH_TOKEN}"

QUEUE = "quota_ledger.events"
# Every show/instances call in the tests is pinned to this instant, so answers never depend on
# the wall clock: day 340 of the scenario (an ECS bought for a year on day 0 has 25 days left).
AT = ts(340)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ui_login(client: Any, token: str = READ_TOKEN, next_path: str = "/ui/") -> Any:
    """Sign in to the ops page through its form (the client keeps the session cookie)."""
    return client.post(
        "/ui/login",
        data={"token": token, "next": next_path},
        follow_redirects=False,
    )


READ = auth(READ_TOKEN)
INGEST = auth(INGEST_TOKEN)


@dataclass(frozen=True)
class Scenario:
    web: str = "i-web-1"  # ineligible at AT: no bandwidth, remaining term too short
    nat: str = "i-nat-1"  # a one-month NAT gateway
    hk: str = "i-hk-1"  # not_required: Hong Kong
    shop: str = "i-shop-1"  # not_needed: chengxintong shop
    used_number: str = "SN-API-1"
    reserved_numbers: tuple[str, ...] = ("SN-API-2", "SN-API-3")
    filing: str = "F-1"


SCENARIO = Scenario()


def scenario_events() -> list[dict[str, Any]]:
    ev = Events("api")
    s = SCENARIO
    return [
        ev.purchase(s.web, "ecs", at=0, term=12, expires=365, bandwidth=5, account="acct-web"),
        ev.request(s.web, at=10, account="acct-web"),
        ev.request(s.web, at=10.5, account="acct-web"),
        ev.request(s.web, at=11, account="acct-web"),
        ev.file(
            s.web,
            s.used_number,
            at=12,
            filing=s.filing,
            subject="subject-1",
            website="shop.example.com",
            account="acct-web",
        ),
        ev.bandwidth(s.web, 0, at=20),
        ev.request(s.web, at=25, account="acct-web"),  # rejected: no_public_bandwidth
        ev.purchase(s.nat, "nat_gateway", at=300, term=1, expires=330),
        ev.purchase(s.hk, "ecs", at=0, region="cn-hongkong"),
        ev.purchase(s.shop, "chengxintong_shop", at=0),
    ]


def seed(engine: Engine) -> Ledger:
    """Apply the scenario through the ledger service (numbers SN-API-1, SN-API-2, …)."""
    ledger = Ledger(engine, load_policy(), new_number=Numbers("SN-API"))
    results = ledger.apply([validate_event(event) for event in scenario_events()])
    assert [r.outcome for r in results].count("applied") == 9, results
    return ledger


def cli_json(db_url: str, *args: str) -> Any:
    """What ``quota-ledger --db URL --json ARGS`` prints, parsed."""
    result = CliRunner().invoke(cli_app, ["--db", db_url, "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- Redis -----------------------------------------------------------------------------------


def queue_length(redis_url: str, queue: str = QUEUE) -> int:
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        return int(client.llen(queue))
    finally:
        client.close()


def closed_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on (bound, then released)."""
    return free_port()


# --- raw HTTP/1.1 on a socket (for what httpx will not send: half bodies, held sockets) -------


def read_http_response(sock: socket.socket) -> bytes:
    """One response: until its Content-Length is complete, or the server closes."""
    response = b""
    while True:
        data = sock.recv(65536)
        if not data:
            return response
        response += data
        if b"\r\n\r\n" in response:
            header, _, rest = response.partition(b"\r\n\r\n")
            for line in header.split(b"\r\n"):
                if line.lower().startswith(b"content-length:") and len(rest) >= int(
                    line.split(b":")[1]
                ):
                    return response


def raw_request(base_url: str, head: bytes, body_chunks: list[bytes]) -> bytes:
    """Send ``head`` and the body chunks (stopping if the server hangs up), read the answer."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(head)
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        return read_http_response(sock)


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` within ``within`` seconds (data read is dropped)."""
    deadline = time.monotonic() + within
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                return True
    except TimeoutError:
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True
    return False


# --- a live server ---------------------------------------------------------------------------


@contextlib.contextmanager
def live_server(app: Any, timeout: float = 20.0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread on a free 127.0.0.1 port; yields its base URL."""
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


# --- a real `quota-ledger serve` process ------------------------------------------------------


def serve_env(**extra: str) -> dict[str, str]:
    """This process's environment without any QUOTA_LEDGER_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTA_LEDGER_")}
    env.update(extra)
    return env


@dataclass
class ServeProcess:
    """A running ``quota-ledger serve``: its URL, process and everything it printed."""

    base_url: str
    port: int
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def output(self) -> str:
        return "".join(self.lines)

    def rss_bytes(self) -> int:
        """The server's resident memory now (Linux /proc)."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


@contextlib.contextmanager
def serve_process(
    db_url: str,
    settings: Mapping[str, str] | None = None,
    *,
    args: tuple[str, ...] = (),
    timeout: float = 30.0,
) -> Iterator[ServeProcess]:
    """Start ``python -m worker serve`` (the ``quota-ledger serve`` entry point) on a free
    127.0.0.1 port with exactly the given ``QUOTA_LEDGER_*`` settings; wait for /healthz; stop
    it with SIGTERM (SIGKILL after 20 s) on exit. Output is collected in ``lines``."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "serve", "--port", str(port), "--db", db_url, *args],
        env=serve_env(**dict(settings or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = ServeProcess(f"http://127.0.0.1:{port}", port, proc)

    def collect() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            server.lines.append(line)

    reader = threading.Thread(target=collect, name="serve-output", daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{server.base_url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, server.output()
            assert time.monotonic() < deadline, f"serve did not come up: {server.output()}"
            time.sleep(0.2)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        reader.join(10)
