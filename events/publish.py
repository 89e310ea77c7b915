"""Publishing events to the ledger's workers over the Celery queue (the client side only).

Upstream systems call :func:`publish` / :func:`publish_many`; the HTTP API, which validates
bodies itself, calls :func:`enqueue_batches`. Every message is a ``quota_ledger.apply_batch``
task carrying a JSON array of canonical event payloads (dicts), sent by task name to the
``quota_ledger.events`` queue, serialised as JSON (never pickle).

This module knows nothing of the worker, the ledger or SQL: it needs only ``celery``/``kombu``
and the ``events`` models, so any service can publish with the project installed as a library.
Configuration comes from the environment: ``QUOTA_LEDGER_BROKER_URL`` (default
``redis://127.0.0.1:6379/0``) unless ``broker_url=`` is given, and
``QUOTA_LEDGER_VISIBILITY_TIMEOUT`` (kombu uses the shortest visibility timeout of all the
clients of one Redis, so publishers must not fall back to another value than the workers).

Broker outages: a publisher keeps trying to connect for :data:`PUBLISH_CONNECT_SECONDS`
(20 s; waits of 0, 0.5, 1, … capped at 3 s) and each message is sent with kombu's retry policy
:data:`PUBLISH_RETRY_POLICY` (10 retries, the same waits, about 20 s); then
``kombu.exceptions.OperationalError`` is raised. Messages sent before the failure stay sent;
publishing the same events again is safe because the ledger treats a repeated ``event_id`` with
the same content as a ``duplicate``.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import kombu.exceptions
import redis
from celery import Celery
from kombu.entity import Exchange, Queue
from kombu.serialization import dumps

from events.codec import EventRejection, event_to_payload, parse_event, parse_event_obj
from events.models import BaseEvent, Event

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "ENQUEUE_SCRIPT",
    "MAX_BATCH_SIZE",
    "PUBLISH_CONNECT_SECONDS",
    "PUBLISH_RETRY_POLICY",
    "QUEUE_EVENTS",
    "QUEUE_SWEEP",
    "SEQUENCE_KEY",
    "TASK_APPLY_BATCH",
    "TASK_APPLY_EVENT",
    "TASK_SWEEP",
    "InvalidEvents",
    "broker_transport_options",
    "close_producer",
    "enqueue_batches",
    "json_only_settings",
    "producer_app",
    "publish",
    "publish_many",
    "task_queues",
]

# --- the wire contract (docs/events.md "Publishing from other languages") ---------------

TASK_APPLY_BATCH = "quota_ledger.apply_batch"
TASK_APPLY_EVENT = "quota_ledger.apply_event"
TASK_SWEEP = "quota_ledger.sweep"
QUEUE_EVENTS = "quota_ledger.events"
QUEUE_SWEEP = "quota_ledger.sweep"

#: Events per ``apply_batch`` message: the default, and the most a worker applies in one
#: transaction.
DEFAULT_BATCH_SIZE = 500
MAX_BATCH_SIZE = 1000

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
#: Keep equal to ``ledger.settings.Settings.visibility_timeout``'s default (a test checks).
DEFAULT_VISIBILITY_TIMEOUT = 600
BROKER_URL_ENV = "QUOTA_LEDGER_BROKER_URL"
VISIBILITY_TIMEOUT_ENV = "QUOTA_LEDGER_VISIBILITY_TIMEOUT"

#: kombu ``Connection.ensure`` policy for each publish (a connection lost while sending):
#: 10 retries, waits of 0, 0.5, 1, … capped at 3 s — about 20 s.
PUBLISH_RETRY_POLICY: dict[str, float] = {
    "max_retries": 10,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 3,
}
#: Total seconds a publisher keeps trying to (re)connect to an unreachable broker before it
#: raises (kombu's ``connect_retries_timeout``, with the waits of the policy above).
PUBLISH_CONNECT_SECONDS = 20.0


def json_only_settings() -> dict[str, Any]:
    """The serialisation settings every Celery app of the project uses: JSON and only JSON."""
    return {
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
    }


def broker_transport_options(visibility_timeout: int) -> dict[str, Any]:
    """kombu Redis transport options shared by workers, beat and publishers."""
    return {
        "visibility_timeout": int(visibility_timeout),
        # A Redis that vanishes without closing the TCP connection (failover, NAT timeout) must
        # not hang a publish or an ack forever; kombu's BRPOP replies within 1 s, well inside.
        "socket_timeout": 30,
        "socket_connect_timeout": 5,
    }


def task_queues() -> tuple[Queue, Queue]:
    """The two named queues, each on a direct exchange of the same name (Celery's own layout
    for a queue named in ``send_task``)."""
    return (
        Queue(QUEUE_EVENTS, Exchange(QUEUE_EVENTS, type="direct"), routing_key=QUEUE_EVENTS),
        Queue(QUEUE_SWEEP, Exchange(QUEUE_SWEEP, type="direct"), routing_key=QUEUE_SWEEP),
    )


class InvalidEvents(ValueError):
    """Raised by :func:`publish` / :func:`publish_many` before anything is sent.

    ``problems`` lists ``(index, EventRejection)`` for every invalid input, in input order.
    """

    def __init__(self, problems: Sequence[tuple[int, EventRejection]]) -> None:
        self.problems: list[tuple[int, EventRejection]] = list(problems)
        shown = "; ".join(f"#{i}: {r.code}: {r.error}" for i, r in self.problems[:5])
        more = len(self.problems) - 5
        suffix = f"; … and {more} more" if more > 0 else ""
        super().__init__(f"{len(self.problems)} invalid event(s), nothing sent: {shown}{suffix}")


# --- the producer-only Celery app --------------------------------------------------------------

_apps: dict[tuple[str, int], Celery] = {}
_clients: dict[str, Any] = {}  # redis.Redis per broker URL (the sequenced enqueue)
_apps_lock = threading.Lock()


def _broker_url(broker_url: str | None) -> str:
    return broker_url or os.environ.get(BROKER_URL_ENV) or DEFAULT_BROKER_URL


def _visibility_timeout() -> int:
    text = os.environ.get(VISIBILITY_TIMEOUT_ENV)
    if not text:
        return DEFAULT_VISIBILITY_TIMEOUT
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"{VISIBILITY_TIMEOUT_ENV} must be an integer (seconds), got {text!r}"
        ) from None


def producer_app(broker_url: str | None = None) -> Celery:
    """A Celery app that only sends (one per broker URL and process, with its connection pool).

    Not set as the current app, no tasks, no result backend: it sends by task name.
    """
    key = (_broker_url(broker_url), _visibility_timeout())
    with _apps_lock:
        app = _apps.get(key)
        if app is None:
            app = Celery("quota_ledger.publisher", set_as_current=False, fixups=[])
            transport = broker_transport_options(key[1])
            # Connecting (kombu's Connection.default_channel) retries for this long in total;
            # without it a publisher would give up after Celery's 4 s connection timeout.
            transport.update(
                connect_retries_timeout=PUBLISH_CONNECT_SECONDS,
                interval_start=PUBLISH_RETRY_POLICY["interval_start"],
                interval_step=PUBLISH_RETRY_POLICY["interval_step"],
                interval_max=PUBLISH_RETRY_POLICY["interval_max"],
            )
            app.conf.update(
                broker_url=key[0],
                broker_transport_options=transport,
                broker_connection_retry=True,
                broker_connection_retry_on_startup=True,
                task_queues=task_queues(),
                task_default_queue=QUEUE_EVENTS,
                task_ignore_result=True,
                task_publish_retry=True,
                task_publish_retry_policy=dict(PUBLISH_RETRY_POLICY),
                **json_only_settings(),
            )
            _apps[key] = app
    return app


def close_producer(broker_url: str | None = None) -> None:
    """Close and forget the cached producer app(s) of ``broker_url`` (all of them with None)."""
    with _apps_lock:
        keys = [k for k in _apps if broker_url is None or k[0] == broker_url]
        apps = [_apps.pop(k) for k in keys]
        urls = [u for u in _clients if broker_url is None or u == broker_url]
        clients = [_clients.pop(u) for u in urls]
    for app in apps:
        app.close()
    for client in clients:
        client.close()


# --- publishing --------------------------------------------------------------------------------


def _validate(item: object) -> Event | EventRejection:
    if isinstance(item, str | bytes | bytearray):
        return parse_event(item)
    return parse_event_obj(item)


def _validate_all(items: Iterable[object]) -> list[Event]:
    events: list[Event] = []
    problems: list[tuple[int, EventRejection]] = []
    for index, item in enumerate(items):
        result = _validate(item)
        if isinstance(result, EventRejection):
            problems.append((index, result))
        else:
            events.append(result)
    if problems:
        raise InvalidEvents(problems)
    return events


#: The broker-side state of SPEC §9's numbering: one Redis hash holding the epoch (field
#: ``~epoch``, which no instance id can be) and a counter per instance, so that they vanish
#: together.
SEQUENCE_KEY = "quota_ledger.sequence"
_EPOCH_FIELD = "~epoch"

#: The script that numbers a message's elements and enqueues it in one atomic step
#: (``events/enqueue.lua``, shipped for publishers in other languages too).
ENQUEUE_SCRIPT = (Path(__file__).with_name("enqueue.lua")).read_text(encoding="utf-8")


def _message_text(app: Celery, payloads: list[dict[str, Any]]) -> tuple[str, str]:
    """The kombu message of one ``apply_batch`` task, as Redis stores it, cut in two where its
    ``sequence`` keyword argument goes. Celery builds the headers and body (protocol 2); the body
    is kept as UTF-8 JSON text (``body_encoding: utf-8``, which kombu reads as it is) rather
    than base64, so that the script can write the numbers into it."""
    task_id = str(uuid.uuid4())
    marker = uuid.uuid4().hex
    headers, properties, body, _ = app.amqp.as_task_v2(
        task_id,
        TASK_APPLY_BATCH,
        args=[payloads],
        kwargs={"sequence": marker},
        kwargsrepr="{'sequence': ...}",
        ignore_result=True,
    )
    content_type, content_encoding, data = dumps(body, serializer="json")
    envelope = {
        "body": data,
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": headers,
        "properties": {
            **properties,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": QUEUE_EVENTS},
            "priority": 0,
            "body_encoding": "utf-8",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    before, after = json.dumps(envelope).split(json.dumps(json.dumps(marker))[1:-1])
    return before, after


def _redis_client(broker_url: str) -> Any:
    with _apps_lock:
        client = _clients.get(broker_url)
        if client is None:
            options = broker_transport_options(_visibility_timeout())
            client = redis.Redis.from_url(
                broker_url,
                socket_timeout=options["socket_timeout"],
                socket_connect_timeout=options["socket_connect_timeout"],
            )
            _clients[broker_url] = client
    return client


def _run_with_retries(call: Callable[[], Any]) -> Any:
    """``call()``, retried on connection errors with :data:`PUBLISH_RETRY_POLICY`'s waits for
    at most :data:`PUBLISH_CONNECT_SECONDS`; then ``kombu.exceptions.OperationalError``."""
    deadline = time.monotonic() + PUBLISH_CONNECT_SECONDS
    wait = PUBLISH_RETRY_POLICY["interval_start"]
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() + wait > deadline:
                raise kombu.exceptions.OperationalError(
                    f"broker unreachable for {PUBLISH_CONNECT_SECONDS:g} s: {exc}"
                ) from exc
            time.sleep(wait)
            step, cap = PUBLISH_RETRY_POLICY["interval_step"], PUBLISH_RETRY_POLICY["interval_max"]
            wait = min(wait + step, cap)


def enqueue_batches(
    events: Sequence[Event],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    broker_url: str | None = None,
) -> int:
    """Send already-validated events as ``quota_ledger.apply_batch`` messages of at most
    ``batch_size`` (1–1000) events each, in order, each element numbered per instance under the
    broker's epoch (SPEC §9). Returns the number of events sent.

    Raises ``kombu.exceptions.OperationalError`` when the broker stays unreachable for the
    whole retry policy (see the module docstring).
    """
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be from 1 to {MAX_BATCH_SIZE}, got {batch_size}")
    payloads: list[dict[str, Any]] = []
    instance_ids: list[str] = []
    for event in events:
        if not isinstance(event, BaseEvent):
            raise TypeError(
                f"enqueue_batches expects validated event models, got {type(event).__name__} "
                "(use publish_many for dicts or JSON text)"
            )
        payloads.append(event_to_payload(event))
        instance_ids.append(event.instance_id)
    if not payloads:
        return 0
    url = _broker_url(broker_url)
    app = producer_app(url)
    client = _redis_client(url)
    script = client.register_script(ENQUEUE_SCRIPT)
    for start in range(0, len(payloads), batch_size):
        stop = start + batch_size
        before, after = _message_text(app, payloads[start:stop])
        args = [_EPOCH_FIELD, before, after, *instance_ids[start:stop]]
        _run_with_retries(partial(script, keys=[SEQUENCE_KEY, QUEUE_EVENTS], args=args))
    return len(payloads)


def publish_many(
    events: Iterable[object],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    broker_url: str | None = None,
) -> int:
    """Validate every event (dicts, JSON text or event models), then send them in batches.

    Any invalid input raises :class:`InvalidEvents` listing every problem, and nothing is
    sent. Returns the number of events sent.
    """
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be from 1 to {MAX_BATCH_SIZE}, got {batch_size}")
    validated = _validate_all(events)
    return enqueue_batches(validated, batch_size=batch_size, broker_url=broker_url)


def publish(event: object, *, broker_url: str | None = None) -> str:
    """Validate and send one event (as an ``apply_batch`` message of one); returns its
    ``event_id``. Raises :class:`InvalidEvents` (with index 0) if it is invalid."""
    (validated,) = _validate_all([event])
    enqueue_batches([validated], broker_url=broker_url)
    return validated.event_id
