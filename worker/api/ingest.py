"""Reading ``POST /v1/events`` bodies: a JSON array of events, or JSONL (one event a line).

Every element or line goes through the same ``events.parse_event`` the CLI's ``apply`` uses, on
its own text, so the checks (64 KiB per event, duplicate keys, NaN, field rules) and the
dead-letter ``raw`` are exactly the CLI's. Only a body whose overall structure is broken (a JSON
array that does not parse, bytes that are not UTF-8 in JSON mode) is refused as a whole (400).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Literal

from events import Event, EventRejection, parse_event
from events.problems import json_problem

Format = Literal["json", "jsonl"]

JSON_MEDIA_TYPES = frozenset({"application/json"})
JSONL_MEDIA_TYPES = frozenset(
    {
        "application/x-ndjson",
        "application/ndjson",
        "application/jsonl",
        "application/x-jsonl",
        "application/jsonlines",
        "application/json-lines",
        "application/x-jsonlines",
    }
)
# Sent by clients that do not say what the body is (curl -d defaults to the form type).
SNIFFED_MEDIA_TYPES = frozenset(
    {"", "application/octet-stream", "application/x-www-form-urlencoded"}
)

_WS = re.compile(r"[ \t\n\r]*")


class BodyError(ValueError):
    """The body as a whole is not a JSON array / JSONL document (answered with 400)."""

    def __init__(self, message: str, code: str = "invalid_body") -> None:
        super().__init__(message)
        self.code = code


class UnsupportedMediaType(ValueError):
    pass


@dataclass(frozen=True)
class Item:
    """One event of the body: its position and what ``parse_event`` made of it."""

    index: int
    parsed: Event | EventRejection
    raw: str | None


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def body_format(content_type: str | None, body: bytes) -> Format:
    """JSON array or JSONL, by Content-Type, or sniffed from the first character."""
    kind = media_type(content_type)
    if kind in JSON_MEDIA_TYPES or (kind.startswith("application/") and kind.endswith("+json")):
        return "json"
    if kind in JSONL_MEDIA_TYPES or kind.startswith("text/"):
        return "jsonl"
    if kind in SNIFFED_MEDIA_TYPES:
        start = body.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
        return "json" if start.startswith(b"[") else "jsonl"
    raise UnsupportedMediaType(
        f"unsupported Content-Type {kind!r}: send application/json (a JSON array of events) "
        "or application/x-ndjson (one event per line)"
    )


def parse_body(body: bytes, fmt: Format) -> list[Item]:
    return _parse_json(body) if fmt == "json" else _parse_jsonl(body)


def _parse_jsonl(body: bytes) -> list[Item]:
    """Like ``quota-ledger apply``: blank lines skipped, each other line one event. ``index`` is
    the 0-based line number in the body (blank lines count)."""
    items: list[Item] = []
    # Lines split exactly as the CLI reads a file (on b"\n", terminator kept for parse_event).
    for index, line in enumerate(io.BytesIO(body.removeprefix(b"\xef\xbb\xbf"))):
        try:
            text: str | None = line.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None:
            if not text.strip():
                continue
            items.append(Item(index, parse_event(text), text.rstrip("\r\n")))
        else:
            items.append(Item(index, parse_event(line), None))
    return items


def _skip_ws(text: str, position: int) -> int:
    match = _WS.match(text, position)
    return match.end() if match else position


def _element_end(decoder: json.JSONDecoder, text: str, position: int) -> int:
    try:
        _, end = decoder.raw_decode(text, position)
    except RecursionError:
        raise BodyError("not valid JSON: nested too deeply", "invalid_json") from None
    except ValueError as exc:  # JSONDecodeError, or an integer over Python's digit limit
        raise BodyError(json_problem(exc), "invalid_json") from None
    return end


def _position(text: str, position: int) -> str:
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    return f"line {line} column {column}"


def split_json_array(text: str) -> list[str]:
    """The source text of each element of a JSON array (a lone object is one element).

    The standard decoder only finds where each element ends; whether the element is a valid
    event is decided later by ``parse_event`` on its own text.
    """
    decoder = json.JSONDecoder()
    position = _skip_ws(text, 0)
    if position >= len(text):
        raise BodyError("the body is empty: send a JSON array of events", "empty_body")
    if text[position] == "{":
        end = _element_end(decoder, text, position)
        if _skip_ws(text, end) != len(text):
            raise BodyError(
                f"not valid JSON: extra data at {_position(text, _skip_ws(text, end))} "
                "(a JSON body is one array of events; send JSONL as application/x-ndjson)",
                "invalid_json",
            )
        return [text[position:end]]
    if text[position] != "[":
        raise BodyError("expected a JSON array of events", "invalid_json")
    elements: list[str] = []
    position = _skip_ws(text, position + 1)
    if position < len(text) and text[position] == "]":
        position += 1
    else:
        while True:
            if position >= len(text):
                raise BodyError("not valid JSON: unterminated array", "invalid_json")
            end = _element_end(decoder, text, position)
            elements.append(text[position:end])
            position = _skip_ws(text, end)
            if position < len(text) and text[position] == ",":
                position = _skip_ws(text, position + 1)
                continue
            if position < len(text) and text[position] == "]":
                position += 1
                break
            raise BodyError(
                f"not valid JSON: expected ',' or ']' at {_position(text, position)}",
                "invalid_json",
            )
    if _skip_ws(text, position) != len(text):
        raise BodyError(
            f"not valid JSON: extra data after the array at {_position(text, position)}",
            "invalid_json",
        )
    return elements


def _parse_json(body: bytes) -> list[Item]:
    try:
        text = body.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(
            f"the body is not valid UTF-8 (undecodable byte at position {exc.start})",
            "invalid_encoding",
        ) from None
    return [
        Item(index, parse_event(element), element)
        for index, element in enumerate(split_json_array(text))
    ]
