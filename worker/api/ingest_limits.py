"""The per-request event cap of ``POST /v1/events``, checked before any event is parsed.

Parsing costs about a kilobyte of memory per element (its rejection or model, its dead-letter
row, its line of the answer), so a 5 MiB body of two-byte lines (``1\\n`` × 2.6 million) used to
cost gigabytes. :func:`over_event_limit` only finds element boundaries and stops counting one
past the limit: the refusal costs a scan of at most ``limit + 1`` elements, whatever the body.
It counts exactly what :func:`worker.api.ingest.parse_body` would turn into items (non-blank
JSONL lines, array elements); a body that is malformed before the limit is left to the parser,
which answers it with its usual 400.
"""

from __future__ import annotations

import io
import json
import re

from events import EventRejection
from worker.api.ingest import Format

_BOM = b"\xef\xbb\xbf"
_WS = re.compile(r"[ \t\n\r]*")


def over_event_limit(body: bytes, fmt: Format, limit: int) -> bool:
    """Whether ``body`` holds more than ``limit`` events (blank JSONL lines do not count)."""
    data = body.removeprefix(_BOM)
    if fmt == "jsonl":
        return _jsonl_over(data, limit)
    return _json_over(data, limit)


def _jsonl_over(data: bytes, limit: int) -> bool:
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    if lines <= limit:  # the common case: no line needs looking at
        return False
    count = 0
    for line in io.BytesIO(data):  # split exactly as the parser splits
        try:
            blank = not line.decode("utf-8").strip()
        except UnicodeDecodeError:
            blank = False  # an undecodable line is an (invalid) event for the parser
        if not blank:
            count += 1
            if count > limit:
                return True
    return False


def _json_over(data: bytes, limit: int) -> bool:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    if len(text) < 2 * limit:  # every element takes a character and a comma, at least
        return False
    position = _WS.match(text, 0).end()  # type: ignore[union-attr]
    if not text.startswith("[", position):
        return False  # one object, or not JSON: at most one event
    decoder = json.JSONDecoder()
    position = _WS.match(text, position + 1).end()  # type: ignore[union-attr]
    count = 0
    while position < len(text) and text[position] != "]":
        try:
            _, end = decoder.raw_decode(text, position)
        except (ValueError, RecursionError):
            return False
        count += 1
        if count > limit:
            return True
        position = _WS.match(text, end).end()  # type: ignore[union-attr]
        if not text.startswith(",", position):
            break
        position = _WS.match(text, position + 1).end()  # type: ignore[union-attr]
    return False


def oversize_rejection(body: bytes, limit: int) -> EventRejection:
    """The ONE dead letter that records a refused oversize request (its whole body, which the
    5 MiB body limit bounds), instead of one per element."""
    return EventRejection(
        "too_large",
        f"the request held more than {limit} events (the limit per request): it was refused "
        "whole and nothing of it was enqueued; send the events in smaller requests",
        None,
        body.decode("utf-8", "backslashreplace"),
    )
