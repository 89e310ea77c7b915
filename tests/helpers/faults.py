"""Plain helpers of the fault suite (``tests/faults``; its fixtures are in its conftest.py).

- processes: the children of a worker, a process group's members, a kill at a chosen moment, the
  pool processes that hold an open transaction;
- ``RedisServer`` / ``PostgresServer``: a private ``redis-server`` (AOF) and a private PostgreSQL
  cluster on free ports, which a test may SIGKILL and restart;
- workloads and checks: events to publish, ledger and broker counts, waiting for the pipeline to
  settle, ``rebuild --check`` and ``verify`` through the real CLI.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from ledger.db import normalize_url
from tests.helpers import wait_until
from tests.helpers.pipeline import Pipeline
from tests.support import Events

# --- processes ---------------------------------------------------------------------------------


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ")".
    return int(stat.rsplit(")", 1)[1].split()[1])


def child_pids(pid: int) -> list[int]:
    """The live children of ``pid`` (read from /proc, no psutil needed)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _ppid(int(entry)) == pid:
            out.append(int(entry))
    return sorted(out)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry))
    return out


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def kill_if_still(target: int, condition: Callable[[], bool], *, group: bool = False) -> bool:
    """SIGKILL ``target`` (a pid, or a process group with ``group``) at a moment chosen on
    purpose: freeze it (SIGSTOP), give whatever it already sent (a COMMIT, a lock release) time
    to be served, and kill it only if ``condition()`` still holds — it cannot change while the
    target is frozen. Otherwise thaw it (SIGCONT) and return False, so the caller tries again.
    Without the freeze a kill aimed at a state seen a moment earlier may land after it (a
    transaction already committed, a lock already released)."""
    send = os.killpg if group else os.kill
    try:
        send(target, signal.SIGSTOP)
        time.sleep(0.05)
        if condition():
            send(target, signal.SIGKILL)
            return True
        send(target, signal.SIGCONT)
    except ProcessLookupError:
        pass
    return False


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def _local_ports_by_inode(remote_port: int) -> dict[int, int]:
    """inode → local port of the TCP connections to ``remote_port`` (/proc/net/tcp{,6})."""
    out = {}
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
                parts = line.split()
                local, remote, inode = parts[1], parts[2], int(parts[9])
                if int(remote.rsplit(":", 1)[1], 16) == remote_port:
                    out[inode] = int(local.rsplit(":", 1)[1], 16)
    return out


def pids_in_transaction(admin: Engine, database: str, pids: list[int]) -> list[int]:
    """Which of ``pids`` hold an open transaction on ``database`` right now: the PostgreSQL
    backends with ``xact_start`` set, mapped to the client processes through their TCP ports."""
    with admin.connect() as conn:
        ports = set(
            conn.execute(
                text(
                    "SELECT client_port FROM pg_stat_activity WHERE datname = :db"
                    " AND xact_start IS NOT NULL AND client_port IS NOT NULL"
                    " AND pid <> pg_backend_pid()"
                ),
                {"db": database},
            ).scalars()
        )
    if not ports:
        return []
    by_inode = _local_ports_by_inode(5432)
    return [pid for pid in pids if {by_inode.get(i) for i in _socket_inodes(pid)} & ports]


# --- a private redis-server --------------------------------------------------------------------


@dataclass
class RedisServer:
    """``redis-server`` on its own port and directory, AOF with ``appendfsync`` as given
    (``always``: fsync before every reply; ``everysec``: once a second, docker-compose's;
    ``off``: no AOF at all, so a kill loses everything the broker held)."""

    port: int
    directory: Path
    appendfsync: str = "always"
    popen: subprocess.Popen | None = None
    starts: int = 0
    kills: int = 0
    logs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = self.directory / f"redis-{self.starts}.log"
        self.logs.append(log)
        with log.open("wb") as handle:
            self.popen = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(self.directory),
                    "--appendonly",
                    "no" if self.appendfsync == "off" else "yes",
                    "--appendfsync",
                    "always" if self.appendfsync == "off" else self.appendfsync,
                    "--save",
                    "",
                    "--maxmemory-policy",
                    "noeviction",
                    "--daemonize",
                    "no",
                ],
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.starts += 1
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        try:

            def ready() -> bool:
                try:
                    return bool(client.ping())
                except redis.RedisError:
                    if self.popen is not None and self.popen.poll() is not None:
                        raise AssertionError(
                            f"redis-server exited: {log.read_text(errors='replace')}"
                        ) from None
                    return False

            wait_until(ready, 20, f"redis-server on port {self.port}")
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync. What Redis acknowledged was written to the AOF
        before the reply (with ``always`` also fsynced), so it survives in the kernel's page
        cache; only a crash of the host loses the unsynced part (docs/reliability.md)."""
        if self.popen is not None:
            kill_group(self.popen.pid)
            self.popen.wait(10)
            self.kills += 1

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.kill()


# --- a private PostgreSQL cluster -------------------------------------------------------------


def _pg_bin() -> Path:
    """The newest PostgreSQL server binaries on the machine (Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not found:
        pytest.fail("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    return found[-1].parent


@dataclass
class PostgresServer:
    """A PostgreSQL cluster of its own (initdb in a temporary directory, a free port), which a
    test may SIGKILL and restart; the machine's shared server is never touched. PostgreSQL
    refuses to run as root, so as root the cluster belongs to the ``postgres`` system user."""

    port: int
    directory: Path
    popen: subprocess.Popen | None = None
    starts: int = 0
    kills: int = 0
    logs: list[Path] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _user(self) -> dict[str, Any]:
        return {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
        subprocess.run(
            [
                str(_pg_bin() / "initdb"),
                *("-D", str(self.data), "-U", "postgres", "--auth=trust"),
                *("--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"),
            ],
            check=True,
            capture_output=True,
            cwd=self.directory,
            **self._user(),
        )

    def start(self, timeout: float = 60) -> None:
        """Start the postmaster. Right after a SIGKILL of the postmaster its orphaned backends
        may still hold the shared memory for a moment, and PostgreSQL refuses to start until
        they are gone: retry until it runs (crash recovery then replays the WAL)."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.directory / f"postgres-{self.starts}.log"
            self.logs.append(log)
            self.starts += 1
            with log.open("wb") as handle:
                self.popen = subprocess.Popen(
                    [
                        str(_pg_bin() / "postgres"),
                        *("-D", str(self.data), "-p", str(self.port)),
                        *("-c", "listen_addresses=127.0.0.1"),
                        *("-c", f"unix_socket_directories={self.directory}"),
                        *("-c", "max_connections=100", "-c", "shared_buffers=32MB"),
                    ],
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    cwd=self.directory,
                    **self._user(),
                )
            if self._wait_ready(deadline):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"PostgreSQL did not start: {log.read_text(errors='replace')}")
            time.sleep(0.5)

    def _wait_ready(self, deadline: float) -> bool:
        import psycopg

        while time.monotonic() < deadline:
            if self.popen is not None and self.popen.poll() is not None:
                return False  # exited (shared memory still in use): the caller retries
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.1)
        return False

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def kill(self) -> None:
        """SIGKILL the postmaster alone: no shutdown checkpoint; its backends notice their
        parent is gone and exit, the next start runs crash recovery."""
        if self.popen is not None:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
            self.kills += 1

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            kill_group(self.popen.pid)
            self.popen.wait(10)
        # Orphaned backends of a killed postmaster (same process group) go too.
        if self.popen is not None:
            kill_group(self.popen.pid)


# --- databases ---------------------------------------------------------------------------------


def database_name(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?", 1)[0]


def check_engine(url: str) -> Engine:
    """An engine for the test's own reads, named so that fault injection can spare it."""
    return create_engine(
        normalize_url(url),
        poolclass=NullPool,
        connect_args={"application_name": "quota-ledger-fault-check"},
    )


# --- workloads and checks ----------------------------------------------------------------------


def workload(
    prefix: str, instances: int, requests: int = 4, expires_days: float = 365
) -> list[dict[str, Any]]:
    """Per instance a purchase followed by ``requests`` service-number requests, consecutive,
    so that a batch size divisible by ``1 + requests`` never splits an instance's events.
    Subscriptions end ``expires_days`` after 2026-01-01."""
    factory = Events(prefix)
    events: list[dict[str, Any]] = []
    for n in range(instances):
        instance = f"i-{prefix}-{n:05d}"
        events.append(factory.purchase(instance, expires=expires_days))
        events += [factory.request(instance, at=10 + k / 10) for k in range(requests)]
    return events


def ledger_counts(engine: Engine, prefix: str | None = None) -> dict[str, int]:
    """Entries, distinct event ids, dead letters, and numbers issued (of ``prefix``'s events)."""
    like = f"{prefix}-%" if prefix else "%"
    with engine.connect() as conn:
        entries, distinct = conn.execute(
            text(
                "SELECT count(*), count(DISTINCT event_id) FROM ledger_entries"
                " WHERE event_id LIKE :like"
            ),
            {"like": like},
        ).one()
        letters = conn.execute(text("SELECT count(*) FROM dead_letters")).scalar_one()
        numbers = conn.execute(text("SELECT count(*) FROM service_numbers")).scalar_one()
    return {"entries": entries, "distinct": distinct, "dead_letters": letters, "numbers": numbers}


def ledger_event_ids(engine: Engine, prefix: str) -> set[str]:
    """The event ids of ``prefix``'s events that the ledger holds."""
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT event_id FROM ledger_entries WHERE event_id LIKE :like"),
            {"like": f"{prefix}-%"},
        )
        return {row[0] for row in rows}


def entry_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM ledger_entries")).scalar_one())


def wait_for_an_empty_queue(broker_url: str, timeout: float) -> None:
    """Nothing queued, nothing delivered and unacknowledged, no delivery counter left."""
    wait_until(
        lambda: redis_queue_state(broker_url) == {"queued": 0, "unacked": 0, "delivery_keys": 0},
        timeout,
        "an empty queue",
    )


def settled_count(engine: Engine, broker_url: str, timeout: float) -> int:
    """Wait until the broker holds no message for the workers (nothing queued, nothing
    delivered and unacknowledged) and the ledger stops growing; return its entry count then.

    Delivery counters are not waited for: a task that completed while Redis was down could not
    delete its counter (best effort, ``worker/deliveries.py``), which then only expires."""
    last = -1
    state: dict[str, int] = {}

    def settled() -> bool:
        nonlocal last, state
        state = redis_queue_state(broker_url)
        count, last = last, entry_count(engine)
        return state["queued"] == 0 and state["unacked"] == 0 and count == last

    try:
        wait_until(settled, timeout, "the broker to hold no message", step=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: broker {state}, {last} entries") from None
    return last


def audit_clean(pipe: Pipeline) -> dict[str, Any]:
    """``quota-ledger rebuild --check`` and ``verify`` (the real CLI) must both pass."""
    rebuilt = pipe.cli("rebuild", "--check", "--json", timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    verified = pipe.cli("verify", "--json", timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    report = json.loads(verified.stdout)
    assert report["ok"] is True and json.loads(rebuilt.stdout)["drift"] == []
    return report


def redis_queue_state(url: str) -> dict[str, int]:
    """Messages waiting, messages delivered and unacknowledged, delivery counters left."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        return {
            "queued": client.llen("quota_ledger.events"),
            "unacked": client.hlen("unacked"),
            "delivery_keys": len(client.keys("quota_ledger:deliveries:*")),
        }
    finally:
        client.close()


_RECEIVED = re.compile(r"Task ([a-z_.]+)\[([0-9a-f-]+)\] received")


def _receipts(log: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, task_id in _RECEIVED.findall(log):
        counts[task_id] = counts.get(task_id, 0) + 1
    return counts


def redelivered(log: str) -> int:
    """Messages a worker log shows as received more than once."""
    return sum(1 for n in _receipts(log).values() if n > 1)


def redeliveries(log: str) -> int:
    """Receipts beyond each message's first (one message may come back several times)."""
    return sum(n - 1 for n in _receipts(log).values())
