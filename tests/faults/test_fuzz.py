"""Fuzzed input (fault suite item 7): hypothesis-generated malformed and hostile events — wrong
types, missing and extra fields, huge strings, deep nesting, duplicate keys, unicode tricks
(NUL, lone surrogates, RTL and zero-width marks, full-width letters, a BOM), SQL- and
template-looking strings, numbers at and past every limit, truncated and corrupted lines — sent
through every entry point against a real PostgreSQL, a real Redis and a real worker:

- ``Ledger.apply_lines`` (what ``quota-ledger apply`` runs), in process;
- ``events.publish.publish_many``: raises ``InvalidEvents`` naming exactly the invalid ones and
  sends nothing, else sends everything; never another exception;
- ``POST /v1/events`` (FastAPI TestClient, which re-raises any server exception): 202 with the
  invalid ones listed, never a 500;
- at the end, all the lines again through the real ``quota-ledger apply`` and
  ``quota-ledger publish`` commands (subprocesses): one answer per line, no traceback.

Every line is applied (``applied``, ``rejected``, ``stale``, ``duplicate``) or refused with a
dead-letter code and a reason, the same lines are refused on every path, every refused line is
in the dead-letter store, every queued event reaches the ledger through the worker, nothing is a
``processing_error``; afterwards ``verify`` and ``rebuild --check`` pass and no cap is exceeded.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import warnings
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlmodel import Session

from events.codec import parse_event, parse_event_obj
from events.models import BaseEvent
from events.publish import InvalidEvents, close_producer, publish_many
from ledger.db import make_engine
from ledger.policy import load_policy
from ledger.queries import show_instance
from ledger.service import Ledger
from ledger.settings import Settings
from tests.helpers import wait_until
from tests.helpers.faults import audit_clean, redis_queue_state
from tests.support import Events
from worker.api import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.postgres]

POLICY = load_policy()
INGEST_TOKEN = "ingest-token-0123456789abcdef"
PLACEHOLDER = "@@EVENT-ID@@"
INSTANCES = ["fz-a", "fz-b", "fz-c", "fz-d"]
PARSE_CODES = {"too_large", "invalid_event"}
LEDGER_OUTCOMES = {"applied", "rejected", "stale", "duplicate"}

# --- what is hostile -------------------------------------------------------------------------

HOSTILE_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "ecs\x00",
    "\u202eevil\u202c",
    "acct\u200f-1",
    "fz-a\u200b",
    "\ufeffecs",
    "\ud800",
    "a\udfffb",
    "Ａ",
    "ｅｃｓ",
    "ECS",
    "subscription ",
    "i-\u0430",  # Cyrillic a
    "' OR '1'='1",
    "'; DROP TABLE ledger_entries; --",
    "Robert'); DELETE FROM dead_letters;--",
    "%s%s%n",
    "${jndi:ldap://x}",
    "{{7*7}}",
    "<script>alert(1)</script>",
    "../../etc/passwd",
    "x" * 64,
    "x" * 65,
    "x" * 128,
    "x" * 129,
    "x" * 200,
    "x" * 201,
    "9" * 5000,
    "y" * 70_000,
    "2026-01-01T00:00:00",
    "2026-01-01T00:00:00Z\x00",
    "2026-01-01 00:00:00+00:00",
    "9999-12-31T23:59:59-23:59",
    "9999-12-31T23:59:59Z",
    "0001-01-01T00:00:00+01:00",
    "0001-01-01T00:00:00Z",
    "2026-02-30T00:00:00Z",
    "2026-13-01T00:00:00Z",
    "2026-01-01T24:00:00Z",
    "+002026-01-01T00:00:00Z",
    "2026-01-01T00:00:00.9999999999Z",
    "1e309",
    "NaN",
    "-0",
    "0x10",
    "１２",
    "例え.テスト",
    "xn--",
    "xn--zz.com",
    "a..b",
    "-a.com",
    ".",
    "a" * 64 + ".com",
    ("a" * 63 + ".") * 4 + "com",
    "ex\u00adample.com",
    "EXAMPLE.COM.",
    "exa mple.com",
    "ICP-" + "0" * 24,
]
HOSTILE_NUMBERS = [
    0,
    -1,
    1,
    120,
    121,
    2**31,
    2**53 + 1,
    2**63 - 1,
    2**63,
    -(2**63) - 1,
    10**30,
    1e308,
    -1e308,
    5e-324,
    -0.0,
    0.5,
    12.0,
    99.99999999999999,
    float("inf"),
    float("nan"),
]
FIELDS = [
    "event_id",
    "type",
    "occurred_at",
    "instance_id",
    "schema_version",
    "account_id",
    "product_type",
    "region",
    "billing_method",
    "term_months",
    "expires_at",
    "public_bandwidth_mbps",
    "order_amount_cny",
    "filing_id",
    "service_number",
    "subject_id",
    "website",
]


def _nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = [value] if depth % 2 else {"k": value}
    return value


hostile_values = st.one_of(
    st.sampled_from(HOSTILE_STRINGS),
    st.sampled_from(HOSTILE_NUMBERS),
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=40),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.integers(min_value=1, max_value=400).map(_nested),
)

# Valid, but at an edge: the ledger (not the parser) has to cope with these.
edge_values = st.sampled_from(
    [
        "0001-01-01T00:00:00Z",
        "0001-01-01T00:00:00+00:00",
        "9999-12-31T23:59:59Z",
        "9999-12-31T23:59:59.999999+00:00",
        "2026-01-01T00:00:00+14:00",
        "2026-01-01T00:00:00-12:00",
        "1970-01-01T00:00:00Z",
        1,
        120,
        0,
        0.0,
        1e308,
        2**63,
        10**30,
        "0",
        "0.00",
        "99",
        "98.999999999999999999",
        "1e3",
        "9" * 200,
        "x" * 128,
        "a" * 200,
        "xn--fsqu00a.xn--3lr804guic",
        "例え.テスト",
        "A.B.C.D.example.COM",
        "a" * 63 + ".com",
        "cn-hongkong",
        "cn-" + "z" * 61,
        "chengxintong_shop",
        "pay_as_you_go",
        "!#$%&()*+,./:;<=>?@[]^_`{|}~",
    ]
)

mutations = st.one_of(
    st.just(("none",)),
    st.just(("none",)),
    st.tuples(st.just("set"), st.sampled_from(FIELDS), hostile_values),
    st.tuples(st.just("set_own"), st.floats(min_value=0, max_value=0.999), hostile_values),
    st.tuples(st.just("set_own"), st.floats(min_value=0, max_value=0.999), edge_values),
    st.tuples(st.just("size"), st.sampled_from([-1, 0, 1]), st.sampled_from(["y", "é", "😀"])),
    st.tuples(st.just("drop"), st.sampled_from(FIELDS)),
    st.tuples(
        st.just("extra"), st.sampled_from(["", "x", "\x00", "type ", "EVENT_ID"]), hostile_values
    ),
    st.tuples(st.just("replace"), hostile_values),
    st.tuples(
        st.just("raw"),
        st.sampled_from(["truncate", "insert", "nest", "dupkey", "bigint", "bom", "trailing"]),
        st.floats(min_value=0, max_value=1),
        st.sampled_from(["\x00", "\ud800", "\\", '"', "{", "]", "\u202e", "\x7f", "\t"]),
    ),
)

specs = st.tuples(
    st.sampled_from(
        [
            "purchase",
            "purchase",
            "request",
            "request",
            "file",
            "renew",
            "convert",
            "bandwidth",
            "expire",
            "release",
            "withdraw",
        ]
    ),
    st.sampled_from(INSTANCES),
    st.sampled_from(["ecs", "marketplace", "nat_gateway", "chengxintong_shop"]),
    st.floats(min_value=0, max_value=400),
    mutations,
    st.booleans(),  # ensure_ascii
)


def _base(kind: str, instance: str, product: str, at: float) -> dict[str, Any]:
    ev = Events("fz")
    event = {
        "purchase": lambda: ev.purchase(instance, product, at=at, expires=at + 365),
        "request": lambda: ev.request(instance, at=at + 1),
        "file": lambda: ev.file(
            instance, "ICP-0123456789ABCDEF01234567", at=at + 2, product=product
        ),
        "renew": lambda: ev.renew(instance, at=at, term=12, expires=at + 730),
        "convert": lambda: ev.convert(instance, "pay_as_you_go", at=at),
        "bandwidth": lambda: ev.bandwidth(instance, 0, at=at),
        "expire": lambda: ev.expire(instance, end=at),
        "release": lambda: ev.release(instance, at=at + 300),
        "withdraw": lambda: ev.withdraw(instance, "filing-1", at=at + 3),
    }[kind]()
    event["event_id"] = PLACEHOLDER
    return event


def _dumps(value: Any, ensure_ascii: bool) -> str:
    # allow_nan: NaN and Infinity go out as the non-JSON tokens they are (a hostile input).
    return json.dumps(value, ensure_ascii=ensure_ascii, allow_nan=True)


def render(spec: tuple, event_id: str) -> str:
    """One line of JSONL text (may hold lone surrogates; never a line break)."""
    kind, instance, product, at, mutation, ascii_only = spec
    event = _base(kind, instance, product, at)
    op = mutation[0]
    if op == "set":
        event[mutation[1]] = mutation[2]
    elif op == "drop":
        event.pop(mutation[1], None)
    elif op == "set_own":
        keys = sorted(key for key in event if key != "type")
        event[keys[int(mutation[1] * len(keys))]] = mutation[2]
    elif op == "extra":
        event[mutation[1]] = mutation[2]
    elif op == "size":
        # An extra field (so the event is invalid either way) that brings the line to exactly
        # 64 KiB + mutation[1] bytes of UTF-8: over the limit it is too_large, else invalid.
        _, delta, char = mutation
        event["pad"] = ""
        room = 64 * 1024 + delta - len(_dumps(event, False).encode())
        width = len(char.encode())
        event["pad"] = char * (room // width) + "y" * (room % width)
        ascii_only = False
    line = _dumps(mutation[1] if op == "replace" else event, ascii_only)
    if op == "raw":
        _, how, where, junk = mutation
        cut = int(len(line) * where)
        if how == "truncate":
            line = line[:cut]
        elif how == "insert":
            line = line[:cut] + junk + line[cut:]
        elif how == "nest":
            # Deep, yet under the 64 KiB limit, so that the parser has to cope with it.
            depth = 1000 + int(where * 25_000)
            line = line[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}"
        elif how == "dupkey":
            line = line[:-1] + ', "type": "instance.released"}'
        elif how == "bigint":
            line = line[:-1] + ', "term_months": 1' + "0" * 5000 + "}"
        elif how == "bom":
            line = "\ufeff" + line
        elif how == "trailing":
            line = line + " " + junk
    line = line.replace(PLACEHOLDER, event_id)
    # One event per line on every path: a raw line break would split it in two.
    return line.replace("\n", " ").replace("\r", " ").replace("\x85", " ")


def encode(line: str) -> bytes:
    # Lone surrogates cannot be UTF-8: they go out as the invalid bytes a broken client sends.
    return line.encode("utf-8", "surrogatepass")


def parse_invalid(line: str) -> bool:
    """What every path must refuse before the ledger: the codec's own verdict on the line."""
    return not isinstance(parse_event(line), BaseEvent)


def parse_code(line: str) -> str | None:
    """The dead-letter code every path must give the line sent as text (None: valid)."""
    parsed = parse_event(line)
    return None if isinstance(parsed, BaseEvent) else parsed.code


def utf8(line: str) -> bool:
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def refused_as_bytes(line: str) -> bool:
    """The verdict on the line sent as bytes (a file, an HTTP body): lone surrogates are
    undecodable bytes there."""
    return parse_invalid(line) or not utf8(line)


def event_id_of(item: Any) -> str:
    parsed = parse_event(item) if isinstance(item, str) else parse_event_obj(item)
    assert isinstance(parsed, BaseEvent), parsed
    return parsed.event_id


# --- the test ---------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_fuzzed_events_are_applied_or_dead_lettered_on_every_path(
    pipeline, tmp_path, figures
) -> None:
    worker = pipeline.worker(concurrency=2)
    engine = make_engine(pipeline.database_url)
    ledger = Ledger(engine, POLICY)
    app = create_app(
        Settings(
            database_url=pipeline.database_url,
            broker_url=pipeline.broker_url,
            api_tokens=f"ingest:{INGEST_TOKEN}",
        )
    )
    client = TestClient(app)
    client.__enter__()
    ids = itertools.count(1)
    all_specs: list[tuple] = []
    queued: list[str] = []  # event ids handed to the broker, on any path
    tally = {"lines": 0, "invalid_answers": 0, "applied_or_decided": 0, "examples": 0}
    by_code: dict[str, int] = {}

    def fresh(path: str) -> str:
        return f"fz-{path}-{next(ids)}"

    def count_invalid(code: str) -> None:
        tally["invalid_answers"] += 1
        by_code[code] = by_code.get(code, 0) + 1

    @settings(
        max_examples=int(os.environ.get("QUOTA_LEDGER_FUZZ_EXAMPLES", "120")),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(batch=st.lists(specs, min_size=1, max_size=6), as_dicts=st.booleans())
    def run(batch: list[tuple], as_dicts: bool) -> None:
        tally["examples"] += 1
        all_specs.extend(batch)

        # 1. Ledger.apply_lines (what ``quota-ledger apply`` runs).
        lines = [render(spec, fresh("apply")) for spec in batch]
        nonblank = [line for line in lines if line.strip()]
        results = list(ledger.apply_lines(lines))
        assert len(results) == len(nonblank)
        for line, result in zip(nonblank, results, strict=True):
            tally["lines"] += 1
            if result.outcome == "invalid":
                (code,) = result.reasons
                assert code in PARSE_CODES | {"event_id_reused"}, result
                assert result.error, result
                count_invalid(code)
                assert (code in PARSE_CODES) == parse_invalid(line), (line[:200], result)
                if code in PARSE_CODES:
                    assert code == parse_code(line), (line[:200], result)
            else:
                assert result.outcome in LEDGER_OUTCOMES, result
                assert not parse_invalid(line)
                tally["applied_or_decided"] += 1

        # 2. publish_many: all or nothing, InvalidEvents naming exactly the invalid ones.
        lines = [render(spec, fresh("pub")) for spec in batch]
        items: list[Any] = []
        for line in lines:
            obj: Any = line
            if as_dicts:
                try:
                    obj = json.loads(line)
                except (ValueError, RecursionError):
                    obj = line
            items.append(obj)
        expected_bad = {i for i, line in enumerate(lines) if parse_invalid(line)}
        try:
            sent = publish_many(items, batch_size=3, broker_url=pipeline.broker_url)
        except InvalidEvents as exc:
            bad = {index for index, _ in exc.problems}
            assert all(r.code in PARSE_CODES and r.error for _, r in exc.problems)
            if not as_dicts:
                assert bad == expected_bad, (bad, expected_bad)
            good = [item for i, item in enumerate(items) if i not in bad]
            sent = publish_many(good, broker_url=pipeline.broker_url) if good else 0
            assert sent == len(good)
            queued.extend(event_id_of(item) for item in good)
        else:
            if not as_dicts:
                assert expected_bad == set()
            assert sent == len(items)
            queued.extend(event_id_of(item) for item in items)

        # 3. POST /v1/events: JSONL, or a JSON array when every line is JSON on its own.
        lines = [render(spec, fresh("api")) for spec in batch]
        body, content_type = _http_body(lines)
        response = client.post(
            "/v1/events",
            content=body,
            headers={"Authorization": f"Bearer {INGEST_TOKEN}", "Content-Type": content_type},
        )
        indexed = list(enumerate(lines))
        if content_type == "application/x-ndjson":
            indexed = [(i, line) for i, line in indexed if line.strip()]
        if not indexed:  # nothing but blank lines: the body is empty
            assert response.status_code == 400 and response.json()["error"] == "empty_body"
            return
        assert response.status_code == 202, (response.status_code, response.text[:500])
        answer = response.json()
        listed = {entry["index"]: entry for entry in answer["invalid"]}
        expected = {i for i, line in indexed if refused_as_bytes(line)}
        assert set(listed) == expected, (listed, expected)
        for index, entry in listed.items():
            assert entry["code"] in PARSE_CODES and entry["error"]
            if utf8(lines[index]):
                assert entry["code"] == parse_code(lines[index]), (entry, lines[index][:200])
            count_invalid(entry["code"])
        assert answer["accepted"] == len(indexed) - len(expected)
        queued.extend(event_id_of(line) for i, line in indexed if i not in expected)

    try:
        run()

        # 4. The real commands, once, with every line seen so far.
        cli_lines = [render(spec, fresh("cli")) for spec in all_specs]
        for command, path in (("apply", "capply"), ("publish", "cpub")):
            lines = (
                cli_lines if command == "publish" else [render(s, fresh(path)) for s in all_specs]
            )
            source = tmp_path / f"{command}.jsonl"
            source.write_bytes(b"".join(encode(line) + b"\n" for line in lines))
            done = pipeline.cli(command, str(source), "--json", timeout=120)
            assert "Traceback" not in done.stderr, done.stderr[-3000:]
            answers = [json.loads(out) for out in done.stdout.splitlines()]
            nonblank = [line for line in lines if line.strip()]
            assert len(answers) == len(nonblank)
            invalid = 0
            for line, answer in zip(nonblank, answers, strict=True):
                refused = refused_as_bytes(line)
                if answer["outcome"] == "invalid":
                    invalid += 1
                    count_invalid(answer["reasons"][0])
                    assert answer["reasons"][0] in PARSE_CODES | {"event_id_reused"}
                    assert answer["error"]
                    if answer["reasons"][0] in PARSE_CODES:
                        assert refused, (line[:200], answer)
                        if utf8(line):
                            assert answer["reasons"][0] == parse_code(line), (line[:200], answer)
                else:
                    assert not refused, (line[:200], answer)
                    if command == "publish":
                        assert answer["outcome"] == "queued"
                        queued.append(answer["event_id"])
                    else:
                        assert answer["outcome"] in LEDGER_OUTCOMES
            assert done.returncode == (1 if invalid else 0), done.stderr[-2000:]

        # 5. The worker drains the queue; every queued event is in the ledger (or, when a
        # hostile but valid event id collided with another event, dead-lettered as reused).
        def drained() -> bool:
            return redis_queue_state(pipeline.broker_url) == {
                "queued": 0,
                "unacked": 0,
                "delivery_keys": 0,
            }

        wait_until(drained, 120, "the worker to drain the queue")
        with engine.connect() as conn:
            in_ledger = set(conn.execute(text("SELECT event_id FROM ledger_entries")).scalars())
            letters = conn.execute(text("SELECT event_id, code, error FROM dead_letters")).all()
        reused = {row.event_id for row in letters if row.code == "event_id_reused"}
        missing = [i for i in set(queued) if i not in in_ledger and i not in reused]
        assert missing == [], missing[:20]
        assert all(row.error for row in letters)
        stored = {code: sum(1 for row in letters if row.code == code) for code in PARSE_CODES}
        # Every refused line, on every path, is in the dead-letter store exactly once; the
        # worker adds only event_id_reused ones (a hostile but valid id used twice).
        assert stored == {code: by_code.get(code, 0) for code in PARSE_CODES}
        assert {row.code for row in letters} <= PARSE_CODES | {"event_id_reused"}

        # 6. Invariants: caps, chains, projections.
        with Session(engine) as session:
            instance_ids = (
                session.execute(text("SELECT instance_id FROM instances")).scalars().all()
            )
            for instance_id in instance_ids:
                view = show_instance(
                    session,
                    instance_id=instance_id,
                    at=datetime(2026, 6, 1, tzinfo=UTC),
                    policy=POLICY,
                )
                websites, subjects = view["websites"], view["subjects"]
                assert websites["used"] + websites["reserved"] <= websites["cap"], view
                assert subjects["used"] <= subjects["cap"], view
        report = audit_clean(pipeline)
    finally:
        client.__exit__(None, None, None)
        app.state.api.engine.dispose()
        engine.dispose()
        close_producer(pipeline.broker_url)
    assert worker.popen.poll() is None
    figures.update(
        examples=tally["examples"],
        lines_per_path=len(all_specs),
        paths=5,
        answers=tally["lines"],
        invalid_answers=tally["invalid_answers"],
        dead_letters=len(letters),
        dead_letters_by_code=dict(sorted(by_code.items())),
        queued_to_worker=len(set(queued)),
        queued_lost=0,
        entries=len(in_ledger),
        processing_errors=0,
        http_500=0,
        verify_ok=report["ok"],
    )


def _http_body(lines: list[str]) -> tuple[bytes, str]:
    def standalone(line: str) -> bool:
        try:
            json.loads(line)
        except (ValueError, RecursionError):
            return False
        return True

    if (
        all(standalone(line) and utf8(line) for line in lines)
        and random.Random(len(lines)).random() < 0.5
    ):
        return encode("[" + ",".join(lines) + "]"), "application/json"
    return encode("\n".join(lines)), "application/x-ndjson"
