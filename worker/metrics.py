"""Prometheus metrics shared by the worker and the HTTP API (prometheus-client).

Each process keeps its own registry; the API serves it at ``/metrics`` and the worker can serve
it on a port of its own (``QUOTA_LEDGER_METRICS_PORT``). The ledger's pure rules know nothing
of this: the tasks and the API record what the service returned.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram


class _Outcome(Protocol):
    outcome: str
    reasons: tuple[str, ...]


EVENTS = Counter(
    "quota_ledger_events_total",
    "Events answered, by event type and outcome (applied, rejected, stale, duplicate, invalid, "
    "parked).",
    ["type", "outcome"],
)
APPLY_SECONDS = Histogram(
    "quota_ledger_apply_seconds",
    "Time to apply one message (one event or one batch) in one transaction.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH_SIZE = Histogram(
    "quota_ledger_batch_size",
    "Events per applied message.",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
)
DEAD_LETTERS = Counter(
    "quota_ledger_dead_letters_total",
    "Events refused into the dead-letter store, by code.",
    ["code"],
)
QUEUE_DEPTH = Gauge(
    "quota_ledger_queue_depth",
    "Messages waiting in the broker queue, as last measured.",
    ["queue"],
)
# --- the resequencer (SPEC §9) --------------------------------------------------------------------
RELEASED = Counter(
    "quota_ledger_released_total",
    "Parked events applied once their turn came, by outcome.",
    ["outcome"],
)
GAPS_SKIPPED = Counter(
    "quota_ledger_gaps_skipped_total",
    "Gaps in publish numbers skipped (timed out, too many parked, or an epoch ended).",
)
PARKED = Gauge("quota_ledger_parked_events", "Events parked behind a gap, as last measured.")
PARKED_OLDEST_SECONDS = Gauge(
    "quota_ledger_parked_oldest_seconds",
    "Age of the oldest parked event, as last measured (0 when none is parked).",
)

# --- the change feed (docs/changes.md) ------------------------------------------------------------
FEED_POSITION = Gauge(
    "quota_ledger_feed_position",
    "Position of the newest committed change of the feed, as last measured (a consumer's lag "
    "is this minus its cursor).",
)

WEBHOOK_LAG = Gauge(
    "quota_ledger_webhook_lag",
    "Changes of the feed after a webhook endpoint's cursor, as last measured.",
    ["endpoint"],
)
WEBHOOK_DELIVERED = Counter(
    "quota_ledger_webhook_delivered_total", "Changes delivered (2xx) per endpoint.", ["endpoint"]
)
WEBHOOK_FAILURES = Counter(
    "quota_ledger_webhook_failures_total",
    "Failed delivery attempts (no answer or not 2xx) per endpoint.",
    ["endpoint"],
)

SWEEP_RUNS = Counter("quota_ledger_sweep_runs_total", "Expiry sweeps run.")
SWEEP_EXPIRED = Counter("quota_ledger_sweep_expired_total", "Instances expired by the sweep.")


def record_apply(
    results: Iterable[_Outcome], *, types: Iterable[str | None], seconds: float
) -> None:
    """Count one applied message: its events by type and outcome, its latency and size."""
    size = 0
    for result, event_type in zip(results, types, strict=True):
        size += 1
        EVENTS.labels(type=event_type or "unknown", outcome=result.outcome).inc()
        if result.outcome == "invalid" and result.reasons:
            DEAD_LETTERS.labels(code=result.reasons[0]).inc()
    APPLY_SECONDS.observe(seconds)
    BATCH_SIZE.observe(size)


def record_sweep(expired: int) -> None:
    SWEEP_RUNS.inc()
    SWEEP_EXPIRED.inc(expired)


def record_released(results: Iterable[_Outcome]) -> None:
    for result in results:
        RELEASED.labels(outcome=result.outcome).inc()


def record_gaps_skipped(count: int) -> None:
    GAPS_SKIPPED.inc(count)


def record_parked(count: int, oldest_seconds: float) -> None:
    PARKED.set(count)
    PARKED_OLDEST_SECONDS.set(oldest_seconds)


def record_webhooks(
    *, head: int, cursors: dict[int, int], delivered: dict[int, int], failures: dict[int, int]
) -> None:
    """After a delivery pass: every endpoint's lag, and this pass's deliveries and failures."""
    FEED_POSITION.set(head)
    for endpoint, cursor in cursors.items():
        WEBHOOK_LAG.labels(endpoint=str(endpoint)).set(max(head - cursor, 0))
    for endpoint, count in delivered.items():
        WEBHOOK_DELIVERED.labels(endpoint=str(endpoint)).inc(count)
    for endpoint, count in failures.items():
        WEBHOOK_FAILURES.labels(endpoint=str(endpoint)).inc(count)
