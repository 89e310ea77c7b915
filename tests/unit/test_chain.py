"""The per-instance hash chain (ledger/chain.py): the hash formula and verify_chain."""

from __future__ import annotations

import hashlib
from collections import namedtuple
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.chain import CHAIN_FIELDS, GENESIS_HASH, entry_hash, verify_chain

T0 = datetime(2026, 1, 31, 8, 0, tzinfo=UTC)


def make_chain(n: int, instance_id: str = "i-1") -> list[dict[str, Any]]:
    """n well-formed entries, as the service would record them."""
    entries: list[dict[str, Any]] = []
    prev = GENESIS_HASH
    for seq in range(1, n + 1):
        fields: dict[str, Any] = {
            "instance_seq": seq,
            "event_id": f"{instance_id}:e{seq}",
            "type": "service_number.requested",
            "occurred_at": f"2026-01-{seq:02d}T08:00:00Z",
            "payload": f'{{"event_id":"{instance_id}:e{seq}","网站":"例子.中国"}}',
            "outcome": "applied" if seq % 2 else "rejected",
            "reasons": [] if seq % 2 else ["term_too_short", "no_public_bandwidth"],
            "result": {"service_number": f"SN-{seq}"} if seq % 2 else {},
            "policy_version": "2026.1",
            "prev_hash": prev,
        }
        fields["hash"] = entry_hash(**fields)
        prev = fields["hash"]
        entries.append(fields)
    return entries


def rehash_from(entries: list[dict[str, Any]], start: int) -> None:
    """Recompute hashes and links from position ``start`` (0-based) on: a forger's best effort."""
    prev = entries[start - 1]["hash"] if start else GENESIS_HASH
    for entry in entries[start:]:
        entry["prev_hash"] = prev
        entry["hash"] = entry_hash(**{k: entry[k] for k in CHAIN_FIELDS})
        prev = entry["hash"]


def test_hash_is_sha256_of_the_documented_canonical_json() -> None:
    fields = {
        "instance_seq": 1,
        "event_id": "e-1",
        "type": "instance.purchased",
        "occurred_at": "2026-01-31T08:00:00Z",
        "payload": '{"a":1}',
        "outcome": "applied",
        "reasons": [],
        "result": {"z": 1, "a": "网"},
        "policy_version": "v1",
        "prev_hash": GENESIS_HASH,
    }
    text = (
        '[1,"e-1","instance.purchased","2026-01-31T08:00:00Z","{\\"a\\":1}","applied",[],'
        '{"a":"网","z":1},"v1","' + GENESIS_HASH + '"]'
    )
    assert entry_hash(**fields) == hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.mark.parametrize(
    ("when", "text"),
    [
        (T0, "2026-01-31T08:00:00Z"),
        (datetime(2026, 1, 31, 16, 0, tzinfo=timezone(timedelta(hours=8))), "2026-01-31T08:00:00Z"),
        (T0.replace(microsecond=120), "2026-01-31T08:00:00.000120Z"),
    ],
)
def test_datetime_occurred_at_hashes_as_its_canonical_text(when: datetime, text: str) -> None:
    fields = make_chain(1)[0]
    del fields["hash"]
    assert entry_hash(**{**fields, "occurred_at": when}) == entry_hash(
        **{**fields, "occurred_at": text}
    )


def test_naive_occurred_at_is_refused() -> None:
    fields = make_chain(1)[0]
    del fields["hash"]
    with pytest.raises(ValueError):
        entry_hash(**{**fields, "occurred_at": datetime(2026, 1, 31, 8, 0)})


def test_sound_chains_verify() -> None:
    assert verify_chain([]) is None
    assert verify_chain([], head=(0, GENESIS_HASH)) is None
    chain = make_chain(6)
    assert verify_chain(chain) is None
    assert verify_chain(chain, head=(6, chain[-1]["hash"])) is None


TAMPERED_VALUES: dict[str, Any] = {
    "instance_seq": 99,
    "event_id": "forged",
    "type": "filing.submitted",
    "occurred_at": "2020-01-01T00:00:00Z",
    "payload": "{}",
    "outcome": "stale",
    "reasons": ["instance_expired"],
    "result": {"service_number": "SN-FORGED"},
    "policy_version": "v0",
    "prev_hash": "f" * 64,
    "hash": "e" * 64,
}


@pytest.mark.parametrize("field", [*CHAIN_FIELDS, "hash"])
@pytest.mark.parametrize("position", [1, 3, 5])
def test_any_tampered_field_names_its_seq(field: str, position: int) -> None:
    chain = make_chain(5)
    chain[position - 1][field] = TAMPERED_VALUES[field]
    assert verify_chain(chain) == position


@pytest.mark.parametrize(
    "field", [f for f in CHAIN_FIELDS if f not in ("instance_seq", "prev_hash")]
)
def test_tampering_is_found_even_when_the_forger_rehashes(field: str) -> None:
    """Rehashing the rest of the chain moves the break to the head, which verify compares."""
    chain = make_chain(5)
    head = (5, chain[-1]["hash"])
    chain[2][field] = TAMPERED_VALUES[field]
    rehash_from(chain, 2)
    assert verify_chain(chain) is None  # internally consistent again …
    assert verify_chain(chain, head=head) == 5  # … but it no longer ends on the recorded head


@pytest.mark.parametrize("removed", [1, 2, 4])
def test_removed_entry_is_found(removed: int) -> None:
    chain = make_chain(5)
    del chain[removed - 1]
    assert verify_chain(chain) == removed


def test_removed_last_entries_are_found_against_the_head() -> None:
    chain = make_chain(5)
    head = (5, chain[-1]["hash"])
    assert verify_chain(chain[:3]) is None  # a prefix is a sound chain on its own
    assert verify_chain(chain[:3], head=head) == 4
    assert verify_chain([], head=head) == 1


def test_entries_past_the_head_are_found() -> None:
    chain = make_chain(5)
    assert verify_chain(chain, head=(3, chain[2]["hash"])) == 4


@pytest.mark.parametrize(("at", "broken"), [(1, 2), (3, 3), (6, 6)])
def test_inserted_entry_is_found(at: int, broken: int) -> None:
    """A well-formed entry k of another chain inserted at k. At 1 it is a perfect first entry
    (it links to genesis), so the break shows on the next one, whose seq is 1 again."""
    chain = make_chain(5)
    forged = dict(make_chain(6, instance_id="other")[at - 1])
    chain.insert(at - 1, forged)
    assert verify_chain(chain) == broken


def test_inserted_and_renumbered_entry_is_found() -> None:
    chain = make_chain(5)
    forged = {**chain[1], "event_id": "forged"}
    chain.insert(2, forged)
    for seq, entry in enumerate(chain, start=1):
        entry["instance_seq"] = seq
    assert verify_chain(chain) == 3


@pytest.mark.parametrize(("a", "b"), [(1, 2), (2, 5), (4, 5)])
def test_reordered_entries_are_found(a: int, b: int) -> None:
    chain = make_chain(5)
    chain[a - 1], chain[b - 1] = chain[b - 1], chain[a - 1]
    assert verify_chain(chain) == a


def test_accepts_objects_namedtuples_and_plain_tuples() -> None:
    chain = make_chain(3)
    Entry = namedtuple("Entry", [*CHAIN_FIELDS, "hash"])
    as_namedtuples = [Entry(**e) for e in chain]
    as_tuples = [tuple(e[k] for k in (*CHAIN_FIELDS, "hash")) for e in chain]

    class Obj:
        def __init__(self, **kw: Any) -> None:
            self.__dict__.update(kw)

    as_objects = [Obj(**e) for e in chain]
    for form in (as_namedtuples, as_tuples, as_objects):
        assert verify_chain(form) is None
    as_objects[1].outcome = "stale"
    assert verify_chain(as_objects) == 2


def test_accepts_datetime_occurred_at_as_a_database_row_gives_it() -> None:
    chain = make_chain(3)
    for entry in chain:
        entry["occurred_at"] = datetime.fromisoformat(entry["occurred_at"].replace("Z", "+00:00"))
    assert verify_chain(chain) is None


@given(n=st.integers(1, 8), data=st.data())
def test_any_single_change_is_detected(n: int, data: st.DataObject) -> None:
    chain = make_chain(n)
    position = data.draw(st.integers(1, n))
    field = data.draw(st.sampled_from(["event_id", "payload", "outcome", "policy_version"]))
    chain[position - 1][field] += data.draw(st.text(min_size=1, max_size=3))
    assert verify_chain(chain) == position
