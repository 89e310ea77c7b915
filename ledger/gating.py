"""Carrying out the resequencer's steps (SPEC §9) in the service's transaction.

``ledger.resequencer`` says, per numbered element, whether it is applied now, parked, or already
parked, and which parked numbers are released. :func:`plan` turns those steps into what the
service applies now and in which order — the inputs and the released parked events (fetched from
the store), interleaved as the gate released them — plus the rows to park and the numbers
released. Elements answered ``parked`` get that answer here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from events import Event, EventRejection, canonical_payload, parse_event
from ledger.resequencer import (
    AlreadyParked,
    ApplyNow,
    Gate,
    Park,
    Release,
    Step,
    Tag,
    arrive,
    skip_timed_out,
)
from ledger.results import ApplyResult, storable_text
from ledger.store.parking import ParkedRow

__all__ = ["Plan", "open_gates", "plan"]

Parsed = Event | EventRejection
Refuse = Callable[[int, str, str, str | None, str], None]


class ParkedSource(Protocol):
    def parked(self, releases: Sequence[Release]) -> dict[tuple[str, int, int], ParkedRow]: ...


class GateSource(Protocol):
    def gates(self, instance_ids: Sequence[str]) -> dict[str, Gate]: ...
    def now(self) -> datetime: ...


def open_gates(
    store: GateSource, tags: Sequence[Tag | None], gate_checks: Sequence[str], *, timeout: float
) -> tuple[dict[str, Gate], list[Step]]:
    """The gates of the numbered instances (loaded under their locks), and the steps of the
    periodic check's skips: for each of ``gate_checks``, its gaps timed out by the database's
    clock (read once)."""
    gated = sorted({tag.instance_id for tag in tags if tag is not None} | set(gate_checks))
    gates = store.gates(gated) if gated else {}
    steps: list[Step] = []
    now = store.now() if gate_checks else None
    for instance_id in gate_checks:
        assert now is not None
        steps += skip_timed_out(gates[instance_id], now=now, timeout=timeout)
    return gates, steps


@dataclass
class Plan:
    """``apply``: ``(order, event, raw)`` in the order to apply them (``order`` is the input
    index, or past the inputs for a released parked event); ``parked``: rows to store;
    ``released``: numbers to forget."""

    apply: list[tuple[int, Event, str | None]] = field(default_factory=list)
    parked: list[dict[str, Any]] = field(default_factory=list)
    released: list[Release] = field(default_factory=list)


def plan(
    store: ParkedSource,
    items: Sequence[Parsed],
    raws: Sequence[str | None],
    tags: Sequence[Tag | None],
    gates: dict[str, Gate],
    checked: list[Step],
    results: list[ApplyResult | None],
    refuse: Refuse,
    max_parked: int,
) -> Plan:
    """Pass ``items`` through their gates (``checked``: steps the periodic check already took)."""
    steps = list(checked)
    for index, (item, tag) in enumerate(zip(items, tags, strict=True)):
        if tag is None:
            if not isinstance(item, EventRejection):
                steps.append(ApplyNow(index))
            continue
        has_event = not isinstance(item, EventRejection)
        if not isinstance(item, EventRejection) and item.instance_id != tag.instance_id:
            error = (
                f"sequence names instance {tag.instance_id!r}, the event is of {item.instance_id!r}"
            )
            raw = raws[index] or canonical_payload(item)
            refuse(index, "invalid_event", error, item.event_id, raw)
            has_event = False
        gate = gates[tag.instance_id]
        steps += arrive(gate, tag, index, has_event=has_event, max_parked=max_parked)

    work = Plan(released=[step for step in steps if isinstance(step, Release)])
    # Numbers parked by this very transaction are not in the store yet.
    parked_here = {
        (tags[s.index].instance_id, s.epoch, s.n): s  # type: ignore[union-attr]
        for s in steps
        if isinstance(s, Park)
    }
    wanted = [r for r in work.released if r.has_event and _key(r) not in parked_here]
    stored = store.parked(wanted) if wanted else {}
    extra = len(items)  # orders of released parked events: after every input
    for step in steps:
        if isinstance(step, ApplyNow):
            work.apply.append(_input(items, raws, step.index))
        elif isinstance(step, AlreadyParked) or (isinstance(step, Park) and step.has_event):
            results[step.index] = ApplyResult(items[step.index].event_id, "parked")
        elif isinstance(step, Release):
            here = parked_here.pop(_key(step), None)
            if here is not None:  # parked and released by this very transaction
                if here.has_event:
                    work.apply.append(_input(items, raws, here.index))
                continue
            row = stored.get(_key(step))
            if not step.has_event or row is None or row.raw is None:
                continue
            extra += 1
            parsed = parse_event(row.raw)
            if isinstance(parsed, EventRejection) or parsed.instance_id != step.instance_id:
                error = getattr(parsed, "error", "the parked event names another instance")
                refuse(extra, "processing_error", error, row.event_id, row.raw)
                continue
            work.apply.append((extra, parsed, row.raw))
    work.parked = [
        _parked_row(items, raws, instance_id, step)
        for (instance_id, _, _), step in parked_here.items()
    ]
    return work


def _key(release: Release) -> tuple[str, int, int]:
    return release.instance_id, release.epoch, release.n


def _input(
    items: Sequence[Parsed], raws: Sequence[str | None], index: int
) -> tuple[int, Event, str | None]:
    item = items[index]
    assert not isinstance(item, EventRejection)
    return index, item, raws[index]


def _parked_row(
    items: Sequence[Parsed], raws: Sequence[str | None], instance_id: str, step: Park
) -> dict[str, Any]:
    item = items[step.index]
    row: dict[str, Any] = {
        "instance_id": instance_id,
        "epoch": step.epoch,
        "n": step.n,
        "event_id": item.event_id,
        "type": None,
        "raw": None,  # a filled placeholder: the element was dead-lettered
    }
    if step.has_event and not isinstance(item, EventRejection):
        text = raws[step.index] or canonical_payload(item)
        row.update(type=item.type, raw=storable_text(text))
    return row
