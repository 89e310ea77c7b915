"""The per-instance resequencer (SPEC §9): *when* an event is applied, never *what* it means.

A stream resequencer in the sense of Enterprise Integration Patterns (Apache Camel's stream
mode): every event the project publishes carries a number ``n`` (1, 2, …) per instance under the
broker's epoch. The gate of an instance lets the next number through, **parks** numbers that
arrive ahead of a gap, releases parked successors in order once the gap is filled, skips a gap
that stayed open for the gap timeout (or when too many events are parked behind it), and lets
through on arrival whatever is already behind it (a redelivery, a late predecessor).

Pure: a :class:`Gate` is plain data loaded under the instance's lock, and every function here
returns the steps to take (apply this input, park it, release that parked number) and moves the
gate. Storage (``ledger/store.py``) loads and writes gates and parked events; the service
(``ledger/service.py``) carries the steps out in the same transaction as the ledger entries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

__all__ = [
    "MAX_RELEASES_PER_TRANSACTION",
    "AlreadyParked",
    "ApplyNow",
    "Gate",
    "Park",
    "Parked",
    "Release",
    "SequenceError",
    "Step",
    "Tag",
    "arrive",
    "parse_sequence",
    "skip_timed_out",
]

log = logging.getLogger(__name__)

#: SPEC §9: at most this many parked events are released for one instance in one transaction;
#: the rest follow in the next one (an arrival or the periodic check), order intact.
MAX_RELEASES_PER_TRANSACTION = 1000


@dataclass(frozen=True)
class Tag:
    """The sequence number of one element of a message."""

    instance_id: str
    epoch: int
    n: int


@dataclass(frozen=True)
class Parked:
    """What the gate knows of one parked number (its payload stays in the store)."""

    n: int
    # Database time; None while it is being parked in this very transaction.
    parked_at: datetime | None
    # False for a number that is filled but has nothing to apply (an element that was
    # dead-lettered when it arrived ahead of a gap).
    has_event: bool = True


@dataclass
class Gate:
    """Resequencer state of one instance: its epoch, the highest filled number, the parked."""

    instance_id: str
    epoch: int | None = None
    last: int = 0
    parked: dict[int, Parked] = field(default_factory=dict)  # numbers of ``epoch``
    # Bookkeeping of the current transaction (not stored).
    released: int = 0
    skipped: int = 0

    @property
    def waiting_for(self) -> int:
        return self.last + 1


# --- steps -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApplyNow:
    """Apply input element ``index`` now."""

    index: int


@dataclass(frozen=True)
class Park:
    """Store input element ``index`` as parked number ``n`` of ``epoch`` (``has_event`` False:
    only the filled number, the element itself was dead-lettered)."""

    index: int
    epoch: int
    n: int
    has_event: bool = True


@dataclass(frozen=True)
class AlreadyParked:
    """Input element ``index`` is parked already (a redelivery): answer ``parked``, store
    nothing."""

    index: int


@dataclass(frozen=True)
class Release:
    """Apply parked number ``n`` of ``epoch`` now and forget it (``has_event`` False: only
    forget it)."""

    instance_id: str
    epoch: int
    n: int
    has_event: bool


Step = ApplyNow | Park | AlreadyParked | Release


# --- the gate ------------------------------------------------------------------------------------


def _drain(gate: Gate) -> list[Release]:
    """Release the parked numbers that are next, in order, within the transaction's budget."""
    steps: list[Release] = []
    while gate.last + 1 in gate.parked and gate.released < MAX_RELEASES_PER_TRANSACTION:
        parked = gate.parked.pop(gate.last + 1)
        gate.last = parked.n
        gate.released += 1
        assert gate.epoch is not None
        steps.append(Release(gate.instance_id, gate.epoch, parked.n, parked.has_event))
    return steps


def _skip_lowest_gap(gate: Gate, why: str) -> list[Release]:
    lowest = min(gate.parked)
    if lowest > gate.last + 1:
        log.warning(
            "resequencer: instance %s epoch %s: skipping number(s) %d..%d (%s); %d parked",
            gate.instance_id,
            gate.epoch,
            gate.last + 1,
            lowest - 1,
            why,
            len(gate.parked),
        )
        gate.last = lowest - 1
        gate.skipped += 1
    return _drain(gate)


def _release_everything(gate: Gate) -> list[Release]:
    """Every parked number of the gate's epoch, in order, gaps skipped (an epoch ends)."""
    steps: list[Release] = []
    if gate.parked:
        log.warning(
            "resequencer: instance %s: epoch %s ends with %d parked event(s); releasing them",
            gate.instance_id,
            gate.epoch,
            len(gate.parked),
        )
    for n in sorted(gate.parked):
        parked = gate.parked.pop(n)
        if n > gate.last + 1:
            gate.skipped += 1
        gate.last = n
        assert gate.epoch is not None
        steps.append(Release(gate.instance_id, gate.epoch, n, parked.has_event))
    return steps


def arrive(gate: Gate, tag: Tag, index: int, *, has_event: bool, max_parked: int) -> list[Step]:
    """An element numbered ``tag`` arrives at ``gate`` (which is ``tag.instance_id``'s).

    ``has_event`` is False for an element that was dead-lettered on arrival: its number is
    filled when it is reached, and nothing is applied for it.
    """
    steps: list[Step] = []
    if gate.epoch is None or tag.epoch > gate.epoch:
        # The first epoch is adopted; a later one first releases the earlier epoch's parked.
        steps += _release_everything(gate)
        gate.epoch, gate.last = tag.epoch, 0
    elif tag.epoch < gate.epoch:
        return [ApplyNow(index)] if has_event else []  # an earlier epoch: on arrival

    steps += _drain(gate)  # what an earlier transaction left ready (its budget ran out)
    n = tag.n
    if n <= gate.last:  # a redelivery, or a predecessor whose gap was skipped
        return [*steps, ApplyNow(index)] if has_event else steps
    if n in gate.parked:
        return [*steps, AlreadyParked(index)] if has_event else steps
    if n == gate.last + 1 and gate.released < MAX_RELEASES_PER_TRANSACTION:
        gate.last = n
        if has_event:
            steps.append(ApplyNow(index))
        return steps + _drain(gate)
    # Ahead of a gap (or behind a run this transaction may not release any more): park it.
    gate.parked[n] = Parked(n, None, has_event)
    steps.append(Park(index, tag.epoch, n, has_event))
    while len(gate.parked) > max_parked and gate.released < MAX_RELEASES_PER_TRANSACTION:
        steps += _skip_lowest_gap(gate, f"more than {max_parked} parked")
    return steps


def skip_timed_out(gate: Gate, *, now: datetime, timeout: float) -> list[Release]:
    """Release what is ready and skip every gap that has waited ``timeout`` seconds.

    A gap's clock starts when the first event behind it was parked, i.e. the earliest
    ``parked_at`` of the numbers above it; the lowest gap is skipped first, and each gap above
    it is then judged by its own clock.
    """
    steps: list[Release] = _drain(gate)
    cutoff = now - timedelta(seconds=timeout)
    while gate.parked and gate.released < MAX_RELEASES_PER_TRANSACTION:
        times = [p.parked_at for p in gate.parked.values() if p.parked_at is not None]
        if not times or min(times) > cutoff:
            break
        steps += _skip_lowest_gap(gate, f"gap open for more than {timeout:g} s")
    return steps


# --- the wire format -------------------------------------------------------------------------


class SequenceError(ValueError):
    """A ``sequence`` keyword argument that is not of the documented shape."""


def parse_sequence(value: Any, elements: int) -> list[Tag | None]:
    """``{"epoch": E, "numbers": [[instance_id, n] | null, …]}`` (one item per element) as
    tags; raises :class:`SequenceError` naming what is wrong."""
    if not isinstance(value, dict) or set(value) != {"epoch", "numbers"}:
        raise SequenceError('sequence must be an object with exactly "epoch" and "numbers"')
    epoch, numbers = value["epoch"], value["numbers"]
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise SequenceError("sequence.epoch must be a non-negative integer")
    if not isinstance(numbers, list) or len(numbers) != elements:
        raise SequenceError(
            f"sequence.numbers must be an array of {elements} item(s), one per element"
        )
    tags: list[Tag | None] = []
    for position, item in enumerate(numbers):
        if item is None:
            tags.append(None)
            continue
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not 1 <= len(item[0]) <= 128
            or not isinstance(item[1], int)
            or isinstance(item[1], bool)
            or item[1] < 1
        ):
            raise SequenceError(
                f"sequence.numbers[{position}] must be null or [instance_id, n] with n >= 1"
            )
        tags.append(Tag(item[0], epoch, item[1]))
    return tags
