"""Webhooks' rules, pure (no I/O, no clock, no randomness of their own): the signature a
receiver verifies, the retry schedule, when an endpoint is given up, which kinds it wants.

A delivery is one HTTP POST per change, in feed order per endpoint, with the headers

- ``Quota-Ledger-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``
  (Stripe's scheme: the timestamp is signed with the body, so a receiver that rejects old
  timestamps rejects replays; ``v1`` may appear more than once while a secret is rotated);
- ``Quota-Ledger-Delivery: <endpoint id>:<position>`` (the same on every retry: a receiver
  that has seen it may answer 2xx and do nothing — delivery is at least once).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from events import iso_utc
from ledger.changes import CHANGE_KINDS

__all__ = [
    "DEFAULT_TOLERANCE_S",
    "DELIVERY_HEADER",
    "SIGNATURE_HEADER",
    "backoff_seconds",
    "delivery_body",
    "delivery_view",
    "endpoint_problem",
    "endpoint_view",
    "given_up",
    "new_secret",
    "sign",
    "signature_header",
    "verify_signature",
    "wants",
]

SIGNATURE_HEADER = "Quota-Ledger-Signature"
DELIVERY_HEADER = "Quota-Ledger-Delivery"
#: How old a signed timestamp a receiver should accept (seconds, either way).
DEFAULT_TOLERANCE_S = 300


def new_secret(token: Callable[[int], str] = secrets.token_hex) -> str:
    """A fresh signing secret (``whsec_`` + 64 hex digits, 256 bits)."""
    return "whsec_" + token(32)


def delivery_body(change: Mapping[str, Any]) -> bytes:
    """The POST body: the change's JSON (the feed's view), compact and UTF-8, exactly the bytes
    that are signed."""
    return json.dumps(change, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``"<timestamp>.<body>"`` under ``secret``."""
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},v1={sign(secret, timestamp, body)}"


def verify_signature(
    secret: str,
    header: str,
    body: bytes,
    *,
    now: int,
    tolerance: int = DEFAULT_TOLERANCE_S,
) -> bool:
    """What a receiver does (docs/changes.md shows it without this package): the header's
    timestamp is within ``tolerance`` seconds of ``now`` and one of its ``v1`` signatures
    matches (compared in constant time)."""
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or abs(now - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)


def backoff_seconds(
    failures: int, *, base: float, cap: float, random: Callable[[], float]
) -> float:
    """Seconds before the next attempt after ``failures`` consecutive failures (≥ 1):
    exponential with full jitter, ``random() × min(cap, base × 2^(failures−1))``, so that
    endpoints failing together do not retry together. ``random`` returns [0, 1)."""
    ceiling = min(cap, base * 2 ** min(failures - 1, 62))
    return float(random() * ceiling)


def given_up(failing_since: datetime | None, now: datetime, disable_after: timedelta) -> bool:
    """An endpoint that has failed every attempt for ``disable_after`` is disabled."""
    return failing_since is not None and now - failing_since >= disable_after


def wants(kinds: Iterable[str], kind: str) -> bool:
    """An endpoint registered with no kinds wants every kind."""
    chosen = list(kinds)
    return not chosen or kind in chosen


def endpoint_problem(url: str, kinds: Iterable[str]) -> str | None:
    """Why an endpoint can never work, or None: a URL that is not http(s) with a host (or is
    over 2,000 characters), an unknown change kind."""
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url[:200]!r} is not an http:// or https:// URL with a host"
    if len(url) > 2000:
        return "the URL is over 2,000 characters"
    unknown = sorted(set(kinds) - set(CHANGE_KINDS))
    if unknown:
        return f"unknown change kind {', '.join(unknown)[:200]} (docs/changes.md lists them)"
    return None


def endpoint_view(row: Mapping[str, Any], *, with_secret: bool = False) -> dict[str, Any]:
    """An endpoint as the CLI and the API show it; the secret only when it is created."""

    def time(value: datetime | None) -> str | None:
        return iso_utc(value) if value is not None else None

    view = {
        "id": row["id"],
        "url": row["url"],
        "kinds": list(row["kinds"]),
        "enabled": row["enabled"],
        "cursor": row["cursor"],
        "failures": row["failures"],
        "failing_since": time(row["failing_since"]),
        "next_attempt_at": time(row["next_attempt_at"]),
        "last_status": row["last_status"],
        "last_error": row["last_error"],
        "disabled_reason": row["disabled_reason"],
        "created_at": time(row["created_at"]),
    }
    if with_secret:
        view["secret"] = row["secret"]
    return view


def delivery_view(row: Mapping[str, Any]) -> dict[str, Any]:
    """One attempt of the delivery log."""
    return {
        "id": row["id"],
        "position": row["position"],
        "attempt": row["attempt"],
        "status": row["status"],
        "error": row["error"],
        "duration_ms": row["duration_ms"],
        "attempted_at": iso_utc(row["attempted_at"]),
    }
