"""The one ingest path: parsed input → the valid events enqueued → the invalid ones dead-lettered.

``quota-ledger publish`` (each chunk of its file), ``POST /v1/events`` and the demo's embedded
pipeline all call :func:`ingest`, so the three treat input alike: every item is validated by
the caller's parser (``events.parse_event``, the same for all three), the valid events are
sent with the publisher's sequenced enqueue (``events.publish.enqueue_batches``: each element
numbered per instance under the broker's epoch in the same atomic step as the enqueue,
SPEC §9), and the invalid ones are stored as dead letters through ``Ledger.apply`` (SPEC §5),
never dropped. Each item gets one answer, in input order.

Enqueue first: when the broker is down nothing is recorded and the caller retries the whole
input; a retry after a partial success only enqueues duplicates, which the ledger answers
idempotently, whereas dead letters have no idempotency key and would be stored twice.

How the two steps reach the broker and the database is the caller's (``enqueue`` and
``dead_letter``): the CLI opens the database only when a line is invalid, the HTTP API checks
the broker and bounds the wait, the demo uses its embedded broker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import kombu.exceptions

from events import Event, EventRejection
from events.publish import DEFAULT_BATCH_SIZE, enqueue_batches
from ledger.results import ApplyResult

__all__ = ["BrokerUnavailable", "Ingested", "enqueue_to", "ingest"]

Parsed = Event | EventRejection
#: Sends validated events to the workers; raises :class:`BrokerUnavailable` when it cannot.
Enqueue = Callable[[Sequence[Event]], object]
#: Stores rejections as dead letters; one answer per rejection, in order (``Ledger.apply``).
DeadLetter = Callable[[list[EventRejection]], list[ApplyResult]]


class BrokerUnavailable(Exception):
    """The broker did not take the valid events; nothing of the input was dead-lettered."""


@dataclass(frozen=True)
class Ingested:
    """What became of an input: one answer per item in input order (``queued`` for an
    enqueued event, the dead-letter answer for a rejection), and the events enqueued."""

    answers: list[ApplyResult]
    queued: list[Event]

    @property
    def invalid(self) -> int:
        return sum(1 for answer in self.answers if answer.outcome == "invalid")


def enqueue_to(broker_url: str, *, batch_size: int = DEFAULT_BATCH_SIZE) -> Enqueue:
    """The publisher's sequenced enqueue on ``broker_url``, ``batch_size`` events a message;
    a broker that stays unreachable through the publisher's retries is
    :class:`BrokerUnavailable` (with the publisher's message)."""

    def enqueue(events: Sequence[Event]) -> None:
        try:
            enqueue_batches(events, batch_size=batch_size, broker_url=broker_url)
        except kombu.exceptions.OperationalError as exc:
            raise BrokerUnavailable(str(exc)) from exc

    return enqueue


def ingest(items: Sequence[Parsed], *, enqueue: Enqueue, dead_letter: DeadLetter) -> Ingested:
    """Enqueue the valid ``items``, then dead-letter the invalid ones (see the module doc).

    Raises :class:`BrokerUnavailable` (from ``enqueue``) before anything is dead-lettered."""
    events = [item for item in items if not isinstance(item, EventRejection)]
    rejections = [item for item in items if isinstance(item, EventRejection)]
    if events:
        enqueue(events)
    refused = iter(dead_letter(rejections) if rejections else ())
    answers = [
        next(refused) if isinstance(item, EventRejection) else ApplyResult(item.event_id, "queued")
        for item in items
    ]
    return Ingested(answers, events)
