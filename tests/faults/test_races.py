"""Races for the last slots (fault suite item 5): four ECS instances (5 websites each) already
have 3 numbers issued; 200 events race for what is left — per instance 25 service-number
requests for the 2 free slots and 25 filings presenting its 3 issued numbers — as 200
one-event messages, shuffled, applied by a real worker with 4 processes. Exactly the cap is
issued (2 more numbers per instance), each number is used by exactly one filing, and every loser
is refused with the right reason.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select
from sqlmodel import Session

from events import validate_event
from events.publish import close_producer, publish_many
from ledger.db import make_engine
from ledger.policy import load_policy
from ledger.queries import show_instance
from ledger.service import Ledger
from ledger.tables import FilingRow, LedgerEntry, ServiceNumberRow
from tests.helpers import wait_until
from tests.helpers.faults import audit_clean, entry_count
from tests.support import Events

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.postgres]

POLICY = load_policy()
INSTANCES = [f"i-race-{n}" for n in range(4)]


@pytest.fixture(autouse=True)
def _close_publishers(redis_url: str):
    yield
    close_producer(redis_url)


@pytest.mark.timeout(120)
def test_two_hundred_racing_requests_and_filings_never_exceed_a_cap(pipeline, figures) -> None:
    engine = make_engine(pipeline.database_url)
    factory = Events("race")
    numbers: dict[str, list[str]] = {}
    try:
        # Before the race: 3 of the 5 slots of each instance are taken.
        setup = []
        for instance in INSTANCES:
            setup.append(factory.purchase(instance))
            setup += [factory.request(instance, at=5 + k / 10) for k in range(3)]
        results = Ledger(engine, POLICY).apply([validate_event(e) for e in setup])
        for event, result in zip(setup, results, strict=True):
            if event["type"] == "service_number.requested":
                assert result.outcome == "applied"
                numbers.setdefault(event["instance_id"], []).append(result.service_number)

        race = []
        for instance in INSTANCES:
            race += [factory.request(instance, at=10 + k / 100) for k in range(25)]
            race += [
                factory.file(
                    instance,
                    numbers[instance][k % 3],
                    at=10 + k / 100,
                    filing=f"F-{instance}-{k}",
                    subject=f"subject-{k % 3}",
                )
                for k in range(25)
            ]
        random.Random(6).shuffle(race)
        worker = pipeline.worker(concurrency=4)
        publish_many(race, batch_size=1, broker_url=pipeline.broker_url)  # 200 messages
        wait_until(lambda: entry_count(engine) >= len(setup) + 200, 60, "the 200 racing events")

        race_ids = [e["event_id"] for e in race]
        with Session(engine) as session:
            rows = session.execute(
                select(
                    LedgerEntry.instance_id,
                    LedgerEntry.type,
                    LedgerEntry.outcome,
                    LedgerEntry.reasons,
                ).where(LedgerEntry.event_id.in_(race_ids))
            ).all()
            issued = Counter(
                session.execute(select(ServiceNumberRow.instance_id, ServiceNumberRow.status)).all()
            )
            reused = session.execute(
                select(FilingRow.service_number, func.count())
                .group_by(FilingRow.service_number)
                .having(func.count() > 1)
            ).all()
            views = {
                i: show_instance(
                    session, instance_id=i, at=datetime(2026, 2, 1, tzinfo=UTC), policy=POLICY
                )
                for i in INSTANCES
            }
    finally:
        engine.dispose()

    outcomes = Counter((r.instance_id, r.type, r.outcome, tuple(r.reasons or ())) for r in rows)
    for instance in INSTANCES:
        req, fil = "service_number.requested", "filing.submitted"
        assert outcomes[(instance, req, "applied", ())] == 2, instance
        assert outcomes[(instance, req, "rejected", ("website_limit_reached",))] == 23, instance
        assert outcomes[(instance, fil, "applied", ())] == 3, instance
        assert outcomes[(instance, fil, "rejected", ("service_number_used",))] == 22, instance
        assert issued[(instance, "used")] == 3 and issued[(instance, "active")] == 2, instance
        assert views[instance]["websites"] == {"cap": 5, "used": 3, "reserved": 2, "remaining": 0}
        assert {f["service_number"] for f in _filings(views[instance])} <= set(numbers[instance])
    assert sum(outcomes.values()) == 200
    assert reused == []  # no number presented by two accepted filings
    processes = set(re.findall(r"ForkPoolWorker-(\d+)\] Task", worker.text()))
    assert len(processes) == 4  # the four processes really took part
    report = audit_clean(pipeline)
    figures.update(
        instances=len(INSTANCES),
        racing_events=200,
        messages=200,
        worker_processes=len(processes),
        numbers_issued_in_race=sum(outcomes[(i, req, "applied", ())] for i in INSTANCES),
        requests_refused_at_cap=sum(
            outcomes[(i, req, "rejected", ("website_limit_reached",))] for i in INSTANCES
        ),
        filings_accepted=sum(outcomes[(i, fil, "applied", ())] for i in INSTANCES),
        filings_refused_number_used=sum(
            outcomes[(i, fil, "rejected", ("service_number_used",))] for i in INSTANCES
        ),
        cap_exceeded=0,
        numbers_used_twice=len(reused),
        verify_ok=report["ok"],
    )


def _filings(view: dict) -> list[dict]:
    by_filing = {sn["filing_id"]: sn["number"] for sn in view["service_numbers"] if sn["filing_id"]}
    return [{**f, "service_number": by_filing[f["filing_id"]]} for f in view["filings"]]
