"""The change feed is complete (issue 14): for any event stream, folding the feed reproduces
every service number's and filing's final status, each change names the entry that caused it,
and a consumer that stops anywhere and resumes from its cursor sees every change exactly once.
Run on the real service over in-memory storage (the same ``derive_changes`` as the database)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from events import parse_event_obj
from ledger.changes import fold_feed
from ledger.policy import load_policy
from tests.property.strategies import histories
from tests.support import MemoryLedger

POLICY = load_policy()


@settings(max_examples=300, deadline=None)
@given(events=histories(), batch=st.integers(1, 7))
def test_folding_the_feed_reproduces_every_number_and_filing(events, batch) -> None:
    model = MemoryLedger(POLICY)
    for start in range(0, len(events), batch):
        model.ledger.apply([parse_event_obj(e) for e in events[start : start + batch]])
    changes = model.storage.changes
    folded = fold_feed((c.kind, c.instance_id, c.data) for c in changes)
    numbers = {
        number: issued.status
        for state in model.states.values()
        for number, issued in state.numbers.items()
    }
    filings = {
        (state.instance_id, filing_id): filing.status
        for state in model.states.values()
        for filing_id, filing in state.filings.items()
    }
    assert folded.numbers == numbers
    assert folded.filings == filings
    # The last status change of each instance names its status now (unknown: none at all).
    statuses: dict[str | None, str] = {}
    for change in changes:
        if change.kind == "instance.status_changed":
            assert change.data["from"] == statuses.get(change.instance_id, "unknown")
            statuses[change.instance_id] = change.data["to"]
    for instance_id, state in model.states.items():
        assert statuses.get(instance_id, "unknown") == state.status
    # Every change that names an entry names one that exists, of its instance, at its place.
    entries = {e["event_id"]: e for e in model.storage.entries}
    for change in changes:
        if change.event_id is not None:
            entry = entries[change.event_id]
            assert (entry["instance_id"], entry["instance_seq"]) == (
                change.instance_id,
                change.instance_seq,
            )
            assert change.occurred_at == entry["occurred_at"]


@settings(max_examples=100, deadline=None)
@given(events=histories(), data=st.data())
def test_a_consumer_that_crashes_and_resumes_sees_each_change_once_in_order(events, data) -> None:
    model = MemoryLedger(POLICY)
    model.ledger.apply([parse_event_obj(e) for e in events])
    feed = list(enumerate(model.storage.changes, start=1))
    cursor, seen = 0, []
    while cursor < len(feed):
        limit = data.draw(st.integers(1, 5))
        page = [(p, c) for p, c in feed if p > cursor][:limit]
        # It crashes part way through the page: what it processed is what its cursor says.
        processed = data.draw(st.integers(0, len(page)))
        seen += page[:processed]
        if processed:
            cursor = page[processed - 1][0]
    assert [p for p, _ in seen] == list(range(1, len(feed) + 1))
