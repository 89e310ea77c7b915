"""The Celery application of the worker and beat, configured from the one settings object.

Every setting is explained in the README section "Celery settings"; in short: JSON only, late
acknowledgement with requeue on a lost worker process (at-least-once delivery; the ledger is
idempotent by ``event_id``), one reserved message per process, the same visibility timeout
everywhere kombu or Celery read it, named queues and explicit task names, no result backend.

Every process builds its app with :func:`create_app` from settings it resolved (``quota-ledger
worker`` / ``beat`` with ``--db`` / ``--policy`` applied, the embedded demo, tests); importing
this module reads no environment. Only ``celery -A worker.celery_app …`` needs a module-level
``app``: it is built from :func:`ledger.settings.get_settings` on first access (see
:func:`__getattr__`). Tasks live in ``worker.tasks`` and are bound to every app
(``shared_task``); each app carries its :class:`~ledger.settings.Settings` so the tasks know
which database to use.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy.engine import Engine

from events.publish import (
    PUBLISH_RETRY_POLICY,
    QUEUE_EVENTS,
    QUEUE_SWEEP,
    TASK_APPLY_BATCH,
    TASK_APPLY_EVENT,
    TASK_SWEEP,
    broker_transport_options,
    json_only_settings,
    task_queues,
)
from ledger.policy import Policy
from ledger.settings import Settings, get_settings
from worker.webhooks import TASK_DELIVER_WEBHOOKS

__all__ = ["SWEEP_ENTRY", "LedgerCelery", "celery_config", "create_app"]

#: The beat schedule entry of the expiry sweep.
SWEEP_ENTRY = "quota-ledger-expiry-sweep"
#: The beat schedule entry of the webhook deliveries (docs/changes.md).
WEBHOOKS_ENTRY = "quota-ledger-webhooks"


class LedgerCelery(Celery):
    """A Celery app that knows the ledger settings its tasks use. ``ledger_policy`` and
    ``ledger_engine`` override ``ledger_settings.policy_file`` / ``database_url`` (the embedded
    demo passes the policy and engine it already has; the app never disposes that engine)."""

    ledger_settings: Settings
    ledger_policy: Policy | None = None
    ledger_engine: Engine | None = None


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings`` (docs/operations.md "Celery settings")."""
    visibility = settings.visibility_timeout
    return {
        "broker_url": settings.broker_url,
        # kombu's Redis transport with the repair of worker/transport.py (a worker survives a
        # Redis restart under in-flight messages); other brokers keep their own transport.
        "broker_transport": (
            "worker.transport:Transport"
            if settings.broker_url.startswith(("redis://", "rediss://"))
            else None
        ),
        # Publishers never wait for results; outcomes are in the ledger (and the task's return
        # value is logged). No backend means no Redis keys per task and nothing to expire.
        "result_backend": None,
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        # JSON, and only JSON, in both directions: a pickle message is refused unread.
        **json_only_settings(),
        # At-least-once: ack after the task ran; a pool process that dies mid-task gets its
        # message requeued (worker/tasks.py counts deliveries so a poison message cannot loop).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": settings.prefetch_multiplier,
        # A message the worker cannot run (undecodable body, unknown task, odd headers) is
        # dead-lettered instead of dropped or stopping the worker (worker/consumer.py).
        "worker_consumer": "worker.consumer:Consumer",
        # The broker connection dropped under a running late-ack task: its ack cannot be sent
        # any more, so cancel it and let the redelivery run it (the ledger makes that a no-op
        # or a clean re-run) instead of finishing work whose ack would be lost anyway.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Warm shutdown (SIGTERM) waits for running tasks; a cold one (SIGQUIT) still lets
        # them run for up to 10 s before cancelling them, and unacknowledged messages are
        # requeued at shutdown either way instead of waiting out the visibility timeout.
        "worker_soft_shutdown_timeout": 10.0,
        # The visibility timeout, everywhere it is read (Celery docs, Redis caveats: "required
        # to set all of them"); the shortest value among all clients of one Redis wins, so the
        # publishers use the same variable.
        "visibility_timeout": visibility,
        "broker_transport_options": {
            **broker_transport_options(visibility),
            # kombu looks for messages whose visibility timeout ran out (taken by a worker that
            # died, or in flight when Redis restarted) only every interval × throttle seconds,
            # 10 × 10 by default: up to 100 s more. Look every unacked_restore_interval seconds
            # instead (a ZRANGE under a Redis mutex per worker), so they come back within that.
            "unacked_restore_interval": settings.unacked_restore_interval,
            # The mutex of that scan expires after unacked_mutex_expire seconds, not kombu's
            # 300: a worker killed while holding it no longer blocks every other worker's scan
            # for five minutes (docs/reliability.md, tests/faults/test_worker_kills.py).
            "unacked_mutex_expire": settings.unacked_mutex_expire,
            "unacked_restore_throttle": 1,
        },
        "result_backend_transport_options": {"visibility_timeout": visibility},
        # Survive broker restarts of any length, at start-up too.
        "broker_connection_retry": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "task_publish_retry": True,
        "task_publish_retry_policy": dict(PUBLISH_RETRY_POLICY),
        # Named queues and routes; nothing ever goes to Celery's default "celery" queue.
        "task_queues": task_queues(),
        "task_default_queue": QUEUE_EVENTS,
        "task_routes": {
            TASK_APPLY_BATCH: {"queue": QUEUE_EVENTS, "routing_key": QUEUE_EVENTS},
            TASK_APPLY_EVENT: {"queue": QUEUE_EVENTS, "routing_key": QUEUE_EVENTS},
            TASK_SWEEP: {"queue": QUEUE_SWEEP, "routing_key": QUEUE_SWEEP},
            TASK_DELIVER_WEBHOOKS: {"queue": QUEUE_SWEEP, "routing_key": QUEUE_SWEEP},
        },
        # Beat: the expiry sweep every QUOTA_LEDGER_SWEEP_INTERVAL seconds. A sweep not started
        # within one interval (no worker up) expires instead of piling up.
        "beat_schedule": {
            SWEEP_ENTRY: {
                "task": TASK_SWEEP,
                "schedule": settings.sweep_interval,
                "options": {
                    "queue": QUEUE_SWEEP,
                    "routing_key": QUEUE_SWEEP,
                    "expires": settings.sweep_interval,
                },
            },
            # Webhook deliveries (docs/changes.md), on the sweep's queue: periodic work.
            WEBHOOKS_ENTRY: {
                "task": TASK_DELIVER_WEBHOOKS,
                "schedule": settings.webhook_interval,
                "options": {
                    "queue": QUEUE_SWEEP,
                    "routing_key": QUEUE_SWEEP,
                    "expires": settings.webhook_interval,
                },
            },
        },
        "beat_max_loop_interval": min(settings.sweep_interval, 60.0),
        "timezone": "UTC",
        "enable_utc": True,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
    }


def beat_schedule_path(settings: Settings) -> Path:
    """Where beat keeps its schedule: the configured file, or one in a new temporary dir."""
    if settings.beat_schedule_file is not None:
        return settings.beat_schedule_file
    return Path(tempfile.mkdtemp(prefix="quota-ledger-beat-")) / "schedule"


def create_app(
    settings: Settings | None = None,
    *,
    policy: Policy | None = None,
    engine: Engine | None = None,
) -> LedgerCelery:
    """A configured app whose tasks use ``settings`` (default: the environment's)."""
    settings = settings or get_settings()
    celery = LedgerCelery(
        "quota_ledger", include=["worker.tasks", "worker.gaps"], set_as_current=False
    )
    celery.ledger_settings = settings
    celery.ledger_policy = policy
    celery.ledger_engine = engine
    celery.conf.update(celery_config(settings))
    return celery


def __getattr__(name: str) -> Any:
    """``worker.celery_app.app``, built from the environment's settings on first access.

    Celery's own CLI (``celery -A worker.celery_app worker``) finds an app by reading the
    module's ``app`` attribute, so the module must offer one; building it lazily (PEP 562) keeps
    the import free of side effects: a bad ``QUOTA_LEDGER_*`` variable no longer breaks
    ``import worker.celery_app`` for processes that build their own app, and the settings are
    read when Celery asks, not when the module happens to be imported.
    """
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _app_lock:
        built = globals().get("app")
        if built is None:
            built = create_app()
            globals()["app"] = built  # later lookups find it without calling __getattr__
    return built


_app_lock = threading.Lock()
