"""How ``QUOTA_LEDGER_PREFETCH_MULTIPLIER`` was chosen: drain time of the same queue with
multiplier 1, 4 and 16 (docs/operations.md "Celery settings").

    python -m bench.prefetch [--concurrency 2] [--repeat 5]

For each multiplier and each message shape a fresh PostgreSQL database and a private Redis
index are used; a real ``quota-ledger worker`` (prefork, ``--concurrency``) is started and
warmed up, then the events are published and the clock runs until every event is in the
ledger. Two shapes: many one-event messages (where prefetching saves broker round trips) and
few 250-event batches (where a prefetched batch waits behind a running one while another
process may be idle). Needs the machine's PostgreSQL and Redis (127.0.0.1).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import redis

from events.publish import close_producer, publish_many
from tests.support import Events

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get(
    "QUOTA_LEDGER_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
SHAPES = {"1-event messages": (800, 1), "250-event batches": (8000, 250)}
MULTIPLIERS = (1, 4, 16)


def _free_redis_index() -> tuple[int, redis.Redis]:
    for index in range(1, 16):
        client = redis.Redis(host="127.0.0.1", port=6379, db=index)
        if client.dbsize() == 0 and client.set("quota_ledger:bench:claimed", 1, nx=True, ex=3600):
            return index, client
        client.close()
    raise SystemExit("no free Redis database index")


def _run_once(multiplier: int, events: int, batch: int, concurrency: int) -> float:
    name = f"ql_prefetch_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    index, client = _free_redis_index()
    database_url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    broker_url = f"redis://127.0.0.1:6379/{index}"
    env = {
        **os.environ,
        "QUOTA_LEDGER_DATABASE_URL": database_url,
        "QUOTA_LEDGER_BROKER_URL": broker_url,
        "QUOTA_LEDGER_PREFETCH_MULTIPLIER": str(multiplier),
    }
    subprocess.run(
        [sys.executable, "-m", "worker", "db", "upgrade"],
        env=env,
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    log = Path(tempfile.mkstemp(suffix=".log")[1])
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker",
                "worker",
                "--concurrency",
                str(concurrency),
                "--loglevel",
                "INFO",
            ],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while b" ready." not in log.read_bytes():
            if time.monotonic() > deadline or worker.poll() is not None:
                raise SystemExit(log.read_text(errors="replace")[-3000:])
            time.sleep(0.1)
        factory = Events(f"pf{multiplier}")
        # Warm-up: every pool process connects to the database once.
        warm = [factory.purchase(f"i-warm-{n}") for n in range(concurrency * 4)]
        publish_many(warm, batch_size=1, broker_url=broker_url)
        _wait(database_url, len(warm))
        stream = []
        for n in range(events // 4):
            instance = f"i-{n}"
            stream.append(factory.purchase(instance))
            stream += [factory.request(instance, at=10 + k) for k in range(3)]
        started = time.perf_counter()
        publish_many(stream, batch_size=batch, broker_url=broker_url)
        _wait(database_url, len(warm) + len(stream))
        return time.perf_counter() - started
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        close_producer(broker_url)
        client.flushdb()
        client.close()
        log.unlink(missing_ok=True)
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _wait(database_url: str, entries: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(database_url, autocommit=True) as conn:
        while True:
            (count,) = conn.execute("SELECT count(*) FROM ledger_entries").fetchone()
            if count >= entries:
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"only {count} of {entries} entries after {timeout}s")
            time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.prefetch")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"worker --concurrency {args.concurrency}; median of {args.repeat} runs; events/s")
    print(f"{'shape':<20} " + " ".join(f"{'x' + str(m):>10}" for m in MULTIPLIERS))
    for shape, (events, batch) in SHAPES.items():
        times: dict[int, list[float]] = {m: [] for m in MULTIPLIERS}
        # Interleaved (x1, x4, x16, x1, …) so that background load hits every setting alike.
        for _ in range(args.repeat):
            for multiplier in MULTIPLIERS:
                times[multiplier].append(_run_once(multiplier, events, batch, args.concurrency))
        rates = [events / statistics.median(times[m]) for m in MULTIPLIERS]
        print(f"{shape:<20} " + " ".join(f"{r:>10.0f}" for r in rates), flush=True)


if __name__ == "__main__":
    main()
