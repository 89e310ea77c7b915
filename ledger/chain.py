"""The per-instance hash chain of ledger entries (SPEC §6 "Tamper-evident"). Pure: no I/O.

Each entry's ``hash`` is the hex sha256 of the canonical JSON of
``[instance_seq, event_id, type, occurred_at, payload, outcome, reasons, result,
policy_version, prev_hash]``; the first entry of an instance links to ``GENESIS_HASH``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from operator import attrgetter, itemgetter
from typing import Any

# THE time spelling of the system (SPEC §7), shared with payloads, CLI and API: UTC,
# ``YYYY-MM-DDTHH:MM:SS``, ``.ffffff`` only if non-zero, ``Z``. Naive datetimes are refused.
from events.codec import canonical_json
from events.timefmt import iso_utc as _iso

GENESIS_HASH = "0" * 64

# The hashed fields, in the order of the hashed list. A plain tuple handed to ``verify_chain``
# must carry them in this order followed by ``hash``.
CHAIN_FIELDS: tuple[str, ...] = (
    "instance_seq",
    "event_id",
    "type",
    "occurred_at",
    "payload",
    "outcome",
    "reasons",
    "result",
    "policy_version",
    "prev_hash",
)


def entry_hash(
    *,
    instance_seq: int,
    event_id: str,
    type: str,
    occurred_at: str | datetime,
    payload: str,
    outcome: str,
    reasons: Sequence[str],
    result: Mapping[str, Any],
    policy_version: str,
    prev_hash: str,
) -> str:
    """Hex sha256 of the entry's canonical JSON (sorted keys, ``,``/``:``, UTF-8, no escaping).

    ``occurred_at`` is the ISO text with ``Z``; an aware datetime is formatted with ``_iso``
    so that callers holding a database row (which gives datetimes back) get the same hash.
    """
    return _hash_of(
        instance_seq,
        event_id,
        type,
        occurred_at,
        payload,
        outcome,
        reasons,
        result,
        policy_version,
        prev_hash,
    )


# The hash covers SPEC §6's canonical JSON: the one encoder of events/codec.py.
_ENCODE = canonical_json


def _hash_of(
    instance_seq: int,
    event_id: str,
    type_: str,
    occurred_at: str | datetime,
    payload: str,
    outcome: str,
    reasons: Sequence[str],
    result: Mapping[str, Any],
    policy_version: str,
    prev_hash: str,
) -> str:
    if isinstance(occurred_at, datetime):
        occurred_at = _iso(occurred_at)
    material = [
        instance_seq,
        event_id,
        type_,
        occurred_at,
        payload,
        outcome,
        list(reasons),
        dict(result),
        policy_version,
        prev_hash,
    ]
    return hashlib.sha256(_ENCODE(material).encode("utf-8")).hexdigest()


_NAMES = (*CHAIN_FIELDS, "hash")
_BY_ATTRIBUTE = attrgetter(*_NAMES)
_BY_KEY = itemgetter(*_NAMES)


def _values(entry: Any) -> tuple[Any, ...]:
    """The chain fields plus ``hash``, in that order, from an object (ORM rows, SQLAlchemy
    ``Row``s, namedtuples: attribute access), a mapping or a plain tuple: one C-level getter
    call instead of a dict per entry."""
    if isinstance(entry, Mapping):
        fields: tuple[Any, ...] = _BY_KEY(entry)
        return fields
    if (
        isinstance(entry, tuple)
        and not hasattr(entry, "_fields")
        and not hasattr(entry, "_mapping")
    ):
        if len(entry) != len(_NAMES):
            raise ValueError(f"a chain tuple has {len(_NAMES)} items, got {len(entry)}")
        return entry
    return _BY_ATTRIBUTE(entry)


def _fields(entry: Any) -> dict[str, Any]:
    """Read the chain fields (plus ``hash``) from an object, a mapping or a plain tuple.

    Objects cover ORM rows, SQLAlchemy ``Row``s and namedtuples (attribute access).
    """
    return dict(zip(_NAMES, _values(entry), strict=True))


def verify_chain(entries: Iterable[Any], *, head: tuple[int, str] | None = None) -> int | None:
    """Check one instance's entries, given in ``instance_seq`` order.

    Returns the ``instance_seq`` at which the chain first breaks, or ``None`` if it is sound.
    "Breaks at k" means the k-th entry (1-based position) is not the entry k that the chain
    promises: its ``instance_seq`` is not k, its ``prev_hash`` is not entry k-1's hash, or its
    ``hash`` does not match its content. So a changed entry k, a removed entry k (entry k+1
    slides into position k), an entry inserted at k and a swap of k and k+1 all report k.

    ``head`` is the projection's ``(entries, head_hash)``; with it, a chain that is sound but
    ends early (the last entries removed), runs past the head, or ends on another hash is
    reported too: at the first missing seq, the first seq beyond the head, or the last seq.
    """
    prev = GENESIS_HASH
    count = 0
    for position, entry in enumerate(entries, start=1):
        values = _values(entry)
        # values: the CHAIN_FIELDS in order, then hash; [0] is instance_seq, [9] prev_hash.
        if values[0] != position or values[9] != prev:
            return position
        if values[10] != _hash_of(*values[:10]):
            return position
        prev = values[10]
        count = position
    if head is not None:
        head_entries, head_hash = head
        if count < head_entries:
            return count + 1
        if count > head_entries:
            return head_entries + 1
        if count and prev != head_hash:
            return count
        if not count and head_hash != GENESIS_HASH:
            return 1
    return None
