"""Everything at once, for a few minutes (marked ``slow``): two real workers, a publisher, the
HTTP API's ingest and beat run against a private PostgreSQL cluster and a private Redis (AOF,
``appendfsync always``) while a seeded schedule SIGKILLs pool processes, whole workers (then
started again), Redis and the PostgreSQL postmaster (both restarted).

At the end the ledger must equal a single-process ``quota-ledger apply`` of the same events:
the same entries with the same outcome and reasons per event, the same projections up to the
values of service numbers (random by design); ``verify`` and ``rebuild --check`` clean.

Every instance's events travel in one message (a purchase and six requests, the sixth refused
``website_limit_reached``, in messages of 20 instances), so per-instance order is the file's
order whatever the broker does. Subscriptions end in 2035, so beat's sweeps (every 5 s) have
nothing to expire and a reference run at another time decides the same.

The seed is printed and named in every failure; rerun one with ``QUOTA_LEDGER_SOAK_SEED``.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import kombu.exceptions
import pytest
from sqlalchemy import create_engine, text

from events.publish import close_producer, publish_many
from tests.helpers import free_port, wait_until
from tests.helpers.faults import (
    alive,
    audit_clean,
    check_engine,
    child_pids,
    kill_group,
    settled_count,
    workload,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.redis]

PER_INSTANCE = 7  # a purchase and six requests
MESSAGE = 20 * PER_INSTANCE
KINDS = ("pool_process", "worker", "redis", "postgres")
_NUMBER = re.compile(r"ICP-[0-9A-F]{24}")


def _entries(engine: Any) -> dict[str, tuple[str, str, str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT event_id, instance_id, type, outcome, reasons FROM ledger_entries")
        ).all()
    return {r[0]: (r[1], r[2], r[3], _json(r[4])) for r in rows}


def _json(value: Any) -> str:
    """A JSON column as canonical text (SQLite hands ``text()`` queries the stored string,
    psycopg the decoded value)."""
    return json.dumps(json.loads(value) if isinstance(value, str) else value, sort_keys=True)


def _mask_numbers(state_text: str) -> str:
    names: dict[str, str] = {}
    return _NUMBER.sub(lambda m: names.setdefault(m.group(), f"SN#{len(names)}"), state_text)


def _projections(engine: Any) -> dict[str, str]:
    """Each instance's folded state, its service numbers replaced by their order of appearance
    and without its chain head hash (which covers the numbers)."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT instance_id, status, entries, state FROM instances")).all()
    out = {}
    for instance_id, status, entries, state in rows:
        folded = json.loads(state) if isinstance(state, str) else dict(state)
        folded.pop("head_hash", None)
        out[instance_id] = f"{status}|{entries}|{_mask_numbers(_json(folded))}"
    return out


@pytest.mark.timeout(900)
def test_soak_with_seeded_kills_of_every_component_equals_a_single_process_apply(
    private_pipeline, pg_server, redis_server, tmp_path, figures
) -> None:
    seed = int(os.environ.get("QUOTA_LEDGER_SOAK_SEED") or random.SystemRandom().randrange(2**31))
    print(f"soak seed {seed} (QUOTA_LEDGER_SOAK_SEED={seed} to replay the schedule)")
    try:
        _soak(seed, private_pipeline, pg_server, redis_server, tmp_path, figures)
    except BaseException as exc:
        raise AssertionError(f"soak seed {seed}: {exc!r}") from exc


def _soak(seed, pipe, pg_server, redis_server, tmp_path, figures) -> None:
    rng = random.Random(seed)
    pipe.broker_url = redis_server.url
    pipe.env.update(
        QUOTA_LEDGER_VISIBILITY_TIMEOUT="15",
        QUOTA_LEDGER_RETRY_BACKOFF_MAX="4",
        QUOTA_LEDGER_SWEEP_INTERVAL="5",
    )
    os.environ["QUOTA_LEDGER_VISIBILITY_TIMEOUT"] = "15"  # this process publishes too
    token = secrets.token_urlsafe(24)
    port = free_port()
    # 90 messages from the publisher, 24 from the API: 15,960 events, disjoint instances.
    published = workload("sk", 90 * 20, requests=6, expires_days=3650)
    ingested = workload("sa", 24 * 20, requests=6, expires_days=3650)
    engine = check_engine(pipe.database_url)
    stop = threading.Event()
    progress = {"published": 0, "ingested": 0, "publish_retries": 0, "ingest_retries": 0}
    errors: list[str] = []

    def publisher() -> None:
        try:
            for start in range(0, len(published), MESSAGE):
                while True:
                    try:
                        publish_many(
                            published[start : start + MESSAGE],
                            batch_size=MESSAGE,
                            broker_url=redis_server.url,
                        )
                        break
                    except kombu.exceptions.OperationalError:
                        progress["publish_retries"] += 1
                        time.sleep(0.5)
                progress["published"] += 1
                stop.wait(1.0)
        except Exception as exc:  # reported by the main thread
            errors.append(f"publisher: {exc!r}")

    def ingest() -> None:
        try:
            for start in range(0, len(ingested), MESSAGE):
                body = "".join(json.dumps(e) + "\n" for e in ingested[start : start + MESSAGE])
                deadline = time.monotonic() + 120
                while True:
                    request = urllib.request.Request(
                        f"http://127.0.0.1:{port}/v1/events",
                        data=body.encode(),
                        headers={
                            "Authorization": f"Bearer {token}",
                            "Content-Type": "application/x-ndjson",
                        },
                    )
                    try:
                        with urllib.request.urlopen(request, timeout=30) as answer:
                            reply = json.loads(answer.read())
                        assert reply == {"accepted": MESSAGE, "invalid": [], "invalid_count": 0}, (
                            reply
                        )
                        break
                    except (urllib.error.URLError, TimeoutError, ConnectionError):
                        # 503 broker_unavailable, or the connection refused or cut: retry the
                        # whole request (re-sent events are duplicates; the API says so).
                        if time.monotonic() > deadline:
                            raise
                        progress["ingest_retries"] += 1
                        time.sleep(0.5)
                progress["ingested"] += 1
                stop.wait(4.0)
        except Exception as exc:
            errors.append(f"ingest: {exc!r}")

    workers = {name: pipe.worker(name, concurrency=1) for name in ("worker-a", "worker-b")}
    pipe.start("beat", ["beat", "--loglevel", "INFO"])
    api = pipe.start(
        "api",
        ["serve", "--port", str(port), "--log-level", "warning"],
        env={"QUOTA_LEDGER_API_TOKENS": f"ingest:{token}"},
    )
    wait_until(
        lambda: _ready(port) or api.popen.poll() is not None, 60, "the API to answer /healthz"
    )
    assert api.popen.poll() is None, api.text()[-3000:]

    schedule = list(KINDS) * 3
    rng.shuffle(schedule)
    injected: list[dict[str, Any]] = []
    threads = [threading.Thread(target=f, daemon=True) for f in (publisher, ingest)]
    started = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        for kind in schedule:
            time.sleep(rng.uniform(5, 10))
            at = round(time.monotonic() - started, 1)
            if kind == "pool_process":
                name = rng.choice(sorted(workers))
                pool = child_pids(workers[name].popen.pid)
                if not pool:
                    injected.append({"kind": kind, "at": at, "skipped": "no pool process"})
                    continue
                os.kill(rng.choice(pool), 9)
            elif kind == "worker":
                name = rng.choice(sorted(workers))
                kill_group(workers[name].popen.pid)
                workers[name].popen.wait(10)
                workers[name] = pipe.worker(name + f"-{len(injected)}", concurrency=1)
            elif kind == "redis":
                redis_server.kill()
                time.sleep(1.0)
                redis_server.start()
            else:
                pg_server.kill()
                time.sleep(1.0)
                pg_server.start()
            injected.append({"kind": kind, "at": at})
        for thread in threads:
            thread.join(300)
        assert not errors, errors
        assert progress["published"] == len(published) // MESSAGE, progress
        assert progress["ingested"] == len(ingested) // MESSAGE, progress
        total = len(published) + len(ingested)
        settled_count(engine, redis_server.url, 240)
        run_seconds = time.monotonic() - started
        actual_entries, actual_projections = _entries(engine), _projections(engine)
    finally:
        stop.set()
        engine.dispose()
        close_producer(redis_server.url)
        os.environ.pop("QUOTA_LEDGER_VISIBILITY_TIMEOUT", None)
    for name, proc in workers.items():
        assert alive(proc.popen.pid), f"{name} exited:\n{proc.text()[-3000:]}"
        assert "Unrecoverable error" not in proc.text()

    # The reference: one process applies the same events, in the same order, to SQLite.
    reference_file = tmp_path / "reference.jsonl"
    reference_file.write_text("".join(json.dumps(e) + "\n" for e in published + ingested))
    reference_url = f"sqlite:///{tmp_path / 'reference.db'}"
    done = pipe.cli("--db", reference_url, "apply", str(reference_file), "--json", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = create_engine(reference_url)
    try:
        expected_entries, expected_projections = _entries(reference), _projections(reference)
    finally:
        reference.dispose()

    assert len(actual_entries) == total, (len(actual_entries), total)
    differing = [i for i in expected_entries if actual_entries.get(i) != expected_entries[i]]
    assert not differing, [(i, actual_entries.get(i), expected_entries[i]) for i in differing[:5]]
    assert actual_projections.keys() == expected_projections.keys()
    differing = [
        i for i in expected_projections if actual_projections[i] != expected_projections[i]
    ]
    assert not differing, [(actual_projections[i], expected_projections[i]) for i in differing[:2]]
    report = audit_clean(pipe)
    outcomes: dict[str, int] = {}
    for _, _, outcome, _ in actual_entries.values():
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    figures.update(
        seed=seed,
        events=total,
        faults=injected,
        run_seconds=round(run_seconds, 1),
        outcomes=outcomes,
        **progress,
        entries=len(actual_entries),
        events_lost=total - len(actual_entries),
        verify_ok=report["ok"],
    )


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
            return answer.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
