"""THE time format of the system (SPEC §7): ISO 8601 in UTC with a trailing ``Z``.

Every component (payloads, hashes, CLI, API) formats times with :func:`iso_utc` and reads
them with :func:`parse_iso_utc`, so one instant always has exactly one spelling.
"""

import re
from datetime import UTC, datetime
from functools import lru_cache

__all__ = ["iso_utc", "parse_iso_utc"]

# RFC 3339 profile of ISO 8601 extended format (plus hour:minute-only times and "," as the
# decimal mark). We validate the shape ourselves because datetime.fromisoformat in 3.11 also
# accepts oddities ("08:00 +08:00", week dates) that a publisher almost certainly did not mean.
_TIMESTAMP_RE = re.compile(
    r"(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})"
    r"(?:(?P<sep>[Tt ])(?P<hm>[0-9]{2}:[0-9]{2})"
    r"(?::(?P<sec>[0-9]{2})(?:[.,](?P<frac>[0-9]+))?)?)?"
    r"(?P<tz>[Zz]|[+-][0-9]{2}(?::?[0-9]{2})?)?"
)
# Longest sane timestamp; stops pathological inputs before any regex work.
_MAX_TIMESTAMP_CHARS = 64


def iso_utc(dt: datetime) -> str:
    """Format an aware datetime as ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z`` in UTC.

    Microseconds appear only when non-zero, so whole-second instants stay short and every
    instant has exactly one spelling (hashes and canonical payloads depend on this).
    """
    if dt.__class__ is datetime and dt.tzinfo is UTC:
        # Hot path (every stored time is already UTC): the same text as below, without the
        # conversion, and cached (UTC datetimes are equal exactly when they are the same
        # instant, so a cached spelling is always the right one).
        return _iso_of_utc(dt)
    if not isinstance(dt, datetime):
        raise TypeError(f"iso_utc expects a datetime, got {type(dt).__name__}")
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError("iso_utc needs an aware datetime; got a naive one")
    utc = dt.astimezone(UTC).replace(tzinfo=None)
    # isoformat (unlike strftime %Y) always pads the year to four digits.
    spec = "microseconds" if utc.microsecond else "seconds"
    return utc.isoformat(timespec=spec) + "Z"


@lru_cache(maxsize=1 << 16)
def _iso_of_utc(dt: datetime) -> str:
    plain = dt.replace(tzinfo=None)
    return plain.isoformat(timespec="microseconds" if dt.microsecond else "seconds") + "Z"


def parse_iso_utc(text: str) -> datetime:
    """Parse an ISO 8601 timestamp that carries a timezone into an aware UTC datetime.

    Accepts ``Z`` and numeric offsets (``+08:00``, ``+0800``, ``+08``). A timestamp without a
    timezone is an error (we will not guess a zone). Fractions finer than a microsecond are
    truncated. Raises ``ValueError`` with a one-line message on anything else.
    """
    if not isinstance(text, str):
        raise ValueError(f"timestamp must be a string, got {type(text).__name__}")
    # Pure function of an immutable string returning an immutable datetime: cached, because
    # the same instants are parsed over and over (projection JSON, stored payloads). Errors
    # are raised, never cached.
    return _parse_iso_utc(str(text))


@lru_cache(maxsize=1 << 16)
def _parse_iso_utc(text: str) -> datetime:
    if len(text) > _MAX_TIMESTAMP_CHARS:
        raise ValueError(f"not an ISO 8601 timestamp (too long: {len(text)} characters)")
    m = _TIMESTAMP_RE.fullmatch(text)
    if m is None:
        raise ValueError("not an ISO 8601 timestamp (expected e.g. 2026-01-31T08:00:00Z)")
    if m["hm"] is None:
        raise ValueError("timestamp has no time of day and timezone")
    if m["tz"] is None:
        raise ValueError("timestamp has no timezone")
    normalised = f"{m['date']}T{m['hm']}:{m['sec'] or '00'}"
    if m["frac"]:
        normalised += "." + (m["frac"] + "00000")[:6]
    tz = m["tz"]
    if tz not in ("Z", "z") and (int(tz[1:3]) > 23 or int(tz[-2:] if len(tz) > 3 else "0") > 59):
        raise ValueError(f"timezone offset {tz} is out of range")
    normalised += "+00:00" if tz in ("Z", "z") else tz
    try:
        parsed = datetime.fromisoformat(normalised)
    except ValueError as exc:
        raise ValueError(f"not a valid date and time ({exc})") from None
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise ValueError("timestamp is out of the supported range") from None
