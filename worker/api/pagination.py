"""Opaque cursors for keyset pagination.

A cursor is URL-safe base64 of a small JSON object: the list it belongs to (``k``), the key of
the last item returned (``a``: the instance id for ``/v1/instances``, the dead-letter id for
``/v1/rejected``) and, for instances, the ``at`` of the first page (``t``) so that every page of
one walk evaluates eligibility at the same instant. Keyset, not offset: an item inserted while a
client walks the list never shifts the pages, and each item is returned at most once.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from worker.api.errors import ApiError

MAX_CURSOR_CHARS = 1024


def encode_cursor(kind: str, after: str | int, at: str | None = None) -> str:
    data: dict[str, Any] = {"k": kind, "a": after}
    if at is not None:
        data["t"] = at
    raw = json.dumps(data, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _invalid() -> ApiError:
    return ApiError(
        422,
        "invalid_cursor",
        "cursor: not a cursor of this list (pass back next_cursor exactly as received)",
    )


def decode_cursor(kind: str, cursor: str) -> dict[str, Any]:
    if not cursor or len(cursor) > MAX_CURSOR_CHARS or not cursor.isascii():
        raise _invalid()
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise _invalid() from None
    if not isinstance(data, dict) or data.get("k") != kind or "a" not in data:
        raise _invalid()
    return data
