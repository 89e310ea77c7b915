"""Webhook delivery (docs/changes.md): each registered endpoint gets the feed's changes it
wants, one POST per change, in feed order, signed, at least once.

One pass (:func:`deliver_due`, run by the beat-scheduled task ``quota_ledger.deliver_webhooks``
or ``quota-ledger webhooks deliver``) claims the endpoints that are due with a lease, posts each
one's changes after its cursor until one fails or its batch is done, and records every attempt.
A failure stops that endpoint (later changes wait: order before progress) and schedules the next
attempt with exponential backoff and full jitter; an endpoint that has failed every attempt for
``disable_after`` is disabled. The rules are in ``ledger.webhooks`` (pure), the SQL in
``ledger.store.webhooks``; this module adds the clock, the randomness and the HTTP.
"""

from __future__ import annotations

import logging
import random as random_module
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Engine

from ledger.changefeed import changes_after
from ledger.clock import utcnow
from ledger.store import webhooks as store
from ledger.webhooks import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    backoff_seconds,
    delivery_body,
    given_up,
    signature_header,
    wants,
)

log = logging.getLogger(__name__)

#: The Celery task of a delivery pass (``worker.tasks``), scheduled by beat (``worker.celery_app``).
TASK_DELIVER_WEBHOOKS = "quota_ledger.deliver_webhooks"

#: ``post(url, body, headers, timeout) -> (HTTP status or None, error text or None)``.
Post = Callable[[str, bytes, dict[str, str], float], tuple[int | None, str | None]]


@dataclass(frozen=True)
class DeliveryPolicy:
    timeout_s: float = 10.0
    backoff_base_s: float = 5.0
    backoff_cap_s: float = 3600.0
    disable_after: timedelta = timedelta(days=3)
    # Longer than a full batch of slow answers takes; a deliverer stops starting new posts
    # at half of it, so the lease never runs out under a live deliverer.
    lease: timedelta = timedelta(seconds=300)
    batch: int = 100  # changes per endpoint per pass
    endpoints: int = 50  # endpoints per pass


@dataclass
class DeliveryReport:
    endpoints: int = 0
    delivered: int = 0
    failed: int = 0
    disabled: list[int] = field(default_factory=list)
    # endpoint id -> (cursor after the pass, failures in this pass), for the metrics
    cursors: dict[int, int] = field(default_factory=dict)
    failures: dict[int, int] = field(default_factory=dict)
    per_endpoint: dict[int, int] = field(default_factory=dict)  # delivered, per endpoint

    def to_json(self) -> dict[str, Any]:
        return {
            "endpoints": self.endpoints,
            "delivered": self.delivered,
            "failed": self.failed,
            "disabled": self.disabled,
        }


def http_post(
    url: str, body: bytes, headers: dict[str, str], timeout: float
) -> tuple[int | None, str | None]:
    """POST with the standard library (no client dependency for the worker). Redirects are not
    followed: a receiver answers where it was registered."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=timeout) as response:
            return int(response.status), None
    except urllib.error.HTTPError as exc:
        return int(exc.code), f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return None, f"{type(exc).__name__}: {reason}"[:500]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def deliver_due(
    engine: Engine,
    *,
    policy: DeliveryPolicy = DeliveryPolicy(),
    clock: Callable[[], datetime] = utcnow,
    post: Post = http_post,
    random: Callable[[], float] = random_module.random,
    wall: Callable[[], float] = time.time,
) -> DeliveryReport:
    """One delivery pass over the endpoints that are due."""
    report = DeliveryReport()
    for endpoint in store.claim_due(
        engine, now=clock(), lease=policy.lease, limit=policy.endpoints
    ):
        report.endpoints += 1
        try:
            _deliver(engine, endpoint, policy, clock, post, random, wall, report)
        except Exception:  # one endpoint's trouble must not stop the others
            log.exception("webhook endpoint %s: delivery pass failed", endpoint["id"])
        finally:
            store.release(engine, endpoint_id=endpoint["id"], token=endpoint["lease_token"])
    return report


def _deliver(
    engine: Engine,
    endpoint: dict[str, Any],
    policy: DeliveryPolicy,
    clock: Callable[[], datetime],
    post: Post,
    random: Callable[[], float],
    wall: Callable[[], float],
    report: DeliveryReport,
) -> None:
    endpoint_id, token = endpoint["id"], endpoint["lease_token"]
    failures, failing_since = endpoint["failures"], endpoint["failing_since"]
    passed = endpoint["cursor"]  # delivered or not wanted, up to here
    stored_cursor = passed
    stop_at = time.monotonic() + policy.lease.total_seconds() / 2
    report.cursors[endpoint_id] = passed
    for change in changes_after(engine, after=passed, limit=policy.batch):
        position = change["position"]
        if not wants(endpoint["kinds"], change["kind"]):
            passed = position
            continue
        body = delivery_body(change)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "quota-ledger-webhooks/1",
            SIGNATURE_HEADER: signature_header(endpoint["secret"], int(wall()), body),
            DELIVERY_HEADER: f"{endpoint_id}:{position}",
        }
        started = time.monotonic()
        status, error = post(endpoint["url"], body, headers, policy.timeout_s)
        duration_ms = int((time.monotonic() - started) * 1000)
        now = clock()
        attempt = failures + 1
        ok = status is not None and 200 <= status < 300
        if ok:
            failures, failing_since = 0, None
            state = {
                "cursor": position,
                "failures": 0,
                "failing_since": None,
                "next_attempt_at": now,
                "last_status": status,
                "last_error": None,
            }
        else:
            failures += 1
            failing_since = failing_since or now
            disabled = given_up(failing_since, now, policy.disable_after)
            delay = backoff_seconds(
                failures, base=policy.backoff_base_s, cap=policy.backoff_cap_s, random=random
            )
            state = {
                "cursor": passed,
                "failures": failures,
                "failing_since": failing_since,
                "next_attempt_at": now + timedelta(seconds=delay),
                "last_status": status,
                "last_error": error or f"HTTP {status}",
                "enabled": not disabled,
                "disabled_reason": (
                    f"failed every attempt since {failing_since.isoformat()}" if disabled else None
                ),
            }
        recorded = store.record_attempt(
            engine,
            endpoint_id=endpoint_id,
            token=token,
            position=position,
            attempt=attempt,
            status=status,
            error=None if ok else state["last_error"],
            duration_ms=duration_ms,
            now=now,
            endpoint=state,
        )
        if not recorded:
            log.warning("webhook endpoint %s: lease lost; the next pass goes on", endpoint_id)
            return
        if not ok:
            report.failed += 1
            report.failures[endpoint_id] = report.failures.get(endpoint_id, 0) + 1
            if not state["enabled"]:
                report.disabled.append(endpoint_id)
                log.warning("webhook endpoint %s disabled: %s", endpoint_id, state["last_error"])
            return
        report.delivered += 1
        report.per_endpoint[endpoint_id] = report.per_endpoint.get(endpoint_id, 0) + 1
        passed = stored_cursor = position
        report.cursors[endpoint_id] = position
        if time.monotonic() > stop_at:
            break
    if passed > stored_cursor:
        store.pass_over(engine, endpoint_id=endpoint_id, token=token, cursor=passed)
        report.cursors[endpoint_id] = passed
