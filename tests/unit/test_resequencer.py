"""The resequencer's gate (SPEC §9) as pure data: no database, no broker."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.resequencer import (
    MAX_RELEASES_PER_TRANSACTION,
    AlreadyParked,
    ApplyNow,
    Gate,
    Park,
    Parked,
    Release,
    SequenceError,
    Step,
    Tag,
    arrive,
    parse_sequence,
    skip_timed_out,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
EPOCH = 1_700_000_000_000_000


def tag(n: int, epoch: int = EPOCH) -> Tag:
    return Tag("i-1", epoch, n)


def applied(steps: list[Step], numbers: dict[int, int]) -> list[int]:
    """The publish numbers applied by ``steps`` in order (``numbers``: input index → n)."""
    out: list[int] = []
    for step in steps:
        if isinstance(step, ApplyNow):
            out.append(numbers[step.index])
        elif isinstance(step, Release) and step.has_event:
            out.append(step.n)
    return out


def test_in_order_numbers_are_applied_on_arrival() -> None:
    gate = Gate("i-1")
    for n in (1, 2, 3):
        assert arrive(gate, tag(n), n, has_event=True, max_parked=10) == [ApplyNow(n)]
    assert (gate.epoch, gate.last, gate.parked) == (EPOCH, 3, {})


def test_a_number_ahead_parks_and_the_missing_one_releases_the_run_in_order() -> None:
    gate = Gate("i-1")
    assert arrive(gate, tag(3), 0, has_event=True, max_parked=10) == [Park(0, EPOCH, 3)]
    assert arrive(gate, tag(2), 1, has_event=True, max_parked=10) == [Park(1, EPOCH, 2)]
    assert gate.last == 0 and set(gate.parked) == {2, 3}
    steps = arrive(gate, tag(1), 2, has_event=True, max_parked=10)
    assert steps == [
        ApplyNow(2),
        Release("i-1", EPOCH, 2, True),
        Release("i-1", EPOCH, 3, True),
    ]
    assert gate.last == 3 and gate.parked == {}


def test_a_redelivery_is_applied_on_arrival_and_a_parked_one_is_answered_parked() -> None:
    gate = Gate("i-1", EPOCH, last=5)
    assert arrive(gate, tag(4), 0, has_event=True, max_parked=10) == [ApplyNow(0)]
    assert arrive(gate, tag(8), 1, has_event=True, max_parked=10) == [Park(1, EPOCH, 8)]
    assert arrive(gate, tag(8), 2, has_event=True, max_parked=10) == [AlreadyParked(2)]
    assert set(gate.parked) == {8} and gate.last == 5


def test_a_dead_lettered_element_fills_its_number_when_reached() -> None:
    gate = Gate("i-1")
    assert arrive(gate, tag(2), 0, has_event=False, max_parked=10) == [
        Park(0, EPOCH, 2, has_event=False)
    ]
    assert arrive(gate, tag(3), 1, has_event=True, max_parked=10) == [Park(1, EPOCH, 3)]
    steps = arrive(gate, tag(1), 2, has_event=True, max_parked=10)
    # 2 is filled (nothing applied for it), 3 follows.
    assert applied(steps, {2: 1}) == [1, 3]
    assert gate.last == 3


def test_a_later_epoch_first_releases_the_earlier_epochs_parked_then_starts_at_one() -> None:
    gate = Gate("i-1", EPOCH, last=1, parked={3: Parked(3, T0), 5: Parked(5, T0)})
    steps = arrive(gate, tag(1, EPOCH + 1), 0, has_event=True, max_parked=10)
    assert steps == [
        Release("i-1", EPOCH, 3, True),
        Release("i-1", EPOCH, 5, True),
        ApplyNow(0),
    ]
    assert (gate.epoch, gate.last, gate.parked, gate.skipped) == (EPOCH + 1, 1, {}, 2)


def test_an_earlier_epoch_is_applied_on_arrival_and_changes_nothing() -> None:
    gate = Gate("i-1", EPOCH, last=1, parked={3: Parked(3, T0)})
    assert arrive(gate, tag(7, EPOCH - 1), 0, has_event=True, max_parked=10) == [ApplyNow(0)]
    assert (gate.epoch, gate.last, set(gate.parked)) == (EPOCH, 1, {3})


def test_too_many_parked_skips_the_lowest_gap_at_once() -> None:
    gate = Gate("i-1", EPOCH, last=0, parked={3: Parked(3, T0), 6: Parked(6, T0)})
    steps = arrive(gate, tag(7), 0, has_event=True, max_parked=2)
    # 1–2 skipped: 3 released; 6 and 7 stay parked behind the gap at 4–5 (two parked: the cap).
    assert steps == [Park(0, EPOCH, 7), Release("i-1", EPOCH, 3, True)]
    assert gate.last == 3 and set(gate.parked) == {6, 7} and gate.skipped == 1


def test_timed_out_gaps_are_skipped_lowest_first_each_on_its_own_clock() -> None:
    gate = Gate(
        "i-1",
        EPOCH,
        last=1,
        parked={
            3: Parked(3, T0 + timedelta(seconds=10)),
            4: Parked(4, T0),
            7: Parked(7, T0 + timedelta(seconds=50)),
        },
    )
    # At 59 s no gap has waited 60 s.
    assert skip_timed_out(gate, now=T0 + timedelta(seconds=59), timeout=60) == []
    # At 60 s the gap at 2 has (its clock started with 4, parked at 0 s): 3 and 4 go; the gap at
    # 5–6 started with 7 at 50 s and keeps waiting.
    steps = skip_timed_out(gate, now=T0 + timedelta(seconds=60), timeout=60)
    assert [s.n for s in steps] == [3, 4]
    assert gate.last == 4 and set(gate.parked) == {7}
    steps = skip_timed_out(gate, now=T0 + timedelta(seconds=110), timeout=60)
    assert [s.n for s in steps] == [7] and gate.last == 7 and gate.skipped == 2


def test_releases_are_bounded_per_transaction_and_the_rest_follow_in_order() -> None:
    count = MAX_RELEASES_PER_TRANSACTION + 5
    gate = Gate("i-1", EPOCH, last=1, parked={n: Parked(n, T0) for n in range(3, count + 3)})
    steps = arrive(gate, tag(2), 0, has_event=True, max_parked=10_000)
    assert len([s for s in steps if isinstance(s, Release)]) == MAX_RELEASES_PER_TRANSACTION
    # A later arrival in this same transaction parks behind the unreleased run.
    assert arrive(gate, tag(count + 3), 1, has_event=True, max_parked=10_000) == [
        Park(1, EPOCH, count + 3)
    ]
    gate.released = 0  # the next transaction
    rest = skip_timed_out(gate, now=T0, timeout=60)
    assert [s.n for s in rest] == list(range(MAX_RELEASES_PER_TRANSACTION + 3, count + 4))
    assert gate.parked == {}


@settings(max_examples=300, deadline=None)
@given(
    st.permutations(list(range(1, 13))),
    st.lists(st.integers(min_value=1, max_value=12), max_size=6),
)
def test_any_arrival_order_applies_every_number_once_in_publish_order(
    order: list[int], redeliveries: list[int]
) -> None:
    """Whatever order the broker delivers in (redeliveries included), the numbers are applied
    in publish order, each exactly once, as long as no gap times out."""
    gate = Gate("i-1")
    numbers: dict[int, int] = {}
    seen: list[int] = []
    arrivals = order + redeliveries
    for index, n in enumerate(arrivals):
        numbers[index] = n
        for number in applied(arrive(gate, tag(n), index, has_event=True, max_parked=100), numbers):
            if number not in seen:  # else a redelivery: the ledger answers it duplicate
                seen.append(number)
    assert seen == list(range(1, 13))
    assert gate.last == 12 and gate.parked == {}


def test_the_wire_format_is_parsed_and_wrong_shapes_are_named() -> None:
    value = {"epoch": EPOCH, "numbers": [["i-1", 1], None, ["i-2", 7]]}
    assert parse_sequence(value, 3) == [Tag("i-1", EPOCH, 1), None, Tag("i-2", EPOCH, 7)]
    for wrong, elements, says in [
        ([], 1, "exactly"),
        ({"epoch": "1", "numbers": [None]}, 1, "epoch"),
        ({"epoch": 1, "numbers": [None, None]}, 1, "1 item"),
        ({"epoch": 1, "numbers": [["i-1", 0]]}, 1, "numbers[0]"),
        ({"epoch": 1, "numbers": [["i-1", True]]}, 1, "numbers[0]"),
        ({"epoch": 1, "numbers": [[5, 1]]}, 1, "numbers[0]"),
    ]:
        with pytest.raises(SequenceError, match=re.escape(says)):
            parse_sequence(wrong, elements)
