"""The two Celery scenarios: events through the real pipeline (publisher → Redis → ``quota-ledger
worker --concurrency 2`` → PostgreSQL), end to end, against baselines run in the same run.

Timing: the worker is started and warmed up first (its pool processes have connected to the
broker and the database); the clock starts when publishing starts and stops when the queue and
kombu's ``unacked`` hash are both empty. The project acknowledges late (``task_acks_late``), so
an empty ``unacked`` means every message has been fully processed. The same detection is used
for the no-op baseline, so both sides are measured alike.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from bench import data
from bench.celery_worker import NOOP_TASK
from bench.scenarios import Context, Result, rate

QUEUE = "quota_ledger.events"
WORKER_TIMEOUT_S = 60.0


def _pipeline_available() -> bool:
    """The Celery pipeline's modules (events/publish.py, worker/celery_app.py, tasks.py)."""
    import importlib.util

    names = ("events.publish", "worker.celery_app", "worker.tasks")
    return all(importlib.util.find_spec(name) is not None for name in names)


def _cli_has_worker_command() -> bool:
    from worker.cli import app

    names = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    return "worker" in names


def _pending(client: Any) -> int:
    """Messages queued or delivered but not yet acknowledged."""
    queued = sum(client.llen(key) for key in client.scan_iter(match=f"{QUEUE}*", count=1000))
    return queued + client.hlen("unacked")


class _Worker:
    """One Celery worker process (group) with its environment, always stopped."""

    def __init__(self, ctx: Context, kind: str, database_url: str, concurrency: int = 2) -> None:
        self.ctx = ctx
        env = {
            **os.environ,
            "QUOTA_LEDGER_DATABASE_URL": database_url,
            "QUOTA_LEDGER_BROKER_URL": ctx.redis.url,
        }
        if kind == "ledger" and _cli_has_worker_command():
            args = [sys.executable, "-m", "worker", "worker", "--concurrency", str(concurrency)]
            args += ["--queues", QUEUE, "--loglevel", "WARNING"]
        else:
            args = [sys.executable, "-m", "bench.celery_worker", kind, "--concurrency", "2"]
            args += ["--queues", QUEUE, "--loglevel", "WARNING"]
        self.args = args
        # Closed in stop(); the worker writes its log here.
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.proc = ctx.processes.start(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def check(self) -> None:
        if self.proc.poll() is not None:
            self.log.seek(0)
            raise RuntimeError(
                f"worker {' '.join(self.args[2:])} exited {self.proc.returncode}: "
                f"{self.log.read()[-2000:]}"
            )

    def stop(self) -> None:
        self.ctx.processes.stop(self.proc)
        self.log.close()


def _send(
    task: str,
    payloads: Sequence[list[dict[str, Any]]],
    broker_url: str,
    sequences: Sequence[dict[str, Any]] | None = None,
) -> None:
    """Send messages by task name with Celery's own producer (as ``enqueue_batches`` did before
    it numbered them), optionally with a ``sequence`` keyword argument each."""
    from events.publish import PUBLISH_RETRY_POLICY, producer_app

    app = producer_app(broker_url)
    with app.producer_or_acquire() as producer:
        for index, args in enumerate(payloads):
            app.send_task(
                task,
                args=[args],
                kwargs={"sequence": sequences[index]} if sequences else None,
                queue=QUEUE,
                routing_key=QUEUE,
                producer=producer,
                ignore_result=True,
                retry=True,
                retry_policy=dict(PUBLISH_RETRY_POLICY),
            )


def _wait_drained(
    ctx: Context, worker: _Worker, *, timeout: float, done: Callable[[], bool] | None = None
) -> float:
    """Poll until nothing is pending and ``done()`` agrees; returns the time
    (``perf_counter``) it was first seen so.

    kombu moves a delivered message from the queue to ``unacked`` in two steps, so "nothing
    pending" alone can be seen for an instant while the last message is in flight: the
    ledger run also counts its rows (``done``), the no-op run needs two empty looks in a row.
    """
    client = ctx.redis.client
    deadline = time.monotonic() + timeout
    empty_since: float | None = None
    while time.monotonic() < deadline:
        now = time.perf_counter()
        if _pending(client) == 0:
            if done is not None:
                if done():
                    return now
            elif empty_since is not None:
                return empty_since
            else:
                empty_since = now
        else:
            empty_since = None
        worker.check()
        time.sleep(0.01)
    raise RuntimeError(f"the worker did not drain the queue within {timeout:.0f} s")


def _row_counter(url: str, expected: int) -> Callable[[], bool]:
    def done() -> bool:
        with psycopg.connect(url) as conn:
            entries = conn.execute("SELECT count(*) FROM ledger_entries").fetchone()[0]
            dead = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
        return entries + dead >= expected

    return done


def _events(lines: list[str]) -> list[Any]:
    from events import EventRejection, parse_event

    events = [parse_event(line) for line in lines]
    assert not any(isinstance(e, EventRejection) for e in events)
    return events


Publisher = Callable[[list[Any], int, str], None]


def _sequenced(events: list[Any], batch_size: int, broker_url: str) -> None:
    """The project's publisher: every element numbered per instance (SPEC §9)."""
    from events.publish import enqueue_batches

    enqueue_batches(events, batch_size=batch_size, broker_url=broker_url)


def _unsequenced(events: list[Any], batch_size: int, broker_url: str) -> None:
    """The same messages without numbers: applied on arrival, no resequencer."""
    from events import event_to_payload
    from events.publish import TASK_APPLY_BATCH

    payloads = [event_to_payload(event) for event in events]
    batches = [payloads[i : i + batch_size] for i in range(0, len(payloads), batch_size)]
    _send(TASK_APPLY_BATCH, batches, broker_url)


def _run_ledger(
    ctx: Context,
    lines: list[str],
    batch_size: int,
    publisher: Publisher = _sequenced,
    *,
    concurrency: int = 2,
    cpu: dict[str, float] | None = None,
) -> tuple[float, str, int]:
    """Publish ``lines`` through the pipeline into a fresh database; returns (seconds, url,
    rows appended or dead-lettered). The caller drops the database. ``cpu``, if given, gets
    the CPU seconds each party spent in the timed window (:class:`_CpuMeter`)."""
    from events.publish import close_producer, enqueue_batches

    url = ctx.postgres.create()
    ctx.redis.flush()
    warmup = _events(data.event_lines(4, prefix="warmup-"))
    events = _events(lines)
    worker = _Worker(ctx, "ledger", url, concurrency)
    try:
        enqueue_batches(warmup, batch_size=1, broker_url=ctx.redis.url)
        _wait_drained(ctx, worker, timeout=WORKER_TIMEOUT_S, done=_row_counter(url, 4))
        meter = _CpuMeter(worker.proc.pid, url, ctx.redis.client) if cpu is not None else None
        started = time.perf_counter()
        publisher(events, batch_size, ctx.redis.url)
        finished = _wait_drained(
            ctx,
            worker,
            timeout=max(600.0, len(events) / 50),
            done=_row_counter(url, len(events) + len(warmup)),
        )
        seconds = finished - started
        if meter is not None and cpu is not None:
            cpu.update(meter.spent())
    finally:
        worker.stop()
        close_producer(ctx.redis.url)
    with psycopg.connect(url) as conn:
        entries = conn.execute("SELECT count(*) FROM ledger_entries").fetchone()[0]
        dead = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    if entries + dead != len(lines) + len(warmup):
        raise RuntimeError(
            f"{entries} entries + {dead} dead letters for {len(lines) + len(warmup)} events"
        )
    if dead:
        raise RuntimeError(f"{dead} events were dead-lettered")
    return seconds, url, entries


def _run_noop(ctx: Context, lines: list[str], batch_size: int) -> float:
    from events import event_to_payload
    from events.publish import close_producer

    ctx.redis.flush()
    events = _events(lines)
    worker = _Worker(ctx, "noop", "sqlite://")
    try:
        _send(NOOP_TASK, [[{}]] * 4, ctx.redis.url)
        _wait_drained(ctx, worker, timeout=WORKER_TIMEOUT_S)
        started = time.perf_counter()
        payloads = [event_to_payload(event) for event in events]
        batches = [payloads[i : i + batch_size] for i in range(0, len(payloads), batch_size)]
        _send(NOOP_TASK, batches, ctx.redis.url)
        finished = _wait_drained(ctx, worker, timeout=max(600.0, len(events) / 50))
        return finished - started
    finally:
        worker.stop()
        close_producer(ctx.redis.url)


def single(ctx: Context) -> Result:
    count = ctx.n(20_000, 200)
    lines = data.event_lines(count, prefix="s-")
    ctx.log(f"celery single: {count:,} events, one per message, worker --concurrency 2 …")
    seconds, url, _ = _run_ledger(ctx, lines, 1)
    ctx.postgres.drop(url)
    events_per_s = rate(count, seconds)
    ctx.log(f"  {events_per_s:,.0f} events/s; baseline: {count:,} no-op tasks …")
    noop_seconds = _run_noop(ctx, lines, 1)
    tasks_per_s = rate(count, noop_seconds)
    ratio = events_per_s / tasks_per_s
    return Result(
        "celery_single",
        "single-event messages",
        f"{count:,} events, one per message, worker --concurrency 2: events/s",
        {"events": count, "seconds": round(seconds, 2), "events_per_s": round(events_per_s)},
        {
            "what": f"{count:,} no-op Celery tasks (same app, settings, options and payloads)",
            "seconds": round(noop_seconds, 2),
            "tasks_per_s": round(tasks_per_s),
        },
        ratio,
        "ratio ≥ 0.6",
        ratio >= 0.6,
        params={"concurrency": 2, "batch_size": 1, "publisher": "events.publish.enqueue_batches"},
    )


def _pg_baseline(url: str) -> tuple[int, float]:
    """Raw ``executemany`` of the run's own ledger rows into a plain table, one connection,
    commit per 1,000: (rows, rows/s)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT instance_id, instance_seq, event_id, type, occurred_at, recorded_at, "
            "payload, outcome, reasons::text, result::text, policy_version, prev_hash, hash "
            "FROM ledger_entries ORDER BY seq"
        ).fetchall()
        conn.execute(
            "CREATE TABLE bench_rows (instance_id text, instance_seq integer, event_id text, "
            "type text, occurred_at timestamptz, recorded_at timestamptz, payload text, "
            "outcome text, reasons jsonb, result jsonb, policy_version text, prev_hash text, "
            "hash text)"
        )
        conn.commit()
        insert = f"INSERT INTO bench_rows VALUES ({', '.join(['%s'] * 13)})"
        started = time.perf_counter()
        with conn.cursor() as cur:
            for chunk in data.iter_chunks(rows, 1000):
                cur.executemany(insert, chunk)
                conn.commit()
        return len(rows), rate(len(rows), time.perf_counter() - started)


def batched(ctx: Context) -> Result:
    count = ctx.n(100_000, 1000)
    lines = data.event_lines(count, prefix="b-")
    ctx.log(f"celery batched: {count:,} events in messages of 500 …")
    seconds, url, _ = _run_ledger(ctx, lines, 500)
    try:
        events_per_s = rate(count, seconds)
        ctx.log(f"  {events_per_s:,.0f} events/s; baseline: raw executemany …")
        rows, rows_per_s = _pg_baseline(url)
    finally:
        ctx.postgres.drop(url)
    ratio = events_per_s / rows_per_s
    # For the profile scenario's estimate of the Celery share (bench/profile.py).
    ctx.setup["celery_batched"] = {"concurrency": 2, "events_per_s": events_per_s}
    return Result(
        "celery_batched",
        "batched messages",
        f"{count:,} events in messages of 500, worker --concurrency 2: events/s end to end",
        {"events": count, "seconds": round(seconds, 2), "events_per_s": round(events_per_s)},
        {
            "what": "the run's ledger rows, raw psycopg executemany into a plain table, "
            "one connection, commit per 1,000",
            "rows": rows,
            "rows_per_s": round(rows_per_s),
        },
        ratio,
        # The absolute 10,000 events/s is kept beside it in the figures: it says little
        # across machines (the ratio is the target).
        "ratio ≥ 0.3",
        ratio >= 0.3,
        params={"concurrency": 2, "batch_size": 500, "publisher": "events.publish.enqueue_batches"},
    )


def _shuffled(events: list[Any], batch_size: int, broker_url: str) -> None:
    """One-event messages numbered in publish order, then sent with each instance's messages
    shuffled (a fixed seed): most events arrive ahead of a gap, park, and drain."""
    import random

    from events import event_to_payload
    from events.publish import TASK_APPLY_BATCH

    epoch = 1
    counters: dict[str, int] = {}
    messages: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []
    for event in events:
        counters[event.instance_id] = counters.get(event.instance_id, 0) + 1
        sequence = {"epoch": epoch, "numbers": [[event.instance_id, counters[event.instance_id]]]}
        messages.append(([event_to_payload(event)], sequence))
    random.Random(20261202).shuffle(messages)
    _send(TASK_APPLY_BATCH, [m[0] for m in messages], broker_url, [m[1] for m in messages])


def resequencer(ctx: Context) -> Result:
    """What the resequencer costs: the same events through the same worker, numbered (the
    project's publisher) and not numbered (applied on arrival), in one-event messages and in
    messages of 500; and one-event messages delivered shuffled, so that most of them park."""
    count = ctx.n(10_000, 200)
    lines = data.event_lines(count, prefix="r-")
    figures: dict[str, Any] = {"events": count}
    for label, batch, publisher in (
        ("single_sequenced", 1, _sequenced),
        ("single_unsequenced", 1, _unsequenced),
        ("single_shuffled", 1, _shuffled),
        ("batched_sequenced", 500, _sequenced),
        ("batched_unsequenced", 500, _unsequenced),
    ):
        ctx.log(f"resequencer: {count:,} events, {label} …")
        seconds, url, _ = _run_ledger(ctx, lines, batch, publisher)
        ctx.postgres.drop(url)
        figures[f"{label}_events_per_s"] = round(rate(count, seconds))
    numbered, plain = (figures[f"single_{k}_events_per_s"] for k in ("sequenced", "unsequenced"))
    single_cost = numbered / plain
    figures["batched_ratio"] = round(
        figures["batched_sequenced_events_per_s"] / figures["batched_unsequenced_events_per_s"], 3
    )
    figures["shuffled_ratio"] = round(
        figures["single_shuffled_events_per_s"] / figures["single_sequenced_events_per_s"], 3
    )
    return Result(
        "resequencer",
        "resequencer cost",
        f"{count:,} events: numbered vs not numbered (one-event messages and messages of 500), "
        "and shuffled vs in-order one-event messages: events/s",
        figures,
        {
            "what": "the same events, not numbered (applied on arrival), same worker",
            "events_per_s": figures["single_unsequenced_events_per_s"],
        },
        single_cost,
        "informational (no target): ratio = numbered / not numbered, one-event messages",
        None,
        params={"concurrency": 2, "batch_sizes": [1, 500], "shuffle_seed": 20261202},
    )


class _CpuMeter:
    """CPU seconds (user + system, from ``/proc/PID/stat``) spent between its creation and
    :meth:`spent` by: the worker's process group (main process and pool processes), the
    PostgreSQL backends connected to the run's database, the Redis server, and this process
    (the publisher). Linux only; a party it cannot read counts 0."""

    TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self, worker_pgid: int, database_url: str, redis_client: Any) -> None:
        self.worker_pgid = worker_pgid
        self.database_url = database_url
        self.redis_pid = int(redis_client.info("server").get("process_id", 0))
        self.started = self._sample()

    @classmethod
    def _stat(cls, pid: int) -> tuple[int, float] | None:
        """(process group, CPU seconds) of ``pid``."""
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return int(fields[2]), (int(fields[11]) + int(fields[12])) / cls.TICK

    def _sample(self) -> dict[str, float]:
        worker = 0.0
        for name in os.listdir("/proc"):
            if name.isdigit() and (stat := self._stat(int(name))) and stat[0] == self.worker_pgid:
                worker += stat[1]
        with psycopg.connect(self.database_url) as conn:
            backends = [
                row[0]
                for row in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid()"
                )
            ]
        postgres = {pid: stat[1] for pid in backends if (stat := self._stat(pid))}
        redis_stat = self._stat(self.redis_pid) if self.redis_pid else None
        return {
            "worker": worker,
            "redis": redis_stat[1] if redis_stat else 0.0,
            "publisher": time.process_time(),
            **{f"pg:{pid}": cpu for pid, cpu in postgres.items()},
        }

    def spent(self) -> dict[str, float]:
        now = self._sample()
        before = self.started
        # A backend that connected during the run started from 0; one that left is not seen.
        postgres = sum(v - before.get(k, 0.0) for k, v in now.items() if k.startswith("pg:"))
        return {
            "worker": now["worker"] - before["worker"],
            "postgres": postgres,
            "redis": now["redis"] - before["redis"],
            "publisher": now["publisher"] - before["publisher"],
        }


def scaling(ctx: Context) -> Result:
    """Events/s with 1, 2 and 4 worker processes, in one-event messages and in messages of
    500, and the CPU each party spends per event (the capacity plan's inputs:
    docs/performance.md "Capacity plan")."""
    single_count = ctx.n(5_000, 200)
    batched_count = ctx.n(50_000, 1000)
    figures: dict[str, Any] = {"cores": os.cpu_count()}
    for label, count, batch in (("single", single_count, 1), ("batched", batched_count, 500)):
        lines = data.event_lines(count, prefix=f"x{batch}-")
        for concurrency in (1, 2, 4):
            ctx.log(f"scaling: {count:,} events, {label}, --concurrency {concurrency} …")
            cpu: dict[str, float] = {}
            seconds, url, _ = _run_ledger(ctx, lines, batch, concurrency=concurrency, cpu=cpu)
            ctx.postgres.drop(url)
            figures[f"{label}_{concurrency}"] = {
                "events": count,
                "events_per_s": round(rate(count, seconds)),
                "cpu_us_per_event": {k: round(v / count * 1e6, 1) for k, v in cpu.items()},
            }
    one, four = (figures[f"batched_{c}"]["events_per_s"] for c in (1, 4))
    return Result(
        "scaling",
        "scaling with worker processes",
        f"{single_count:,} one-event and {batched_count:,} batched events with worker "
        "--concurrency 1, 2 and 4: events/s and CPU µs per event of worker, PostgreSQL, Redis "
        "and publisher",
        figures,
        {"what": "the same run with --concurrency 1", "events_per_s": one},
        four / one if one else None,
        "informational (no target): ratio = batched events/s with 4 processes / with 1",
        None,
        params={"concurrency": [1, 2, 4], "batch_sizes": [1, 500]},
    )


CELERY_SCENARIOS = {
    "celery_single": single,
    "celery_batched": batched,
    "resequencer": resequencer,
    "scaling": scaling,
}
if not _pipeline_available():  # pragma: no cover - the pipeline ships with the project
    CELERY_SCENARIOS = {}
