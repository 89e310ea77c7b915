"""Celery tasks: decode the message, call :class:`ledger.service.Ledger`, return the outcomes.

Thin on purpose: no rule lives here. ``apply_batch`` hands the whole message to
``Ledger.apply`` (one transaction; instances locked in sorted order; entries bulk-inserted).

Failure handling (docs/architecture.md):

* a malformed element (not JSON, not an object, invalid event) is dead-lettered by the ledger
  like any invalid line, and the rest of the message is applied;
* a message of the wrong shape (not one JSON array, more than ``MAX_BATCH_SIZE`` events, an
  element that is neither an object nor a string) is dead-lettered whole as ``invalid_event``,
  raw = the JSON of what arrived;
* a transient database or broker error is retried by Celery with exponential backoff and full
  jitter (``max_retries``, ``retry_backoff``, ``retry_backoff_max``);
* any other exception — or a transient one that outlived the retries — dead-letters every
  event of the message as ``processing_error`` with the error text, and the message is acked;
* a message started more than ``max_deliveries`` times without completing (it kills its
  worker process) is dead-lettered as ``processing_error`` without being decoded again;
* a task whose process is being stopped (Celery cancels running late-ack tasks with SIGTERM when
  the broker connection drops) leaves as a ``SystemExit``, however a library wrapped it, never
  as a failure: Celery acknowledges a failed task, and the message would be lost unapplied
  (``_stopping_as_a_stop``);
* a retry whose copy cannot be published requeues the message instead of letting Celery
  acknowledge it (``_retry``).

One engine per worker process: created on first use (so after the prefork fork), forgotten
without closing in ``worker_process_init`` (a forked child must not touch the parent's
connections) and disposed in ``worker_process_shutdown``.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import kombu.exceptions
import redis.exceptions
from celery import Task, shared_task
from celery.exceptions import Reject, Retry
from celery.signals import worker_process_init, worker_process_shutdown
from celery.utils.time import get_exponential_backoff_interval
from sqlalchemy.engine import Engine

from events import (
    BaseEvent,
    Event,
    EventRejection,
    canonical_json,
    canonical_payload,
    is_valid_event_id,
    iso_utc,
    parse_event,
    parse_event_obj,
    parse_iso_utc,
)
from events.problems import json_type
from events.publish import MAX_BATCH_SIZE, TASK_APPLY_BATCH, TASK_APPLY_EVENT, TASK_SWEEP
from ledger.changefeed import current_position
from ledger.clock import utcnow
from ledger.db import (
    ensure_schema,
    error_line,
    exception_chain,
    is_transient_error,
)
from ledger.policy import Policy
from ledger.resequencer import SequenceError, Tag, parse_sequence
from ledger.results import ApplyResult
from ledger.service import Ledger
from ledger.settings import Settings, get_settings
from ledger.store import sweep_lock
from ledger.store.webhooks import list_endpoints
from worker import bootstrap
from worker.deliveries import DeliveryCounter, delivery_counter
from worker.metrics import (
    record_apply,
    record_gaps_skipped,
    record_released,
    record_sweep,
    record_webhooks,
)
from worker.transport import TASK_DEAD_LETTER
from worker.webhooks import TASK_DELIVER_WEBHOOKS, DeliveryPolicy, deliver_due

log = logging.getLogger(__name__)

__all__ = [
    "apply_batch",
    "apply_event",
    "dead_letter",
    "dispose_runtimes",
    "sweep",
]

#: Longest error text kept in a dead letter for a message-level failure.
_MAX_ERROR_CHARS = 1000

Parsed = Event | EventRejection
_Result = TypeVar("_Result")


# --- the per-process runtime ---------------------------------------------------------------------


@dataclass
class _Runtime:
    settings: Settings
    engine: Engine
    ledger: Ledger
    deliveries: DeliveryCounter
    owns_engine: bool = True
    closed: bool = field(default=False)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.owns_engine:
                self.engine.dispose()
            self.deliveries.close()


_runtimes: dict[tuple[Any, ...], _Runtime] = {}
_runtimes_lock = threading.Lock()


def _settings_of(app: Any) -> Settings:
    return getattr(app, "ledger_settings", None) or get_settings()


def _runtime(task: Task) -> _Runtime:
    return runtime_for(task.app)


def runtime_for(app: Any) -> _Runtime:
    """This process's engine, ledger and delivery counter for ``app`` (created on first use,
    from the app's settings through ``worker.bootstrap``)."""
    settings = _settings_of(app)
    policy: Policy | None = getattr(app, "ledger_policy", None)
    given: Engine | None = getattr(app, "ledger_engine", None)
    key = (settings.database_url, settings.broker_url, str(settings.policy_file))
    key += (id(policy), id(given))
    with _runtimes_lock:
        runtime = _runtimes.get(key)
        if runtime is None:
            # A worker process applies batches for the rest of its life: tune it once, here,
            # where every pool process (and the main process's gap check) starts.
            bootstrap.tune_for_batches()
            policy = policy if policy is not None else bootstrap.policy_of(settings)
            if given is not None:
                ensure_schema(given)  # one cheap query when `db upgrade` already ran
            engine = given if given is not None else bootstrap.open_engine(settings)
            runtime = _Runtime(
                settings,
                engine,
                bootstrap.build_ledger(
                    settings,
                    engine,
                    policy,
                    on_released=record_released,
                    on_gaps_skipped=record_gaps_skipped,
                ),
                delivery_counter(
                    settings.broker_url,
                    visibility_timeout=settings.visibility_timeout,
                    max_deliveries=settings.max_deliveries,
                ),
                owns_engine=given is None,
            )
            _runtimes[key] = runtime
    return runtime


@worker_process_init.connect
def _forget_inherited_runtimes(**_: Any) -> None:
    # A prefork child inherits the parent's pools: drop them without closing the parent's
    # sockets (SQLAlchemy's documented recipe for forked processes).
    with _runtimes_lock:
        for runtime in _runtimes.values():
            if runtime.owns_engine:
                runtime.engine.dispose(close=False)
        _runtimes.clear()


@worker_process_shutdown.connect
def _dispose_on_shutdown(**_: Any) -> None:
    dispose_runtimes()


def dispose_runtimes() -> None:
    """Dispose every engine and Redis client this process opened for tasks."""
    with _runtimes_lock:
        for runtime in _runtimes.values():
            runtime.close()
        _runtimes.clear()


# --- decoding ------------------------------------------------------------------------------------


@dataclass
class _Message:
    """What one message holds: per element its parse, raw text, type and publish number."""

    items: list[Parsed]
    raws: list[str | None]
    types: list[str | None]
    # SPEC §9: one tag (or None) per element; None when the message carries no sequence.
    sequence: list[Tag | None] | None = None


def _arrived_json(value: Any) -> str:
    try:
        return canonical_json(value)
    except (TypeError, ValueError, RecursionError):
        return repr(value)


def _shape_error(message: str, arrived: Any) -> _Message:
    rejection = EventRejection("invalid_event", message, None, _arrived_json(arrived))
    return _Message([rejection], [None], [None])


def _element_type(element: Any) -> str | None:
    value = element.get("type") if isinstance(element, dict) else None
    return value if isinstance(value, str) and len(value) <= 64 else None


def _split_sequence(kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The task's keyword arguments without ``sequence``, and the sequence (None if absent)."""
    if "sequence" not in kwargs:
        return kwargs, None
    rest = dict(kwargs)
    return rest, rest.pop("sequence")


def _decode(kind: str, args: Sequence[Any], kwargs: dict[str, Any]) -> _Message:
    """Never raises: whatever arrived becomes events and/or rejections."""
    arrived = {"args": list(args), "kwargs": kwargs}
    kwargs, sequence = _split_sequence(kwargs)
    name = "events" if kind == TASK_APPLY_BATCH else "event"
    if len(args) == 1 and not kwargs:
        value = args[0]
    elif not args and set(kwargs) == {name}:
        value = kwargs[name]
    else:
        return _shape_error(
            f"{kind} takes exactly one argument ({name}); got {_describe(arrived)}", arrived
        )
    if kind == TASK_APPLY_BATCH:
        if not isinstance(value, list):
            return _shape_error(
                f"{kind} expects a JSON array of events, got {_json_type(value)}", value
            )
        if len(value) > MAX_BATCH_SIZE:
            # The wire contract is 1-1000 events a message; a bigger one (a foreign publisher's
            # bug or abuse) is ONE dead letter, not one parse and one row per element.
            return _shape_error(
                f"{kind} carries {len(value)} events, more than {MAX_BATCH_SIZE} a message: "
                "refused whole; publish smaller messages",
                value,
            )
        elements = value
    else:
        elements = [value]
    message = _Message([], [], [])
    for index, element in enumerate(elements):
        where = f"element {index}: " if kind == TASK_APPLY_BATCH else ""
        if isinstance(element, str):
            item = parse_event(element)
            raw: str | None = element
            etype = item.type if isinstance(item, BaseEvent) else _type_in_text(element)
        elif isinstance(element, dict):
            item = parse_event_obj(element)
            raw = None
            etype = _element_type(element)
        else:
            item = EventRejection(
                "invalid_event",
                f"{where}expected an event as a JSON object or a JSON string, "
                f"got {_json_type(element)}",
                None,
                _arrived_json(element),
            )
            raw = None
            etype = None
        message.items.append(item)
        message.raws.append(raw)
        message.types.append(etype)
    if sequence is not None:
        try:
            message.sequence = parse_sequence(sequence, len(elements))
        except SequenceError as exc:
            return _shape_error(f"{kind}: {exc}", arrived)
    return message


def _type_in_text(text_: str) -> str | None:
    try:
        return _element_type(json.loads(text_))
    except (ValueError, RecursionError):
        return None


def _json_type(value: Any) -> str:
    """``json_type`` with its article: "a number", "an array"; "null" stays bare."""
    name = json_type(value)
    if name not in ("boolean", "number", "string", "array", "object"):
        return name
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _describe(arrived: dict[str, Any]) -> str:
    keys = ", ".join(sorted(str(k) for k in arrived["kwargs"])) or "none"
    return f"{len(arrived['args'])} positional argument(s) and keyword(s): {keys}"


def _raw_elements(
    kind: str, args: Sequence[Any], kwargs: dict[str, Any]
) -> list[tuple[str | None, str]]:
    """``(event_id, raw)`` per element, without parsing anything (for poison messages)."""
    arrived = {"args": list(args), "kwargs": kwargs}
    kwargs, _ = _split_sequence(kwargs)
    name = "events" if kind == TASK_APPLY_BATCH else "event"
    if len(args) == 1 and not kwargs:
        value = args[0]
    elif not args and set(kwargs) == {name}:
        value = kwargs[name]
    else:
        return [(None, _arrived_json(arrived))]
    elements = value if kind == TASK_APPLY_BATCH and isinstance(value, list) else [value]
    out: list[tuple[str | None, str]] = []
    for element in elements:
        event_id = element.get("event_id") if isinstance(element, dict) else None
        raw = element if isinstance(element, str) else _arrived_json(element)
        out.append((event_id if is_valid_event_id(event_id) else None, raw))
    return out


# --- the tasks -----------------------------------------------------------------------------------


def _is_transient(exc: BaseException) -> bool:
    return is_transient_error(exc) or isinstance(
        exc,
        kombu.exceptions.OperationalError
        | redis.exceptions.ConnectionError
        | redis.exceptions.TimeoutError,
    )


def _error_text(exc: BaseException) -> str:
    name, line = type(exc).__name__, error_line(exc)
    return (name if line == name else f"{name}: {line}")[:_MAX_ERROR_CHARS]


def _refusals(message: _Message, error: str) -> list[Parsed]:
    """A whole message refused: its events become ``processing_error`` dead letters carrying
    the text that arrived; elements that were invalid anyway keep their own code."""
    out: list[Parsed] = []
    for item, raw in zip(message.items, message.raws, strict=True):
        if isinstance(item, EventRejection):
            out.append(item)
        else:
            text_ = raw if raw is not None else canonical_payload(item)
            out.append(_processing_error(error, item.event_id, text_))
    return out


def _undecoded(elements: list[tuple[str | None, str]], error: str) -> list[Parsed]:
    return [_processing_error(error, event_id, raw) for event_id, raw in elements]


def _processing_error(error: str, event_id: str | None, raw: str) -> EventRejection:
    # The ledger stores any EventRejection as a dead letter; its code is ours to choose here.
    return EventRejection("processing_error", error, event_id, raw)  # type: ignore[arg-type]


def _backoff(settings: Settings, retries: int) -> float:
    return get_exponential_backoff_interval(
        factor=settings.retry_backoff,
        retries=retries,
        maximum=settings.retry_backoff_max,
        full_jitter=True,
    )


def _tags_of(kwargs: dict[str, Any], elements: int) -> list[Tag | None] | None:
    """The message's sequence for a refusal of ``elements`` items, if it fits them (a message
    refused whole fills every number its sequence names, SPEC §9)."""
    _, sequence = _split_sequence(kwargs)
    try:
        return parse_sequence(sequence, elements) if sequence is not None else None
    except SequenceError:
        return None


def _dead_letter_or_retry(
    task: Task,
    runtime: _Runtime,
    refusals: list[Parsed],
    types: list[str | None],
    sequence: list[Tag | None] | None = None,
) -> list[dict]:
    """Store ``refusals`` (filling their publish numbers) and complete the message. If even that
    fails on a transient error (the database is down for longer than the retries), keep the
    message alive with a retry every ``retry_backoff_max`` seconds rather than lose it."""
    try:
        results = runtime.ledger.apply(refusals, sequence=sequence)
    except Exception as exc:
        if not _is_transient(exc):
            raise
        runtime.deliveries.clear(task.request.id or "")
        countdown = runtime.settings.retry_backoff_max
        raise _retry(task, exc, countdown=countdown, max_retries=None) from exc
    record_apply(results, types=types, seconds=0.0)
    return [r.to_json() for r in results]


def _retry(task: Task, exc: Exception, *, countdown: float, max_retries: int | None) -> Retry:
    """``task.retry``: Celery publishes a copy of the message due in ``countdown`` seconds, raises
    ``Retry``, and acknowledges the original. If the copy cannot be published (the broker is down
    for longer than the publish retries), Celery raises ``Reject(requeue=False)`` instead, and
    the original is acknowledged all the same: nothing would be left of the message. Here it is
    rejected *with* requeue — back on its queue once the broker answers, or, if the reject
    cannot reach the broker either, handed out again after the visibility timeout."""
    try:
        return task.retry(exc=exc, countdown=countdown, max_retries=max_retries)
    except Reject as rejected:
        if rejected.requeue:
            raise
        log.warning(
            "%s[%s]: the retry could not be published (%s); requeueing the message",
            *(task.name, task.request.id, _error_text(exc)),
        )
        raise Reject(rejected.reason, requeue=True) from exc


def _terminating(exc: BaseException) -> bool:
    """True when ``exc`` is this process being stopped, not the message failing: billiard's
    terminate handler fired (Celery cancels a running late-ack task on a lost broker connection
    with SIGTERM, which raises SystemExit in the task), or a SystemExit/KeyboardInterrupt sits in
    the exception's chain. Libraries may wrap it in an ordinary exception — pydantic does, as
    ``PydanticSerializationError: Error calling function `iso_utc`: SystemExit: -241``. Such an
    error must neither be dead-lettered (a whole message of valid events as
    ``processing_error``) nor reach Celery as an ordinary failure (Celery acknowledges a failed
    late-ack task, and the message is lost unapplied): :func:`_stopping_as_a_stop` turns it
    back into the process stopping."""
    try:
        from billiard.common import terminate_handler_fired
    except ImportError:  # pragma: no cover - billiard ships with Celery
        fired = False
    else:
        fired = bool(terminate_handler_fired())
    stopping = any(not isinstance(cause, Exception) for cause in exception_chain(exc))
    return stopping or fired


def _stop_instead_of(exc: Exception) -> BaseException:
    """What to raise instead of ``exc`` when :func:`_terminating` says the process is being
    stopped: the SystemExit (or KeyboardInterrupt) it wraps, as a fresh exception, else a
    SystemExit. Not an ``Exception``, so Celery's tracer does not report it as the task's
    failure: billiard lets the process exit without a result (the terminate handler fired) and
    Celery counts the job as terminated or lost, never acknowledged. A request Celery cancelled
    on a lost connection stays unacknowledged and comes back after its visibility timeout; one
    stopped otherwise is rejected and requeued (``task_reject_on_worker_lost``)."""
    stop = next((e for e in exception_chain(exc) if not isinstance(e, Exception)), None)
    if isinstance(stop, KeyboardInterrupt):
        return KeyboardInterrupt()
    return SystemExit(stop.code if isinstance(stop, SystemExit) else None)


def _runtime_or_retry(task: Task) -> _Runtime:
    """The process's runtime. Creating it is the first thing a new pool process does with the
    database (``ensure_schema``); a transient error there (the database restarting, a dropped
    connection) is retried like one in the transaction. Before, it escaped the task, Celery
    acknowledged the failed message and its events were lost (found by
    ``tests/faults/test_network_faults.py``: a connection reset while a new pool process checked
    the schema)."""
    try:
        return _runtime(task)
    except Exception as exc:
        if not _is_transient(exc):
            raise
        countdown = _backoff(_settings_of(task.app), task.request.retries or 0)
        log.warning(
            "%s[%s]: transient error before the task could start, retry in %ss: %s",
            *(task.name, task.request.id, countdown, _error_text(exc)),
        )
        # No limit: nothing was applied, and the message must not be acknowledged unapplied.
        raise _retry(task, exc, countdown=countdown, max_retries=None) from exc


def _run(task: Task, kind: str, args: Sequence[Any], kwargs: dict[str, Any]) -> list[dict]:
    runtime = _runtime_or_retry(task)
    settings = runtime.settings
    task_id = task.request.id or ""
    deliveries = runtime.deliveries.increment(task_id) if task_id else None

    if deliveries is not None and deliveries > settings.max_deliveries:
        # Not decoded again: decoding or applying it is what kept killing the process.
        log.error("%s[%s] delivered %d times without completing", kind, task_id, deliveries)
        error = f"delivered {deliveries} times without completing"
        refusals = _undecoded(_raw_elements(kind, args, kwargs), error)
        outcomes = _dead_letter_or_retry(
            task, runtime, refusals, [None] * len(refusals), _tags_of(kwargs, len(refusals))
        )
        runtime.deliveries.clear(task_id)
        return outcomes

    message: _Message | None = None
    started = time.perf_counter()
    try:
        message = _decode(kind, args, kwargs)
        results: list[ApplyResult] = []
        for start in range(0, len(message.items), MAX_BATCH_SIZE):
            stop = start + MAX_BATCH_SIZE
            results += runtime.ledger.apply(
                message.items[start:stop],
                raws=message.raws[start:stop],
                sequence=message.sequence[start:stop] if message.sequence else None,
            )
    except Retry:
        raise
    except Exception as exc:
        if _terminating(exc):
            raise
        retries = task.request.retries or 0
        error = _error_text(exc)
        if _is_transient(exc):
            if retries < settings.max_retries:
                countdown = _backoff(settings, retries)
                log.warning(
                    "%s[%s]: transient error, retry %d in %ss: %s",
                    *(kind, task_id, retries + 1, countdown, error),
                )
                runtime.deliveries.clear(task_id)
                limit = settings.max_retries
                raise _retry(task, exc, countdown=countdown, max_retries=limit) from exc
            error = f"gave up after {retries} retries: {error}"
        log.exception("%s[%s] failed; dead-lettering its events", kind, task_id)
        if message is None:  # decoding itself failed
            refusals = _undecoded(_raw_elements(kind, args, kwargs), error)
            types: list[str | None] = [None] * len(refusals)
            sequence = _tags_of(kwargs, len(refusals))
        else:
            refusals, types = _refusals(message, error), message.types
            sequence = message.sequence
        outcomes = _dead_letter_or_retry(task, runtime, refusals, types, sequence)
        runtime.deliveries.clear(task_id)
        return outcomes
    record_apply(results, types=message.types, seconds=time.perf_counter() - started)
    if task_id:
        runtime.deliveries.clear(task_id)
    return [r.to_json() for r in results]


def _stopping_as_a_stop(body: Callable[..., _Result]) -> Callable[..., _Result]:
    """A task body whose exceptions, while its process is being stopped (a transient error
    turned into a retry, a wrapped SystemExit), leave as the stop they are
    (:func:`_stop_instead_of`). Reported as an ordinary failure, Celery would acknowledge the
    late-ack message unapplied: found by ``tests/faults/test_broker_restart.py``, where the
    message in flight at a Redis kill was lost that way. Every task of the worker wears it: a
    sweep or a webhook pass cut short is not a failure either."""

    @functools.wraps(body)
    def task_body(self: Task, *args: Any, **kwargs: Any) -> _Result:
        try:
            return body(self, *args, **kwargs)
        except Exception as exc:
            if _terminating(exc):
                raise _stop_instead_of(exc) from exc
            raise

    return task_body


class _DeadLetteringTask(Task):
    """The apply tasks handle whatever their body sees, so a failure that reaches Celery means
    the message could not even be passed to them (a body whose arguments are not a list and an
    object, such as ``{"args": 1}``: Celery's ``fun(*args, **kwargs)`` raises before the task
    runs). Dead-letter what arrived instead of leaving only a log line."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any):
        if _terminating(exc):  # the process is being stopped: the message comes back
            return
        arrived = {"args": args, "kwargs": kwargs}
        error = f"{self.name} could not run: {_error_text(exc)}"
        try:
            _runtime(self).ledger.apply(
                [EventRejection("invalid_event", error, None, _arrived_json(arrived))]
            )
        except Exception:
            log.exception("%s[%s]: could not dead-letter the failed message", self.name, task_id)


@shared_task(bind=True, name=TASK_APPLY_BATCH, base=_DeadLetteringTask)
@_stopping_as_a_stop
def apply_batch(self: Task, *args: Any, **kwargs: Any) -> list[dict]:
    """``apply_batch(events)``: a JSON array of at most 1000 events, each a JSON object or a
    JSON string; applied in one transaction. Returns one ``apply --json`` object per element."""
    return _run(self, TASK_APPLY_BATCH, args, kwargs)


@shared_task(bind=True, name=TASK_APPLY_EVENT, base=_DeadLetteringTask)
@_stopping_as_a_stop
def apply_event(self: Task, *args: Any, **kwargs: Any) -> list[dict]:
    """``apply_event(event)``: one event, a JSON object or a JSON string."""
    return _run(self, TASK_APPLY_EVENT, args, kwargs)


@shared_task(bind=True, name=TASK_DEAD_LETTER, base=_DeadLetteringTask)
@_stopping_as_a_stop
def dead_letter(self: Task, *args: Any, **kwargs: Any) -> list[dict]:
    """``dead_letter(raw, error)``: a message the worker could not read or run (an item that is
    not a kombu message, ``worker/transport.py``; a body that does not decode or a task nobody
    runs, ``worker/consumer.py``), kept in the dead-letter store as ``invalid_event``."""
    runtime = _runtime_or_retry(self)
    if len(args) == 2 and not kwargs and all(isinstance(arg, str) for arg in args):
        raw, error = args
    else:
        arrived = {"args": list(args), "kwargs": kwargs}
        raw = _arrived_json(arrived)
        error = f"{TASK_DEAD_LETTER} takes (raw, error); got {_describe(arrived)}"
    rejection = EventRejection("invalid_event", error[:_MAX_ERROR_CHARS], None, raw)
    return _dead_letter_or_retry(self, runtime, [rejection], [None])


@shared_task(bind=True, name=TASK_DELIVER_WEBHOOKS)
@_stopping_as_a_stop
def deliver_webhooks(self: Task) -> dict[str, Any]:
    """One webhook delivery pass: every due endpoint gets the changes after its cursor, in order
    (``worker.webhooks``). Endpoints are leased, so overlapping passes share the work instead
    of doubling it."""
    runtime = _runtime(self)
    days = runtime.settings.webhook_disable_after_days
    report = deliver_due(runtime.engine, policy=DeliveryPolicy(disable_after=timedelta(days=days)))
    record_webhooks(
        head=current_position(runtime.engine),
        cursors={row["id"]: row["cursor"] for row in list_endpoints(runtime.engine)},
        delivered=report.per_endpoint,
        failures=report.failures,
    )
    if report.endpoints:
        log.info("webhooks: %s", report.to_json())
    return report.to_json()


@shared_task(bind=True, name=TASK_SWEEP)
@_stopping_as_a_stop
def sweep(self: Task, now: str | None = None) -> dict[str, Any]:
    """The expiry sweep as of ``now`` (ISO 8601; default the current time).

    On PostgreSQL it runs under a transaction-scoped advisory lock taken with
    ``pg_try_advisory_xact_lock`` on a dedicated connection: a sweep that finds the lock taken
    (another beat, an overlapping run) returns ``skipped`` at once instead of doing the work
    again. SQLite (one writer at a time anyway) runs without it.
    """
    runtime = _runtime(self)
    when: datetime = parse_iso_utc(now) if now else utcnow()
    report: dict[str, Any] = {"as_of": iso_utc(when), "expired": 0, "skipped": False}
    chunk = runtime.settings.sweep_chunk_size
    with sweep_lock(runtime.engine) as locked:
        if not locked:
            log.info("sweep as of %s skipped: another sweep holds the lock", report["as_of"])
            report["skipped"] = True
            return report
        report["expired"] = runtime.ledger.sweep(now=when, chunk_size=chunk)
    record_sweep(report["expired"])
    log.info("sweep as of %s expired %d instance(s)", report["as_of"], report["expired"])
    return report
