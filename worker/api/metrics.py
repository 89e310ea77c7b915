"""Metrics of the HTTP API itself, next to the shared ones of ``worker.metrics``.

Ingest outcomes reuse ``worker.metrics``: dead-lettered events are counted by
``record_apply`` (``quota_ledger_events_total{outcome="invalid"}`` and
``quota_ledger_dead_letters_total``) because they go through ``Ledger.apply``; accepted ones are
only enqueued here (the worker counts them when it applies them), so they get a counter of
their own.
"""

from __future__ import annotations

from prometheus_client import Counter

INGESTED = Counter(
    "quota_ledger_api_ingested_total",
    "Valid events accepted by POST /v1/events and enqueued to the broker, by event type.",
    ["type"],
)
HTTP_REQUESTS = Counter(
    "quota_ledger_api_requests_total",
    "HTTP requests answered by the API, by method, route template and status code.",
    ["method", "route", "status"],
)
