"""The Celery tasks run in-process (``Task.apply``) on SQLite: decoding, dead-lettering of bad
elements and bad shapes, message-level failures, transient retries, delivery counting; and the
Celery configuration itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import select
from sqlmodel import Session

from events import BaseEvent
from events.publish import (
    DEFAULT_VISIBILITY_TIMEOUT,
    QUEUE_EVENTS,
    QUEUE_SWEEP,
    TASK_APPLY_BATCH,
    TASK_APPLY_EVENT,
    TASK_SWEEP,
)
from ledger.db import make_engine
from ledger.service import Ledger
from ledger.settings import Settings
from ledger.tables import DeadLetter, LedgerEntry
from tests.support import Events
from worker import tasks
from worker.celery_app import SWEEP_ENTRY, celery_config, create_app
from worker.deliveries import KEY_PREFIX, RedisDeliveryCounter
from worker.embedded import fake_redis_server

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def app(sqlite_url: str) -> Iterator[Any]:
    settings = Settings(
        database_url=sqlite_url, broker_url="memory://", max_retries=2, max_deliveries=2
    )
    celery = create_app(settings)
    import worker.tasks  # noqa: F401  (registers the shared tasks)

    yield celery
    tasks.dispose_runtimes()


def _run(app: Any, name: str, *args: Any, task_id: str = "task-1", **kwargs: Any) -> Any:
    return app.tasks[name].apply(args=list(args), kwargs=kwargs, task_id=task_id)


def _spy_on_retries(app: Any, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments of every ``apply_batch.retry`` call, in order."""
    task = app.tasks[TASK_APPLY_BATCH]
    asked: list[dict[str, Any]] = []
    real_retry = task.retry

    def spy_retry(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs)
        return real_retry(*args, **kwargs)

    monkeypatch.setattr(task, "retry", spy_retry)
    return asked


def _dead_letters(url: str) -> list[DeadLetter]:
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            return list(session.execute(select(DeadLetter).order_by(DeadLetter.id)).scalars())
    finally:
        engine.dispose()


def _entries(url: str) -> list[str]:
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            return list(session.execute(select(LedgerEntry.event_id)).scalars())
    finally:
        engine.dispose()


def test_batch_of_objects_and_strings_with_a_malformed_element(app, sqlite_url) -> None:
    factory = Events("b")
    purchase, request = factory.purchase("i-1"), factory.request("i-1")
    result = _run(app, TASK_APPLY_BATCH, [purchase, json.dumps(request), "{not json", {"x": 1}])
    assert result.successful()
    outcomes = [(r["event_id"], r["outcome"]) for r in result.get()]
    assert outcomes == [
        ("b-1", "applied"),
        ("b-2", "applied"),
        (None, "invalid"),
        (None, "invalid"),
    ]
    assert result.get()[1]["service_number"].startswith("ICP-")
    letters = _dead_letters(sqlite_url)
    assert [(d.code, d.raw) for d in letters] == [
        ("invalid_event", "{not json"),
        ("invalid_event", '{"x":1}'),
    ]
    assert sorted(_entries(sqlite_url)) == ["b-1", "b-2"]


def test_apply_event_takes_one_event(app, sqlite_url) -> None:
    event = Events("one").purchase("i-one")
    result = _run(app, TASK_APPLY_EVENT, event)
    assert [r["outcome"] for r in result.get()] == ["applied"]
    again = _run(app, TASK_APPLY_EVENT, event=json.dumps(event), task_id="task-2")
    assert [r["outcome"] for r in again.get()] == ["duplicate"]


@pytest.mark.parametrize(
    ("args", "kwargs", "raw", "error_part"),
    [
        ([{"events": []}], {}, '{"events":[]}', "expects a JSON array"),
        (["[]"], {}, '"[]"', "expects a JSON array"),
        ([[], []], {}, '{"args":[[],[]],"kwargs":{}}', "exactly one argument"),
        ([], {"evts": []}, '{"args":[],"kwargs":{"evts":[]}}', "exactly one argument"),
        ([[[1, 2]]], {}, "[1,2]", "element 0: expected an event as a JSON object or a JSON string"),
        ([[7]], {}, "7", "got a number"),
    ],
)
def test_wrong_shapes_are_dead_lettered_not_retried(
    app, sqlite_url, args, kwargs, raw, error_part
) -> None:
    result = app.tasks[TASK_APPLY_BATCH].apply(args=args, kwargs=kwargs, task_id="shape")
    assert result.successful(), result.traceback
    (outcome,) = result.get()
    assert outcome["outcome"] == "invalid" and outcome["reasons"] == ["invalid_event"]
    (letter,) = _dead_letters(sqlite_url)
    assert letter.raw == raw
    assert error_part in letter.error


def test_empty_batch_is_a_no_op(app) -> None:
    assert _run(app, TASK_APPLY_BATCH, []).get() == []


def test_message_level_failure_dead_letters_every_event_as_processing_error(
    app, sqlite_url, monkeypatch
) -> None:
    real_apply = Ledger.apply

    def broken(self, items, *, raws=None, sequence=None):
        if any(isinstance(item, BaseEvent) for item in items):
            raise RuntimeError("projection writer exploded\nSELECT … (a long SQL statement)")
        return real_apply(self, items, raws=raws, sequence=sequence)

    monkeypatch.setattr(Ledger, "apply", broken)
    factory = Events("pe")
    events = [factory.purchase("i-pe"), json.dumps(factory.request("i-pe")), "junk"]
    result = _run(app, TASK_APPLY_BATCH, events)
    assert result.successful()
    assert [r["outcome"] for r in result.get()] == ["invalid"] * 3
    letters = _dead_letters(sqlite_url)
    # The events become processing_error; the element that was invalid anyway keeps its code.
    assert [d.code for d in letters] == ["processing_error", "processing_error", "invalid_event"]
    assert letters[0].error == "RuntimeError: projection writer exploded"
    assert [d.event_id for d in letters] == ["pe-1", "pe-2", None]
    assert letters[1].raw == events[1] and letters[2].raw == "junk"
    assert json.loads(letters[0].raw)["event_id"] == "pe-1"
    assert _entries(sqlite_url) == []


def test_transient_errors_are_retried_then_dead_lettered(app, sqlite_url, monkeypatch) -> None:
    import sqlalchemy.exc

    real_apply = Ledger.apply
    calls = []

    def flaky(self, items, *, raws=None, sequence=None):
        if any(isinstance(item, BaseEvent) for item in items):
            calls.append(1)
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionError("db gone"))
        return real_apply(self, items, raws=raws, sequence=sequence)

    monkeypatch.setattr(Ledger, "apply", flaky)
    retries_asked = _spy_on_retries(app, monkeypatch)
    event = Events("tr").purchase("i-tr")
    # Eagerly, Celery runs each retry at once (a worker would wait for the countdown): the
    # first run and max_retries = 2 retries fail, then the last one gives up and dead-letters.
    result = _run(app, TASK_APPLY_BATCH, [event])
    assert result.successful()
    assert calls == [1, 1, 1]
    assert [r["max_retries"] for r in retries_asked] == [2, 2]
    assert all(0 <= r["countdown"] <= 60 for r in retries_asked)
    (letter,) = _dead_letters(sqlite_url)
    assert letter.code == "processing_error"
    assert letter.error.startswith("gave up after 2 retries: ")
    assert "db gone" in letter.error


def test_a_transient_error_before_the_task_starts_is_retried_not_acknowledged(
    app, sqlite_url, monkeypatch
) -> None:
    # A new pool process creates its runtime (and checks the schema) on its first message; the
    # database dropping the connection there must not fail the message (Celery would ack it).
    import sqlalchemy.exc

    real_runtime = tasks._runtime
    failures = [1, 1]

    def flaky(task: Any) -> Any:
        if failures:
            failures.pop()
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionError("reset"))
        return real_runtime(task)

    monkeypatch.setattr(tasks, "_runtime", flaky)
    retries_asked = _spy_on_retries(app, monkeypatch)
    event = Events("rt").purchase("i-rt")
    result = _run(app, TASK_APPLY_BATCH, [event])
    assert result.successful()
    assert [r["outcome"] for r in result.get()] == ["applied"]
    assert [r["max_retries"] for r in retries_asked] == [None, None]
    assert _entries(sqlite_url) == ["rt-1"] and _dead_letters(sqlite_url) == []


def test_a_task_cancelled_by_sigterm_stops_its_process_instead_of_failing(
    app, sqlite_url, monkeypatch
) -> None:
    # Celery cancels a running late-ack task on a lost broker connection with SIGTERM: billiard
    # raises SystemExit in it, which pydantic wraps in an ordinary exception. The message must be
    # left to redelivery: not dead-lettered as processing_error, and not reported as a failure
    # either (Celery acknowledges a failed late-ack task: the message would be lost unapplied).
    # Only a SystemExit leaves the pool process without a result.
    import billiard.common

    def cancelled(self, items, *, raws=None, sequence=None):
        raise ValueError("Error calling function `iso_utc`: SystemExit: -241") from SystemExit(-241)

    monkeypatch.setattr(Ledger, "apply", cancelled)
    monkeypatch.setattr(billiard.common, "terminate_handler_fired", lambda: True)
    with pytest.raises(SystemExit) as stopped:
        _run(app, TASK_APPLY_BATCH, [Events("ct").purchase("i-ct")])
    assert stopped.value.code == -241
    assert isinstance(stopped.value.__cause__, ValueError)
    assert _entries(sqlite_url) == [] and _dead_letters(sqlite_url) == []


def test_a_transient_error_while_the_process_stops_is_a_stop_not_a_retry(
    app, sqlite_url, monkeypatch
) -> None:
    # SIGTERM while the database call was waiting: the driver reports a connection error. A retry
    # would publish a copy and acknowledge the original; the stop leaves the original in flight.
    import billiard.common
    import sqlalchemy.exc

    def interrupted(self, items, *, raws=None, sequence=None):
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionError("interrupted"))

    monkeypatch.setattr(Ledger, "apply", interrupted)
    monkeypatch.setattr(billiard.common, "terminate_handler_fired", lambda: True)
    retries_asked = _spy_on_retries(app, monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        _run(app, TASK_APPLY_BATCH, [Events("ti").purchase("i-ti")])
    assert stopped.value.code is None
    assert retries_asked == []
    assert _entries(sqlite_url) == [] and _dead_letters(sqlite_url) == []


def test_the_same_errors_without_a_stop_are_retried_or_dead_lettered(
    app, sqlite_url, monkeypatch
) -> None:
    # The control of the two tests above: with no terminate handler fired and no SystemExit in
    # the chain, the same errors are the message failing: dead-lettered, or retried.
    import sqlalchemy.exc

    real_apply = Ledger.apply
    errors = [
        sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionError("interrupted")),
        ValueError("Error calling function `iso_utc`: SystemExit: -241"),
    ]

    def failing(self, items, *, raws=None, sequence=None):
        if errors and any(isinstance(item, BaseEvent) for item in items):
            raise errors.pop()
        return real_apply(self, items, raws=raws, sequence=sequence)

    monkeypatch.setattr(Ledger, "apply", failing)
    retries_asked = _spy_on_retries(app, monkeypatch)
    result = _run(app, TASK_APPLY_BATCH, [Events("cf").purchase("i-cf")])
    assert result.successful()
    assert [r["outcome"] for r in result.get()] == ["invalid"]
    assert [d.code for d in _dead_letters(sqlite_url)] == ["processing_error"]
    retried = _run(app, TASK_APPLY_BATCH, [Events("cg").purchase("i-cg")], task_id="task-2")
    assert len(retries_asked) == 1 and retried.successful()
    assert _entries(sqlite_url) == ["cg-1"]


def test_backoff_is_exponential_bounded_and_jittered() -> None:
    settings = Settings(retry_backoff=1, retry_backoff_max=60)
    for retries in range(12):
        for _ in range(20):
            assert 0 <= tasks._backoff(settings, retries) <= min(60, 2**retries)
    assert len({tasks._backoff(settings, 10) for _ in range(50)}) > 1


def test_a_message_that_never_completes_is_dead_lettered_after_max_deliveries(
    app, sqlite_url, monkeypatch
) -> None:
    class Killed(BaseException):
        """Stands for the pool process dying: no except clause of the task sees it."""

    real_apply = Ledger.apply

    def killer(self, items, *, raws=None, sequence=None):
        if any(isinstance(item, BaseEvent) for item in items):
            raise Killed
        return real_apply(self, items, raws=raws, sequence=sequence)

    monkeypatch.setattr(Ledger, "apply", killer)
    event = Events("poison").purchase("i-poison")
    task = app.tasks[TASK_APPLY_BATCH]
    for _ in range(2):  # max_deliveries = 2
        with pytest.raises(Killed):
            task.apply(args=[[event, "junk"]], task_id="poison-1", throw=True)
    result = task.apply(args=[[event, "junk"]], task_id="poison-1")
    assert result.successful()
    letters = _dead_letters(sqlite_url)
    assert [(d.code, d.event_id, d.raw) for d in letters] == [
        ("processing_error", "poison-1", json.dumps(event, separators=(",", ":"), sort_keys=True)),
        ("processing_error", None, "junk"),
    ]
    assert all(d.error == "delivered 3 times without completing" for d in letters)
    # Completed: the count is cleared, the same id starts from one again.
    monkeypatch.setattr(Ledger, "apply", real_apply)
    assert _run(app, TASK_APPLY_BATCH, [event], task_id="poison-1").get()[0]["outcome"] == (
        "applied"
    )


def test_redis_delivery_counter_uses_the_prefix_and_a_ttl() -> None:
    with fake_redis_server() as url:
        counter = RedisDeliveryCounter(url, ttl_seconds=3600)
        client = redis.Redis.from_url(url)
        try:
            assert [counter.increment("abc") for _ in range(3)] == [1, 2, 3]
            assert int(client.get(f"{KEY_PREFIX}abc")) == 3
            assert 0 < client.ttl(f"{KEY_PREFIX}abc") <= 3600
            counter.clear("abc")
            assert client.exists(f"{KEY_PREFIX}abc") == 0
        finally:
            counter.close()
            client.close()
    # An unreachable Redis: counting is skipped, never fatal.
    down = RedisDeliveryCounter("redis://127.0.0.1:1/0", ttl_seconds=60)
    assert down.increment("abc") is None
    down.clear("abc")


def test_sweep_task_on_sqlite(app, sqlite_url) -> None:
    factory = Events("sw")
    _run(app, TASK_APPLY_BATCH, [factory.purchase("i-due", expires=30)]).get()
    report = _run(app, TASK_SWEEP, now="2026-03-01T00:00:00Z", task_id="sweep-1").get()
    assert report == {"as_of": "2026-03-01T00:00:00Z", "expired": 1, "skipped": False}
    again = _run(app, TASK_SWEEP, now="2026-03-01T00:00:00Z", task_id="sweep-2").get()
    assert again["expired"] == 0
    assert "sweep:i-due:20260131T000000Z" in _entries(sqlite_url)


# --- the configuration ------------------------------------------------------------------------


def test_celery_configuration() -> None:
    settings = Settings(visibility_timeout=900, sweep_interval=42, prefetch_multiplier=1)
    conf = celery_config(settings)
    assert conf["task_serializer"] == conf["result_serializer"] == conf["event_serializer"]
    assert conf["task_serializer"] == "json"
    assert conf["accept_content"] == conf["result_accept_content"] == ["json"]
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["visibility_timeout"] == 900
    assert conf["broker_transport_options"]["visibility_timeout"] == 900
    assert conf["result_backend_transport_options"]["visibility_timeout"] == 900
    assert conf["broker_connection_retry_on_startup"] is True
    assert conf["broker_connection_retry"] is True
    assert conf["task_ignore_result"] is True
    assert {q.name for q in conf["task_queues"]} == {QUEUE_EVENTS, QUEUE_SWEEP}
    assert conf["task_routes"][TASK_SWEEP]["queue"] == QUEUE_SWEEP
    assert conf["task_routes"][TASK_APPLY_BATCH]["queue"] == QUEUE_EVENTS
    entry = conf["beat_schedule"][SWEEP_ENTRY]
    assert entry["task"] == TASK_SWEEP and entry["schedule"] == 42
    assert entry["options"]["queue"] == QUEUE_SWEEP
    # A real app: the tasks are registered under their explicit names.
    celery = create_app(settings)
    import worker.tasks  # noqa: F401

    assert {TASK_APPLY_BATCH, TASK_APPLY_EVENT, TASK_SWEEP} <= set(celery.tasks)
    assert celery.conf.accept_content == ["json"]


def test_importing_the_celery_module_reads_no_environment_but_celery_a_finds_an_app() -> None:
    # A fresh interpreter: this one may have built ``worker.celery_app.app`` already.
    script = """
import pydantic
import worker.celery_app as module
assert "app" not in vars(module), "built at import"
try:
    module.app
except pydantic.ValidationError:
    pass
else:
    raise AssertionError("the bad variable was not read on first access")
"""
    env = {**os.environ, "QUOTA_LEDGER_VISIBILITY_TIMEOUT": "not-a-number"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)
    # What ``celery -A worker.celery_app`` does to find the app.
    from celery.app.utils import find_app

    found = find_app("worker.celery_app")
    assert found is find_app("worker.celery_app")
    assert {TASK_APPLY_BATCH, TASK_SWEEP} <= set(found.conf.task_routes)


def test_publisher_and_worker_share_the_visibility_timeout_default() -> None:
    assert Settings().visibility_timeout == DEFAULT_VISIBILITY_TIMEOUT


def test_pickle_messages_are_refused() -> None:
    from kombu.exceptions import ContentDisallowed
    from kombu.serialization import dumps, loads

    content_type, encoding, body = dumps({"x": 1}, serializer="pickle")
    with pytest.raises(ContentDisallowed):
        loads(body, content_type, encoding, accept=create_app().conf.accept_content)


def test_a_decoding_defect_still_dead_letters_the_message(app, sqlite_url, monkeypatch) -> None:
    def broken_decode(*_args: Any) -> Any:
        raise RecursionError("decoder defect")

    monkeypatch.setattr(tasks, "_decode", broken_decode)
    event = Events("dec").purchase("i-dec")
    result = _run(app, TASK_APPLY_BATCH, [event, "text"])
    assert result.successful()
    letters = _dead_letters(sqlite_url)
    assert [(d.code, d.event_id, d.error) for d in letters] == [
        ("processing_error", "dec-1", "RecursionError: decoder defect"),
        ("processing_error", None, "RecursionError: decoder defect"),
    ]
    assert letters[1].raw == "text"


def test_a_message_over_the_batch_cap_is_one_dead_letter(app, sqlite_url) -> None:
    """Issue 12, finding 1 (per message): the wire contract is 1-1000 events a message; a
    bigger one is refused whole as ONE dead letter, and none of its events is applied."""
    from events.publish import MAX_BATCH_SIZE

    factory = Events("cap")
    events = [factory.purchase(f"i-cap-{n}") for n in range(MAX_BATCH_SIZE + 1)]
    result = _run(app, TASK_APPLY_BATCH, events, task_id="oversize")
    assert result.successful(), result.traceback
    (outcome,) = result.get()
    assert outcome["outcome"] == "invalid" and outcome["reasons"] == ["invalid_event"]
    (letter,) = _dead_letters(sqlite_url)
    assert f"more than {MAX_BATCH_SIZE} a message" in letter.error
    assert json.loads(letter.raw) == json.loads(json.dumps(events))  # never dropped
    assert _entries(sqlite_url) == []


def test_restore_figures_default_from_the_visibility_timeout_and_bound_recovery() -> None:
    # The defaults: a scan every min(10, timeout / 5) s, its mutex expiring after one interval.
    default = Settings()
    assert (default.unacked_restore_interval, default.unacked_mutex_expire) == (10, 10)
    assert default.crash_recovery_seconds == default.visibility_timeout + 10
    short = Settings(visibility_timeout=15)
    assert (short.unacked_restore_interval, short.unacked_mutex_expire) == (3, 3)
    options = celery_config(short)["broker_transport_options"]
    assert options["unacked_restore_interval"] == 3
    assert options["unacked_mutex_expire"] == 3  # not kombu's 300
    assert options["unacked_restore_throttle"] == 1
    chosen = Settings(visibility_timeout=60, unacked_restore_interval=5, unacked_mutex_expire=20)
    assert celery_config(chosen)["broker_transport_options"]["unacked_mutex_expire"] == 20
    # A mutex (or interval) longer than the visibility timeout would stretch recovery past it.
    with pytest.raises(ValueError, match="unacked_mutex_expire"):
        Settings(visibility_timeout=15, unacked_mutex_expire=300)
    with pytest.raises(ValueError, match="unacked_restore_interval"):
        Settings(visibility_timeout=15, unacked_restore_interval=16)
