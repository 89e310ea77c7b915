"""Decoding, validation and the canonical JSON form of events (SPEC §5).

``parse_event`` / ``parse_event_obj`` never raise on bad input: they return an
:class:`EventRejection` carrying the dead-letter ``code`` and a readable, field-naming
``error``, because invalid input must be dead-lettered, never dropped and never crash a
worker. ``validate_event`` is the raising convenience for publishers. How a problem is worded
and formatted is :mod:`events.problems`'s.
"""

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, NoReturn

import orjson
from pydantic import ValidationError

from events.models import EVENT_MODELS, EVENT_TYPES, BaseEvent, Event, is_valid_event_id
from events.problems import describe_value, format_errors, json_problem, json_type
from events.timefmt import parse_iso_utc

__all__ = [
    "MAX_EVENT_BYTES",
    "EventRejection",
    "InvalidEvent",
    "RejectionCode",
    "canonical_json",
    "canonical_payload",
    "event_from_payload",
    "event_to_payload",
    "parse_event",
    "parse_event_obj",
    "validate_event",
]

MAX_EVENT_BYTES = 64 * 1024
"""Largest accepted event, in UTF-8 bytes of the line (without its line terminator)."""

RejectionCode = Literal["too_large", "invalid_event"]


@dataclass(frozen=True)
class EventRejection:
    """Why one line/message was not an event; the row to write to ``dead_letters``.

    ``event_id`` is set only when the input is a JSON object whose ``event_id`` is itself a
    valid event id, so a dead letter can be tied to its publisher's key without trusting junk.
    """

    code: RejectionCode
    error: str
    event_id: str | None
    raw: str


class InvalidEvent(ValueError):
    """Raised by :func:`validate_event`; carries the same data as :class:`EventRejection`."""

    def __init__(self, rejection: EventRejection) -> None:
        super().__init__(f"{rejection.code}: {rejection.error}")
        self.rejection = rejection
        self.code: RejectionCode = rejection.code
        self.error: str = rejection.error
        self.event_id: str | None = rejection.event_id
        self.raw: str = rejection.raw


# --- canonical form --------------------------------------------------------------------------


def canonical_json(obj: Any) -> str:
    """The one JSON spelling of a value: sorted keys, no spaces, UTF-8 text (not \\u escapes).

    ``allow_nan=False``: NaN/Infinity are not JSON and would make the text unparseable by
    other languages (and every event value is finite anyway).

    The spelling is the standard library's (:data:`_CANONICAL_ENCODE`); orjson writes the very
    same bytes ten times faster for everything but floats (it spells ``0.00001`` where Python
    spells ``1e-05``), so a value without floats goes through orjson, and anything orjson
    refuses (an int beyond 64 bits, a lone surrogate, a non-string key) through the standard
    library. ``tests/property/test_json_codecs.py`` pins the two to the same output.
    """
    if _without_floats(obj):
        try:
            return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS).decode()
        except TypeError:  # orjson.JSONEncodeError is a TypeError
            pass
    return _CANONICAL_ENCODE(obj)


_SCALARS_ALIKE = frozenset({str, int, bool, type(None)})
_CONTAINERS = frozenset({dict, list, tuple})


def _without_floats(obj: Any) -> bool:
    """``obj`` is made only of dicts, lists, tuples, strings, ints, bools and None (exact types:
    a subclass or a Decimal is left to the standard library). A loop, not a generator: it runs
    for every payload and every chain hash."""
    kind = type(obj)
    if kind is dict:
        values: Any = obj.values()
    elif kind is list or kind is tuple:
        values = obj
    else:
        return kind in _SCALARS_ALIKE
    for value in values:
        kind = type(value)
        if kind in _SCALARS_ALIKE:
            continue
        if kind in _CONTAINERS and _without_floats(value):
            continue
        return False
    return True


# What json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
# allow_nan=False) does, without building a new encoder for every call.
_CANONICAL_ENCODE = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode


def event_to_payload(event: BaseEvent) -> dict[str, Any]:
    """The event as plain JSON data with every field, defaults and nulls included.

    Times are :func:`events.iso_utc` text, amounts plain decimal strings ("99", "99.5"),
    integral bandwidths ints — so equal events always give equal payloads.
    """
    if not isinstance(event, BaseEvent):
        raise TypeError(f"event_to_payload expects an event model, got {type(event).__name__}")
    return event.model_dump(mode="json")


def canonical_payload(event: BaseEvent) -> str:
    """``canonical_json(event_to_payload(event))``: what the ledger stores and hashes."""
    return canonical_json(event_to_payload(event))


# --- stored payloads -------------------------------------------------------------------------

# How a canonical payload's JSON values become model values: times are iso_utc text, amounts
# decimal_str text; everything else (strings, ints, integral-or-not bandwidth numbers, nulls) is
# already the validated value.
_PAYLOAD_DECODERS: dict[str, Callable[[Any], Any]] = {
    "occurred_at": parse_iso_utc,
    "expires_at": parse_iso_utc,
    "order_amount_cny": Decimal,
}
_MODEL_FIELDS = {name: frozenset(model.model_fields) for name, model in EVENT_MODELS.items()}


def event_from_payload(payload: str) -> Event:
    """The event whose canonical payload (:func:`canonical_payload`) is ``payload``.

    For the ledger's own stored payloads (rebuild folds millions of them): each was produced
    from a validated event by :func:`canonical_payload`, and the entry's hash, checked before
    folding, proves it unchanged, so validating it again only costs time. The event is built
    without validation from the payload's values (times parsed back with ``parse_iso_utc``,
    the amount with ``Decimal``), which gives exactly the validated event: ``parse_event``
    returns these same values for a canonical payload. Anything that does not have the exact
    shape of a canonical payload (unknown type, missing or extra fields) falls back to
    :func:`parse_event` and raises ``ValueError`` with its error if it is not an event.
    """
    data = json.loads(payload)
    fields = _MODEL_FIELDS.get(str(data.get("type"))) if isinstance(data, dict) else None
    if fields is None or fields != data.keys():
        return _parsed_or_raise(payload)
    try:
        for name, decode in _PAYLOAD_DECODERS.items():
            value = data.get(name)
            if value is not None:
                data[name] = decode(value)
    except (ArithmeticError, ValueError, TypeError):
        return _parsed_or_raise(payload)
    event: Event = _construct(EVENT_MODELS[data["type"]], data)  # type: ignore[assignment]
    return event


def _model_construct(model: type[BaseEvent], values: dict[str, Any]) -> BaseEvent:
    return model.model_construct(**values)


def _direct_construct(model: type[BaseEvent], values: dict[str, Any]) -> BaseEvent:
    """What ``model_construct`` builds when ``values`` holds every field and nothing else (no
    defaults to fill, no aliases, no extras, no private attributes), minus its per-field
    bookkeeping. Only used if it gives exactly ``model_construct``'s result (checked at
    import, so a pydantic upgrade that changes the internals falls back by itself)."""
    event = model.__new__(model)
    _set = object.__setattr__
    _set(event, "__dict__", {name: values[name] for name in model.model_fields})
    _set(event, "__pydantic_fields_set__", set(values))
    _set(event, "__pydantic_extra__", None)
    _set(event, "__pydantic_private__", None)
    return event


def _same_construction() -> bool:
    sample = {
        "event_id": "e-1",
        "type": "instance.released",
        "occurred_at": parse_iso_utc("2026-01-01T00:00:00Z"),
        "instance_id": "i-1",
        "schema_version": 1,
    }
    model = EVENT_MODELS["instance.released"]
    try:
        fast, slow = _direct_construct(model, dict(sample)), _model_construct(model, dict(sample))
        names = (
            "__dict__",
            "__pydantic_fields_set__",
            "__pydantic_extra__",
            "__pydantic_private__",
        )
        same = all(getattr(fast, name) == getattr(slow, name) for name in names)
        return same and fast == slow and list(fast.__dict__) == list(slow.__dict__)
    except Exception:
        return False


_construct = _direct_construct if _same_construction() else _model_construct


def _parsed_or_raise(payload: str) -> Event:
    event = parse_event(payload)
    if isinstance(event, EventRejection):
        raise ValueError(event.error)
    return event


# --- parsing ---------------------------------------------------------------------------------


class _BadJson(ValueError):
    """JSON that the stdlib would accept but we do not (duplicate keys, NaN, Infinity)."""


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # The stdlib keeps the last duplicate silently; for an audited ledger an ambiguous
    # object is invalid input, not something to guess about.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _BadJson(f"duplicate key {describe_value(key)}")
        result[key] = value
    return result


def _reject_constant(name: str) -> NoReturn:
    raise _BadJson(f"{name} is not allowed in JSON")


def _safe_text(text: str) -> str:
    # Lone surrogates cannot be encoded as UTF-8 (and so cannot be stored); escape them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _strip_terminator(text: str) -> str:
    # The line terminator is not part of the event (nor of its 64 KiB budget).
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text


def parse_event(raw: str | bytes | bytearray) -> Event | EventRejection:
    """Parse one JSONL line or one message into an event, or say why it is not one.

    Checked in SPEC order: over :data:`MAX_EVENT_BYTES` UTF-8 bytes → ``too_large`` (without
    parsing it); anything else wrong → ``invalid_event``. A trailing ``\\n`` / ``\\r\\n`` and
    a leading UTF-8 BOM are ignored. Never raises, except ``TypeError`` for input that is not
    ``str`` or ``bytes``.
    """
    if isinstance(raw, bytes | bytearray | memoryview):
        data = bytes(raw)
        if data.endswith(b"\r\n"):
            data = data[:-2]
        elif data.endswith(b"\n"):
            data = data[:-1]
        # Kept as faithful as possible for the dead-letter row; invalid bytes become \xNN.
        raw_text = data.decode("utf-8", "backslashreplace")
        size = len(data)
        if size > MAX_EVENT_BYTES:
            return _too_large(size, raw_text)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            return EventRejection(
                "invalid_event",
                f"not valid UTF-8: undecodable byte at position {exc.start}",
                None,
                raw_text,
            )
    elif isinstance(raw, str):
        text = _strip_terminator(raw)
        raw_text = _safe_text(text)
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_EVENT_BYTES:
            return _too_large(size, raw_text)
    else:
        raise TypeError(f"parse_event expects str or bytes, got {type(raw).__name__}")

    try:
        obj = json.loads(
            text.removeprefix("\ufeff"),
            object_pairs_hook=_reject_duplicate_keys,
            parse_constant=_reject_constant,
        )
    except RecursionError:
        return _invalid("not valid JSON: nested too deeply", None, raw_text)
    except _BadJson as exc:
        return _invalid(f"not valid JSON: {exc}", None, raw_text)
    except ValueError as exc:  # JSONDecodeError, or e.g. an integer over the digit limit
        return _invalid(json_problem(exc), None, raw_text)
    return _validate(obj, raw_text)


def parse_event_obj(obj: object, raw: str | None = None) -> Event | EventRejection:
    """Validate an already-decoded JSON value (HTTP API bodies, publisher dicts).

    ``too_large`` is measured on the canonical JSON of ``obj``. ``raw`` is what to keep in a
    rejection; by default the canonical JSON of ``obj``. An event model is accepted too (it is
    re-validated from its payload). Never raises.
    """
    if isinstance(obj, BaseEvent):
        obj = event_to_payload(obj)
    try:
        text: str | None = canonical_json(obj)
    except RecursionError:
        return _invalid(
            "not valid JSON: nested too deeply", None, raw or "<value nested too deeply>"
        )
    except (TypeError, ValueError):
        text = None  # not pure JSON data (e.g. a datetime from Python); size it leniently
        with contextlib.suppress(TypeError, ValueError, RecursionError):
            text = json.dumps(obj, default=repr, ensure_ascii=False, separators=(",", ":"))
    if raw is None:
        raw = text if text is not None else f"<{type(obj).__name__} that is not JSON data>"
    raw = _safe_text(raw)
    if text is not None:
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_EVENT_BYTES:
            return _too_large(size, raw)
    return _validate(obj, raw)


def validate_event(obj_or_event: object) -> Event:
    """Return the validated event or raise :class:`InvalidEvent`.

    ``str``/``bytes`` are taken as JSON text (like :func:`parse_event`); anything else as a
    decoded JSON value or an event model (like :func:`parse_event_obj`).
    """
    if isinstance(obj_or_event, str | bytes | bytearray):
        result = parse_event(obj_or_event)
    else:
        result = parse_event_obj(obj_or_event)
    if isinstance(result, EventRejection):
        raise InvalidEvent(result)
    return result


# --- helpers ---------------------------------------------------------------------------------


def _too_large(size: int, raw: str) -> EventRejection:
    return EventRejection(
        "too_large",
        f"event is {size} bytes, over the limit of {MAX_EVENT_BYTES} bytes (64 KiB)",
        None,
        raw,
    )


def _invalid(error: str, event_id: str | None, raw: str) -> EventRejection:
    # One line, storable as UTF-8: it goes to dead_letters.error and to CLI output.
    one_line = error.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    return EventRejection("invalid_event", _safe_text(one_line), event_id, raw)


def _valid_event_id(obj: dict[Any, Any]) -> str | None:
    value = obj.get("event_id")
    return value if is_valid_event_id(value) else None


def _validate(obj: object, raw: str) -> Event | EventRejection:
    try:
        if not isinstance(obj, dict):
            return _invalid(f"expected a JSON object, got {json_type(obj)}", None, raw)
        event_id = _valid_event_id(obj)
        if "type" not in obj:
            return _invalid("type: required field is missing", event_id, raw)
        event_type = obj["type"]
        if not isinstance(event_type, str):
            return _invalid(
                f"type: must be a string (got {describe_value(event_type)})", event_id, raw
            )
        model = EVENT_MODELS.get(event_type)
        if model is None:
            return _invalid(
                f"type: unknown event type {describe_value(event_type)} "
                f"(expected one of: {', '.join(EVENT_TYPES)})",
                event_id,
                raw,
            )
        try:
            return model.model_validate(obj)  # type: ignore[return-value]
        except ValidationError as exc:
            return _invalid(format_errors(exc), event_id, raw)
    except RecursionError:
        return _invalid("nested too deeply", None, raw)
    except Exception as exc:  # last line of defence: a bug here must dead-letter, not crash
        return _invalid(f"could not validate event: {type(exc).__name__}: {exc}", None, raw)
