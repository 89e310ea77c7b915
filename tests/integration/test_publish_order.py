"""SPEC §9 on real processes: events of one instance are applied in publish order, whatever the
number of worker processes, while different instances run in parallel.

The defect this guards against (issue 9): one message per event, a request published right
after its instance's purchase (or conversion, or bandwidth upgrade), consumed by parallel pool
processes. Without the resequencer 7–17 % of the requests overtook the fact they depend on and
were rejected ``instance_unknown`` / ``pay_as_you_go`` / ``no_public_bandwidth``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlmodel import Session

from events.publish import close_producer, publish
from ledger.audit import verify
from ledger.db import make_engine
from ledger.tables import LedgerEntry, ParkedEvent
from tests.helpers import wait_until
from tests.support import Events

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(600)]

MINUTE = 1 / 1440  # tests.support times are in days


def dependent_streams(instances: int, prefix: str) -> list[dict[str, Any]]:
    """Per instance, in publish order: the fact, then (a minute later) the request that needs
    it. A third of the instances are plain purchases; a third are bought pay-as-you-go and
    converted to subscription; a third are ECS bought without public bandwidth and upgraded."""
    ev = Events(prefix)
    events: list[dict[str, Any]] = []
    for number in range(instances):
        iid = f"{prefix}-i{number}"
        kind = number % 3
        if kind == 0:
            events += [ev.purchase(iid, at=0), ev.request(iid, at=MINUTE)]
        elif kind == 1:
            events += [
                ev.purchase(iid, at=0, billing="pay_as_you_go", term=None, expires=None),
                ev.convert(iid, "subscription", at=MINUTE, term=12, expires=365),
                ev.request(iid, at=2 * MINUTE),
            ]
        else:
            events += [
                ev.purchase(iid, at=0, bandwidth=0),
                ev.bandwidth(iid, 5, at=MINUTE),
                ev.request(iid, at=2 * MINUTE),
            ]
    return events


def _outcomes(engine: Any) -> dict[str, Counter[tuple[str, tuple[str, ...]]]]:
    by_type: dict[str, Counter[tuple[str, tuple[str, ...]]]] = {}
    with Session(engine) as session:
        for type_, outcome, reasons in session.execute(
            select(LedgerEntry.type, LedgerEntry.outcome, LedgerEntry.reasons)
        ):
            by_type.setdefault(type_, Counter())[(outcome, tuple(reasons))] += 1
    return by_type


def _count(engine: Any, table: Any) -> int:
    with Session(engine) as session:
        return int(session.execute(select(func.count()).select_from(table)).scalar_one())


@pytest.mark.parametrize(
    "workers",
    [pytest.param((4,), id="one-worker-concurrency-4"), pytest.param((2, 2), id="two-workers")],
)
def test_a_request_published_after_its_fact_is_never_applied_before_it(
    pipeline, workers: tuple[int, ...]
) -> None:
    instances = 2000
    events = dependent_streams(instances, "order")
    for index, concurrency in enumerate(workers):
        pipeline.worker(f"worker-{index}", concurrency=concurrency)
    engine = make_engine(pipeline.database_url)
    try:
        for event in events:  # one message per event, as the defect's publisher did
            publish(event, broker_url=pipeline.broker_url)
        wait_until(
            lambda: _count(engine, LedgerEntry) == len(events),
            timeout=420,
            what=f"{len(events)} entries",
            step=0.5,
        )
        outcomes = _outcomes(engine)
        # Every request found its fact: issued, none rejected for what came before it.
        assert outcomes["service_number.requested"] == Counter({("applied", ()): instances})
        assert outcomes["instance.purchased"] == Counter({("applied", ()): instances})
        assert _count(engine, ParkedEvent) == 0
        report = verify(engine)
        assert report.broken == [] and report.entries == len(events)
    finally:
        engine.dispose()
        close_producer(pipeline.broker_url)
