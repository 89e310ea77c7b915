"""The one ingest path (``worker.ingest``) that ``publish``, ``POST /v1/events`` and the demo
share: answers in input order, the broker before the dead letters, nothing dead-lettered when
the broker refuses."""

from __future__ import annotations

import json
from collections.abc import Sequence

import kombu.exceptions
import pytest

from events import Event, EventRejection, parse_event
from ledger.results import ApplyResult, invalid_result
from tests.support import Events
from worker.ingest import BrokerUnavailable, enqueue_to, ingest


def _items() -> list[Event | EventRejection]:
    factory = Events("ing")
    lines = [
        json.dumps(factory.purchase("i-ing-1")),
        "not json",
        json.dumps(factory.purchase("i-ing-2")),
        json.dumps({**factory.request("i-ing-1"), "extra": 1}),
    ]
    return [parse_event(line) for line in lines]


def test_valid_events_are_enqueued_before_the_invalid_are_dead_lettered() -> None:
    items = _items()
    steps: list[tuple[str, list[str | None]]] = []

    def enqueue(events: Sequence[Event]) -> None:
        steps.append(("enqueue", [event.event_id for event in events]))

    def dead_letter(rejections: list[EventRejection]) -> list[ApplyResult]:
        steps.append(("dead_letter", [rejection.event_id for rejection in rejections]))
        return [invalid_result(r.code, r.error, r.event_id) for r in rejections]

    done = ingest(items, enqueue=enqueue, dead_letter=dead_letter)

    valid = [item for item in items if not isinstance(item, EventRejection)]
    assert [step for step, _ in steps] == ["enqueue", "dead_letter"]
    assert steps[0][1] == [event.event_id for event in valid]
    assert done.queued == valid
    assert [answer.outcome for answer in done.answers] == ["queued", "invalid"] * 2
    assert done.answers[0] == ApplyResult(valid[0].event_id, "queued")
    assert done.answers[1].reasons == ("invalid_event",)
    assert done.invalid == 2


def test_a_refusing_broker_dead_letters_nothing() -> None:
    def enqueue(events: Sequence[Event]) -> None:
        raise BrokerUnavailable("down")

    def dead_letter(rejections: list[EventRejection]) -> list[ApplyResult]:
        raise AssertionError("dead-lettered although the broker refused the events")

    with pytest.raises(BrokerUnavailable):
        ingest(_items(), enqueue=enqueue, dead_letter=dead_letter)


def test_without_valid_events_the_broker_is_not_needed() -> None:
    rejections = [item for item in _items() if isinstance(item, EventRejection)]

    def enqueue(events: Sequence[Event]) -> None:
        raise AssertionError("the broker was asked for nothing")

    done = ingest(
        rejections,
        enqueue=enqueue,
        dead_letter=lambda r: [invalid_result(x.code, x.error, x.event_id) for x in r],
    )
    assert done.queued == [] and done.invalid == len(rejections)
    assert ingest([], enqueue=enqueue, dead_letter=lambda r: []).answers == []


def test_the_publishers_broker_error_becomes_broker_unavailable(monkeypatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> int:
        raise kombu.exceptions.OperationalError("broker unreachable for 20 s: refused")

    monkeypatch.setattr("worker.ingest.enqueue_batches", refuse)
    valid = [item for item in _items() if not isinstance(item, EventRejection)]
    with pytest.raises(BrokerUnavailable, match="broker unreachable for 20 s: refused"):
        enqueue_to("redis://127.0.0.1:1/0")(valid)
