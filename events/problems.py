"""How a bad event is described: the wording of a field's problem and its formatting into the
one line that a dead letter carries (``dead_letters.error``, the CLI, the HTTP API).

The field checkers of :mod:`events.models` raise :func:`field_problem` / :func:`rule_problems`;
:func:`format_errors` turns pydantic's collected errors into ``"<field>: <problem>"`` parts
joined by ``"; "``. Input values are quoted with :func:`describe_value`, never dumped.
"""

import json
from typing import NoReturn

from pydantic import ValidationError
from pydantic_core import PydanticCustomError

__all__ = [
    "FIELD_ERROR",
    "RULE_ERROR",
    "describe_value",
    "field_problem",
    "format_errors",
    "json_problem",
    "json_type",
    "rule_problems",
]

# The pydantic error types of the problems raised here: one field's, and the cross-field rules'
# (whose messages already name their fields).
FIELD_ERROR = "event_field"
RULE_ERROR = "event_rule"

_MAX_DESCRIBE_CHARS = 60
_MAX_REPORTED_ERRORS = 10  # an object with 5000 unknown keys must not give a 5000-part message
_MAX_FIELD_NAME_CHARS = 80


def describe_value(value: object) -> str:
    """Short, single-line JSON-ish rendering of a bad input for error messages.

    Containers are named, not dumped: the value may be huge or nested 100k deep.
    """
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        try:
            text = str(value)
        except ValueError:  # over sys.int_info.str_digits_check_threshold digits
            return "a very large integer"
        return text if len(text) <= 40 else text[:20] + "…"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        short = value[:_MAX_DESCRIBE_CHARS]
        text = json.dumps(short, ensure_ascii=False)
        if len(short) < len(value):
            text += "…"
        # Lone surrogates (from "\ud800" escapes) cannot be stored as UTF-8: escape them.
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def json_type(value: object) -> str:
    """The JSON type of a decoded value ("object", "array", …), for "expected …, got …"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def json_problem(exc: ValueError) -> str:
    """What is wrong with a text ``json.loads`` refused, as ``"not valid JSON: …"``."""
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    # E.g. an integer literal over Python's 4300-digit limit: the first sentence only.
    return "not valid JSON: " + str(exc).split("\n", 1)[0].split(";", 1)[0]


def field_problem(message: str) -> NoReturn:
    """Raise one field's problem; :func:`format_errors` prefixes the field's name."""
    # "{msg}" template + context: user text containing braces is never re-interpreted.
    raise PydanticCustomError(FIELD_ERROR, "{msg}", {"msg": message})


def rule_problems(messages: list[str]) -> None:
    """Raise the collected cross-field violations as one error (each names its field)."""
    if messages:
        raise PydanticCustomError(RULE_ERROR, "{msg}", {"msg": "; ".join(messages)})


def _field_name(loc: tuple[int | str, ...]) -> str:
    name = ".".join(str(part) for part in loc)
    if len(name) > _MAX_FIELD_NAME_CHARS:
        name = name[:_MAX_FIELD_NAME_CHARS] + "…"
    return name


def format_errors(exc: ValidationError) -> str:
    """One readable line per problem, each naming its field, joined by "; "."""
    parts: list[str] = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = tuple(err["loc"])
        field = _field_name(loc)
        kind = err["type"]
        if kind == "missing":
            part = f"{field}: required field is missing"
        elif kind == "extra_forbidden":
            key = loc[-1] if loc else field
            part = f"unknown field {describe_value(key if isinstance(key, str) else str(key))}"
        elif kind in (FIELD_ERROR, RULE_ERROR) or not loc:
            part = f"{field}: {err['msg']}" if loc else err["msg"]
        else:  # pydantic's own wording, e.g. for a literal `type` mismatch
            part = f"{field}: {err['msg']}"
        if part not in parts:
            parts.append(part)
    if len(parts) > _MAX_REPORTED_ERRORS:
        extra = len(parts) - _MAX_REPORTED_ERRORS
        parts = [*parts[:_MAX_REPORTED_ERRORS], f"… and {extra} more problems"]
    return "; ".join(parts)
