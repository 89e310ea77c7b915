"""The benchmark's surroundings: fresh PostgreSQL databases, a private Redis database index, the
machine description, and a registry of started processes that are always terminated.

Everything here is cleanup-first: a bench database is dropped (``WITH (FORCE)``) and the Redis
database index flushed and released in ``finally`` blocks, whatever the scenario did.
"""

from __future__ import annotations

import contextlib
import os
import platform
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import NullPool

from ledger.db import make_engine, normalize_url, upgrade

PG_ADMIN_URL_ENV = "QUOTA_LEDGER_BENCH_PG_ADMIN_URL"
PG_ADMIN_URL_DEFAULT = os.environ.get(
    "QUOTA_LEDGER_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL_ENV = "QUOTA_LEDGER_BENCH_REDIS_URL"
REDIS_URL_DEFAULT = "redis://127.0.0.1:6379"

# The marker a bench run sets (SETNX) in the Redis database index it claims.
REDIS_MARKER = "quota-ledger-bench:claimed"
REDIS_MARKER_TTL_S = 6 * 3600  # a crashed run's claim goes away by itself


def pg_admin_url() -> str:
    return os.environ.get(PG_ADMIN_URL_ENV, PG_ADMIN_URL_DEFAULT)


def redis_base_url() -> str:
    return os.environ.get(REDIS_URL_ENV, REDIS_URL_DEFAULT).rstrip("/")


def _plain(url: URL) -> str:
    """A ``postgresql://`` URL text that psycopg, SQLAlchemy and the CLI all accept."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@dataclass
class Postgres:
    """Creates and always drops ``ql_bench_<hex>`` databases on one server."""

    admin_url: str = field(default_factory=pg_admin_url)
    created: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._admin: Engine = create_engine(
            normalize_url(self.admin_url),
            isolation_level="AUTOCOMMIT",
            poolclass=NullPool,
            connect_args={"connect_timeout": 5},
        )

    def version(self) -> str:
        with self._admin.connect() as conn:
            return str(conn.execute(text("SHOW server_version")).scalar_one())

    def create(self) -> str:
        """A new empty database with the schema at head; returns its URL."""
        name = f"ql_bench_{secrets.token_hex(6)}"
        with self._admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        url = _plain(self._admin.url.set(database=name))
        upgrade(url)
        return url

    def drop(self, url: str) -> None:
        name = normalize_url(url).database
        with self._admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        if name in self.created:
            self.created.remove(name)

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        url = self.create()
        try:
            yield url
        finally:
            self.drop(url)

    def close(self) -> None:
        for name in list(self.created):
            with contextlib.suppress(Exception), self._admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            self.created.remove(name)
        self._admin.dispose()


def production_settings(ram: int) -> dict[str, str]:
    """What a production PostgreSQL sets that the distribution's defaults do not: a quarter of
    the RAM for shared buffers (the usual advice), half of it as the planner's cache estimate,
    and checkpoints spaced out so that a bulk load is not one checkpoint after another. The
    rest stays at the defaults."""
    mib = 1024 * 1024
    return {
        "shared_buffers": f"{ram // 4 // mib}MB",
        "effective_cache_size": f"{ram // 2 // mib}MB",
        "max_wal_size": "8GB",
        "checkpoint_timeout": "15min",
    }


@contextlib.contextmanager
def private_postgres(settings: dict[str, str]) -> Iterator[str]:
    """A PostgreSQL cluster of the benchmark's own, with ``settings``: initdb in a temporary
    directory from the machine's newest server binaries, a free port on 127.0.0.1, stopped
    and deleted afterwards. Yields its admin URL. The shared server is not touched.
    PostgreSQL refuses to run as root, so as root the cluster belongs to ``postgres``."""
    import shutil
    import socket
    import tempfile
    from pathlib import Path

    import psycopg

    binaries = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    if not binaries:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    bin_dir = binaries[-1].parent
    directory = Path(tempfile.mkdtemp(prefix="ql-bench-pg-"))
    as_owner: dict[str, Any] = {}
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
        as_owner = {"user": "postgres", "group": "postgres"}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(
            [
                *(str(bin_dir / "initdb"), "-D", str(directory / "data"), "-U", "postgres"),
                *("--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"),
            ],
            check=True,
            capture_output=True,
            cwd=directory,
            **as_owner,
        )
        options = [f"{name}={value}" for name, value in settings.items()]
        options += ["listen_addresses=127.0.0.1", f"unix_socket_directories={directory}"]
        with (directory / "server.log").open("wb") as log:
            server = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(directory / "data"), "-p", str(port)]
                + [arg for option in options for arg in ("-c", option)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=directory,
                **as_owner,
            )
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(url, connect_timeout=2).close()
                break
            except psycopg.OperationalError as exc:
                if server.poll() is not None or time.monotonic() > deadline:
                    log_text = (directory / "server.log").read_text(errors="replace")
                    raise RuntimeError(f"the private PostgreSQL did not start: {log_text}") from exc
                time.sleep(0.2)
        yield url
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)  # fast shutdown
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def engine_for(url: str) -> Iterator[Engine]:
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


class RedisDb:
    """A private Redis database index (1–15) for one bench run.

    Claimed with SETNX of :data:`REDIS_MARKER` in an index that holds nothing else; flushed and
    released on :meth:`release`.
    """

    def __init__(self, base_url: str | None = None) -> None:
        import redis

        self.base_url = base_url or redis_base_url()
        self.index: int | None = None
        self.client: Any = None
        token = f"{os.getpid()}:{secrets.token_hex(4)}"
        for index in range(15, 0, -1):
            client = redis.Redis.from_url(f"{self.base_url}/{index}")
            if client.dbsize() != 0:
                client.close()
                continue
            if client.set(REDIS_MARKER, token, nx=True, ex=REDIS_MARKER_TTL_S):
                if client.dbsize() == 1:
                    self.index, self.client = index, client
                    break
                # Somebody else started writing here at the same moment: give it back.
                if client.get(REDIS_MARKER) == token.encode():
                    client.delete(REDIS_MARKER)
            client.close()
        if self.client is None:
            raise RuntimeError("no free Redis database index among 1-15 for the benchmark")

    @property
    def url(self) -> str:
        return f"{self.base_url}/{self.index}"

    def flush(self) -> None:
        """Empty the database but keep the claim."""
        self.client.flushdb()
        self.client.set(REDIS_MARKER, "claimed", ex=REDIS_MARKER_TTL_S)

    def version(self) -> str:
        return str(self.client.info("server").get("redis_version", "?"))

    def release(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.flushdb()
            self.client.close()
            self.client = None


class Processes:
    """Every subprocess a scenario starts, terminated (then killed) at the end."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[Any]] = []

    def start(self, args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        # A process group of its own, so the prefork children go down with it.
        proc = subprocess.Popen(args, start_new_session=True, **kwargs)
        self.running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # Children that outlived their parent in the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc in self.running:
            self.running.remove(proc)

    def close(self) -> None:
        for proc in list(self.running):
            self.stop(proc)


# --- the machine -------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def ram_bytes() -> int:
    """The machine's RAM (4 GiB if /proc/meminfo cannot tell)."""
    return _ram_bytes() or 4 * 1024**3


def _ram_bytes() -> int | None:
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def machine_info(postgres: Postgres | None, redis_db: RedisDb | None) -> dict[str, Any]:
    ram = _ram_bytes()
    pg = redis = None
    with contextlib.suppress(Exception):
        pg = postgres.version() if postgres else None
    with contextlib.suppress(Exception):
        redis = redis_db.version() if redis_db else None
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_bytes": ram,
        "ram_gib": round(ram / 2**30, 1) if ram else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "postgresql": pg,
        "redis": redis,
        "date": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }


def wait_until(predicate: Any, *, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
