"""Benchmark data: realistic instance stories, as event streams and as bulk-loaded ledgers.

Two forms of the same stories:

* :func:`event_lines` — JSONL events for the write scenarios (embedded ``apply``, Celery). The
  events of many instances are interleaved, as real traffic is.
* :func:`load_ledger` — a ledger of N instances bulk-loaded into PostgreSQL with ``COPY``
  (``ledger_entries``, ``instances``, ``service_numbers``, ``filings``), for the scenarios that
  need millions of entries (query, rebuild, sweep). Publishing millions of events one by one
  would take hours; loading them takes minutes.

The loaded rows are REAL: each (story kind, start time) is recorded once by the pure write path
(``validate_event`` → ``canonical_payload`` → ``ledger.entries.record`` →
``ledger.store.rows.instance_row_values`` / ``number_row_values`` / ``filing_row_values``) on a
placeholder instance id and placeholder service numbers, and every instance then gets that
template with its own ids and its own random service numbers substituted. That is sound because
the rules never look at an id's spelling (no two events of a story share an ``occurred_at``, so
the "greater event id wins a tie" rule never fires), and the hash chain is recomputed per
instance: an entry's hash covers the instance id only through the event id and payload, which
are substituted *before* hashing, each entry's ``prev_hash`` is the previous recomputed hash,
and the projection's head is the last one. :func:`spot_check` re-records sampled instances
through ``record`` with their real ids and compares every row; ``rebuild --check`` over the
whole loaded ledger (the rebuild scenario) must report no drift and no broken chain.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache, lru_cache
from typing import Any

from events import canonical_json, canonical_payload, iso_utc, validate_event
from ledger.entries import record
from ledger.policy import Policy, load_policy
from ledger.state import InstanceState
from ledger.store.rows import filing_row_values, instance_row_values, number_row_values

# The clock of the read and sweep scenarios: every story starts between T0 and T0 + ~120 days;
# "due" instances ended before NOW, every other one is expired, released, pay-as-you-go-free or
# runs well past it.
T0 = datetime(2026, 1, 1, tzinfo=UTC)
NOW = datetime(2026, 9, 1, tzinfo=UTC)
RECORDED_AT = datetime(2026, 9, 1, tzinfo=UTC)
SLOTS = 997  # distinct start times (templates per kind)
SLOT_MINUTES = 173

IID = "zqiidzq"  # placeholder instance id (valid id, valid DNS label)
SN = ("ICP-ZQSN1ZQ", "ICP-ZQSN2ZQ")  # placeholder service numbers
PREV = "zqprevzq"  # placeholder previous hash (in hash material only)
HEAD = "zqheadzq"  # placeholder head hash (in the projection row)


def instance_id(index: int) -> str:
    return f"i-{index:08d}"


def base_time(slot: int) -> datetime:
    return T0 + timedelta(minutes=SLOT_MINUTES * slot)


# --- stories ------------------------------------------------------------------------------------

Story = Callable[[str, datetime, Sequence[str]], list[dict[str, Any]]]


def _ev(iid: str, name: str, type_: str, at: datetime, **fields: Any) -> dict[str, Any]:
    return {
        "event_id": f"{iid}:{name}",
        "type": type_,
        "occurred_at": iso_utc(at),
        "instance_id": iid,
        **fields,
    }


def _filing(iid: str, number: str, at: datetime, product: str, k: int = 1) -> dict[str, Any]:
    return _ev(
        iid,
        f"filing-{k}",
        "filing.submitted",
        at,
        account_id=f"acct-{iid}",
        filing_id=f"F-{iid}-{k}",
        service_number=number,
        product_type=product,
        subject_id=f"subj-{iid}",
        website=f"www{k}.{iid}.example.cn",
    )


def _purchase(iid: str, b: datetime, product: str, **fields: Any) -> dict[str, Any]:
    return _ev(
        iid,
        "purchase",
        "instance.purchased",
        b,
        account_id=f"acct-{iid}",
        product_type=product,
        region="cn-hangzhou",
        **fields,
    )


def _sub(term: int, end: datetime) -> dict[str, Any]:
    return {"billing_method": "subscription", "term_months": term, "expires_at": iso_utc(end)}


def _request(iid: str, k: int, at: datetime) -> dict[str, Any]:
    return _ev(iid, f"request-{k}", "service_number.requested", at, account_id=f"acct-{iid}")


def _renewal(iid: str, at: datetime, term: int, end: datetime) -> dict[str, Any]:
    return _ev(iid, "renew", "instance.renewed", at, term_months=term, expires_at=iso_utc(end))


H, D = timedelta(hours=1), timedelta(days=1)


def story_ecs(iid: str, b: datetime, sn: Sequence[str]) -> list[dict[str, Any]]:
    """ECS: bought without bandwidth, bandwidth added, two numbers, one filed, renewed."""
    return [
        _purchase(iid, b, "ecs", **_sub(12, b + 365 * D), public_bandwidth_mbps=0),
        _ev(iid, "bandwidth", "instance.bandwidth_changed", b + H, public_bandwidth_mbps=10),
        _request(iid, 1, b + 2 * H),
        _request(iid, 2, b + 3 * H),
        _filing(iid, sn[0], b + D, "ecs"),
        _renewal(iid, b + 30 * D, 12, b + 730 * D),
    ]


def story_vhost(iid: str, b: datetime, sn: Sequence[str]) -> list[dict[str, Any]]:
    """Virtual host: a number filed and withdrawn (frees nothing), a second number."""
    return [
        _purchase(iid, b, "virtual_host", **_sub(12, b + 365 * D)),
        _request(iid, 1, b + H),
        _filing(iid, sn[0], b + D, "virtual_host"),
        _ev(iid, "withdraw-1", "filing.withdrawn", b + 2 * D, filing_id=f"F-{iid}-1"),
        _request(iid, 2, b + 3 * D),
    ]


def story_nat_renewed(iid: str, b: datetime, sn: Sequence[str]) -> list[dict[str, Any]]:
    """NAT gateway: one month, expired (number invalidated), renewed in grace, new number."""
    end = b + 31 * D
    return [
        _purchase(iid, b, "nat_gateway", **_sub(1, end)),
        _request(iid, 1, b + H),
        _ev(
            iid,
            "expired",
            "instance.expired",
            end + timedelta(seconds=5),
            expires_at=iso_utc(end),
        ),
        _renewal(iid, b + 40 * D, 12, b + 405 * D),
        _request(iid, 2, b + 41 * D),
    ]


def story_payg(iid: str, b: datetime, sn: Sequence[str]) -> list[dict[str, Any]]:
    """Pay-as-you-go ECS: refused, converted to subscription, then issued."""
    return [
        _purchase(iid, b, "ecs", billing_method="pay_as_you_go", public_bandwidth_mbps=5),
        _request(iid, 1, b + H),
        _ev(iid, "convert", "instance.billing_converted", b + D, **_sub(12, b + 366 * D)),
        _request(iid, 2, b + 2 * D),
    ]


def story_marketplace(iid: str, b: datetime, sn: Sequence[str]) -> list[dict[str, Any]]:
    """Marketplace site: issued, filed, then released."""
    return [
        _purchase(iid, b, "marketplace", **_sub(12, b + 365 * D), order_amount_cny="199.00"),
        _request(iid, 1, b + H),
        _filing(iid, sn[0], b + D, "marketplace"),
        _ev(iid, "release", "instance.released", b + 60 * D),
    ]


def story_due(iid: str, b: datetime, sn: Sequence[str]) -> list[dict[str, Any]]:
    """NAT gateway, one month, one number, never renewed: due for the sweep at NOW."""
    return [
        _purchase(iid, b, "nat_gateway", **_sub(1, b + 31 * D)),
        _request(iid, 1, b + H),
    ]


STORIES: dict[str, Story] = {
    "ecs": story_ecs,
    "vhost": story_vhost,
    "nat_renewed": story_nat_renewed,
    "payg": story_payg,
    "marketplace": story_marketplace,
    "due": story_due,
}
# Mean 5.125 entries per instance (41 / 8).
CYCLE = ("ecs", "vhost", "nat_renewed", "ecs", "payg", "marketplace", "ecs", "vhost")


def is_due(index: int, instances: int, due: int) -> bool:
    """``due`` of ``instances`` indices, spread evenly."""
    return (index + 1) * due // instances > index * due // instances


def kind_of(index: int, instances: int, due: int) -> str:
    return "due" if is_due(index, instances, due) else CYCLE[index % len(CYCLE)]


def slot_of(index: int) -> int:
    return (index * 7919) % SLOTS


def entries_per_instance(kind: str) -> int:
    return len(STORIES[kind](IID, T0, SN))


def expected_entries(instances: int, due: int) -> int:
    return sum(entries_per_instance(kind_of(i, instances, due)) for i in range(instances))


# --- event streams ------------------------------------------------------------------------------


def event_lines(count: int, *, window: int = 200, prefix: str = "") -> list[str]:
    """``count`` JSONL events of interleaved stories (no due instances).

    Within each window of ``window`` instances, the stories advance one step at a time across
    all of them, so a batch mixes many instances, as real traffic does. A publisher cannot know
    the random service numbers the ledger will issue, so the stories' filings present a number
    the ledger does not know: they are decided and refused (``service_number_invalid``), and
    the withdrawals that follow them refused too (``filing_unknown``).
    """
    lines: list[str] = []
    for start in itertools.count(0, window):
        stories = []
        for index in range(start, start + window):
            iid = f"{prefix}{instance_id(index)}"
            numbers = [f"ICP-NOT-ISSUED-{iid}-{k}" for k in (1, 2)]
            kind = CYCLE[index % len(CYCLE)]
            stories.append(STORIES[kind](iid, base_time(slot_of(index)), numbers))
        for step in range(max(len(s) for s in stories)):
            for story in stories:
                if step < len(story):
                    lines.append(json.dumps(story[step], separators=(",", ":")))
                    if len(lines) >= count:
                        return lines
    raise AssertionError("unreachable")


# --- templates ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """One story kind at one start time, recorded on placeholder ids.

    Strings hold the placeholders :data:`IID`, :data:`SN`, :data:`PREV`, :data:`HEAD`.
    """

    # Per entry: the COPY fields but ``prev_hash``/``hash``, and the hash material.
    entries: tuple[tuple[str, ...], ...]
    materials: tuple[str, ...]
    instance: tuple[str, ...]  # COPY fields of the ``instances`` row (state has HEAD)
    numbers: tuple[tuple[str, ...], ...]
    filings: tuple[tuple[str, ...], ...]
    numbers_used: int


def _copy_value(value: Any) -> str:
    """One field in PostgreSQL COPY text format (the templates never need escaping)."""
    if value is None:
        return "\\N"
    if isinstance(value, datetime):
        return iso_utc(value)
    if isinstance(value, dict | list):
        return canonical_json(value)
    return str(value)


def _hash_material(fields: dict[str, Any], prev: str) -> str:
    """Exactly ``ledger.chain.entry_hash``'s text, with ``prev`` as the previous hash."""
    material = [
        fields["instance_seq"],
        fields["event_id"],
        fields["type"],
        fields["occurred_at"],
        fields["payload"],
        fields["outcome"],
        list(fields["reasons"]),
        dict(fields["result"]),
        fields["policy_version"],
        prev,
    ]
    return canonical_json(material)


def record_story(
    kind: str, iid: str, slot: int, numbers: Sequence[str], policy: Policy
) -> tuple[list[dict[str, Any]], InstanceState]:
    """The real write path, minus storage: the entries' fields and the final state."""
    issued = iter(numbers)
    state = InstanceState(iid)
    entries = []
    for data in STORIES[kind](iid, base_time(slot), numbers):
        event = validate_event(data)
        fields, state = record(
            state,
            event,
            payload=canonical_payload(event),
            policy=policy,
            new_number=lambda: next(issued),
        )
        fields["instance_id"] = iid
        entries.append(fields)
    return entries, state


@cache
def template(kind: str, slot: int) -> Template:
    policy = _policy()
    entries, state = record_story(kind, IID, slot, SN, policy)
    rows, materials = [], []
    prev = "0" * 64
    for fields in entries:
        material = _hash_material(fields, PREV)
        # The template must hash exactly like the real chain does.
        assert hashlib.sha256(material.replace(PREV, prev).encode()).hexdigest() == fields["hash"]
        prev = fields["hash"]
        rows.append(
            tuple(
                _copy_value(fields[name])
                for name in (
                    "instance_id",
                    "instance_seq",
                    "event_id",
                    "type",
                    "occurred_at",
                    "payload",
                    "outcome",
                    "reasons",
                    "result",
                    "policy_version",
                )
            )
        )
        materials.append(material)
    values = instance_row_values(state, RECORDED_AT)
    assert values["head_hash"] == prev
    values["head_hash"] = HEAD
    values["state"] = {**values["state"], "head_hash": HEAD}
    instance = tuple(
        _copy_value(values[name])
        for name in (
            "instance_id",
            "account_id",
            "product_type",
            "region",
            "billing_method",
            "expires_at",
            "status",
            "entries",
            "head_hash",
            "state",
            "updated_at",
        )
    )
    numbers = tuple(
        tuple(_copy_value(v) for v in number_row_values(IID, n).values())
        for n in state.numbers.values()
    )
    filings = tuple(
        tuple(_copy_value(v) for v in filing_row_values(IID, f).values())
        for f in state.filings.values()
    )
    # COPY text needs no escaping as long as no field holds a backslash, tab or newline.
    copied = itertools.chain(instance, *rows, *numbers, *filings)
    assert not any(("\\" in t or "\t" in t or "\n" in t) for t in copied if t != "\\N")
    return Template(tuple(rows), tuple(materials), instance, numbers, filings, len(state.numbers))


@lru_cache(maxsize=1)
def _policy() -> Policy:
    return load_policy()


# --- filling templates --------------------------------------------------------------------------

ENTRY_COLUMNS = (
    "instance_id",
    "instance_seq",
    "event_id",
    "type",
    "occurred_at",
    "payload",
    "outcome",
    "reasons",
    "result",
    "policy_version",
    "recorded_at",
    "prev_hash",
    "hash",
)
INSTANCE_COLUMNS = (
    "instance_id",
    "account_id",
    "product_type",
    "region",
    "billing_method",
    "expires_at",
    "status",
    "entries",
    "head_hash",
    "state",
    "updated_at",
)
NUMBER_COLUMNS = (
    "number",
    "instance_id",
    "status",
    "issued_at",
    "issue_order",
    "filing_id",
    "website",
    "subject_id",
    "used_at",
    "invalidated_at",
    "invalidated_reason",
)
FILING_COLUMNS = (
    "instance_id",
    "filing_id",
    "service_number",
    "website",
    "subject_id",
    "status",
    "accepted_at",
    "accept_order",
    "withdrawn_at",
)


def random_numbers(count: int) -> list[str]:
    """Service numbers exactly as ``ledger.numbers.new_service_number`` makes them (96 random
    bits from the OS CSPRNG), drawn in bulk."""
    raw = os.urandom(12 * count).hex().upper()
    return ["ICP-" + raw[24 * k : 24 * k + 24] for k in range(count)]


class _Filler:
    def __init__(self, iid: str, numbers: Sequence[str]) -> None:
        self.pairs = [(IID, iid), *zip(SN, numbers, strict=False)]

    def __call__(self, text: str) -> str:
        for old, new in self.pairs:
            if old in text:
                text = text.replace(old, new)
        return text


@dataclass
class InstanceRows:
    entries: list[str]  # COPY lines
    instance: str
    numbers: list[str]
    filings: list[str]


def instance_rows(index: int, instances: int, due: int, numbers: Sequence[str]) -> InstanceRows:
    """The COPY lines of one instance of a loaded ledger."""
    tmpl = template(kind_of(index, instances, due), slot_of(index))
    fill = _Filler(instance_id(index), numbers)
    recorded = _copy_value(RECORDED_AT)
    prev = "0" * 64
    lines = []
    for row, material in zip(tmpl.entries, tmpl.materials, strict=True):
        digest = hashlib.sha256(fill(material).replace(PREV, prev).encode()).hexdigest()
        lines.append("\t".join([*(fill(v) for v in row), recorded, prev, digest]) + "\n")
        prev = digest
    instance = "\t".join(fill(v) for v in tmpl.instance).replace(HEAD, prev) + "\n"
    return InstanceRows(
        lines,
        instance,
        ["\t".join(fill(v) for v in row) + "\n" for row in tmpl.numbers],
        ["\t".join(fill(v) for v in row) + "\n" for row in tmpl.filings],
    )


def spot_check(index: int, instances: int, due: int, numbers: Sequence[str]) -> None:
    """Re-record instance ``index`` through ``record`` with its real ids and numbers and check
    that the templated rows are exactly the real ones. Raises AssertionError otherwise."""
    kind = kind_of(index, instances, due)
    iid = instance_id(index)
    entries, state = record_story(kind, iid, slot_of(index), numbers, _policy())
    rows = instance_rows(index, instances, due, numbers)
    recorded = _copy_value(RECORDED_AT)
    for fields, line in zip(entries, rows.entries, strict=True):
        want = [_copy_value(fields[name]) for name in ENTRY_COLUMNS if name != "recorded_at"]
        got = line.rstrip("\n").split("\t")
        assert got.pop(10) == recorded
        assert got == want, (iid, got, want)
    values = instance_row_values(state, RECORDED_AT)
    want_instance = [_copy_value(values[name]) for name in INSTANCE_COLUMNS]
    got_instance = rows.instance.rstrip("\n").split("\t")
    assert got_instance[:9] == want_instance[:9], (got_instance, want_instance)
    assert json.loads(got_instance[9]) == values["state"]
    want_numbers = [
        "\t".join(_copy_value(v) for v in number_row_values(iid, n).values()) + "\n"
        for n in state.numbers.values()
    ]
    assert rows.numbers == want_numbers
    want_filings = [
        "\t".join(_copy_value(v) for v in filing_row_values(iid, f).values()) + "\n"
        for f in state.filings.values()
    ]
    assert rows.filings == want_filings


# --- bulk loading -------------------------------------------------------------------------------

LOAD_CHUNK = 4000  # instances per COPY round (their entries interleaved by step)


def _numbers_for(index: int, instances: int, due: int) -> int:
    return template(kind_of(index, instances, due), slot_of(index)).numbers_used


def _load_chunk(args: tuple[str, int, int, int, int]) -> int:
    """Generate and COPY instances [start, stop); returns the entries written."""
    import psycopg

    url, start, stop, instances, due = args
    entries: list[list[str]] = []
    buffers = {name: io.StringIO() for name in ("instances", "numbers", "filings")}
    written = 0
    for index in range(start, stop):
        numbers = random_numbers(_numbers_for(index, instances, due))
        rows = instance_rows(index, instances, due, numbers)
        entries.append(rows.entries)
        buffers["instances"].write(rows.instance)
        buffers["numbers"].writelines(rows.numbers)
        buffers["filings"].writelines(rows.filings)
        written += len(rows.entries)
    # Interleave: step 1 of every instance, then step 2, … (seq order mixes instances).
    ledger = io.StringIO()
    for step in range(max(len(e) for e in entries)):
        ledger.writelines(e[step] for e in entries if step < len(e))
    with psycopg.connect(url) as conn:
        conn.execute("SET synchronous_commit = off")
        with conn.cursor() as cur:
            for table, columns, data in (
                ("ledger_entries", ENTRY_COLUMNS, ledger),
                ("instances", INSTANCE_COLUMNS, buffers["instances"]),
                ("service_numbers", NUMBER_COLUMNS, buffers["numbers"]),
                ("filings", FILING_COLUMNS, buffers["filings"]),
            ):
                with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                    copy.write(data.getvalue())
    return written


def load_ledger(
    url: str,
    *,
    instances: int,
    due: int,
    processes: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Bulk-load ``instances`` instances (``due`` of them due for the sweep at :data:`NOW`)
    into the empty database at ``url``; returns the number of ledger entries. Runs
    ``VACUUM ANALYZE`` at the end, as an operator's autovacuum would have, and a
    ``CHECKPOINT``."""
    import psycopg

    chunks = [
        (url, start, min(start + LOAD_CHUNK, instances), instances, due)
        for start in range(0, instances, LOAD_CHUNK)
    ]
    processes = processes or min(2, os.cpu_count() or 1)
    total = 0
    if processes > 1 and len(chunks) > 1:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(processes) as pool:
            for written in pool.imap_unordered(_load_chunk, chunks):
                total += written
                if progress:
                    progress(written)
    else:
        for chunk in chunks:
            written = _load_chunk(chunk)
            total += written
            if progress:
                progress(written)
    with psycopg.connect(url, autocommit=True) as conn:
        for table in ("ledger_entries", "instances", "service_numbers", "filings"):
            conn.execute(f"VACUUM ANALYZE {table}")
        # The load wrote gigabytes: flush them now, so that no checkpoint triggered by the load
        # is still writing while a scenario measures (needs superuser or pg_checkpoint).
        with contextlib.suppress(psycopg.Error):
            conn.execute("CHECKPOINT")
    return total


def scaled(value: float, scale: float, minimum: int) -> int:
    return max(minimum, math.ceil(value * scale))


def iter_chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
