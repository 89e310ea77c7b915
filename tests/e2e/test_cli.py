"""End-to-end tests of the ``quota-ledger`` CLI (SPEC §7): the real console script in a
subprocess, on SQLite and on PostgreSQL (``db_url``), checking JSON shapes and exit codes.

Each subprocess costs about half a second, so assertions are grouped into a few scenario tests
rather than one test per detail.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import text

from ledger.db import make_engine
from tests.helpers.cli import (
    SCENARIO,
    filing_of,
    json_of,
    lines_of,
    purchase,
    request,
    write_jsonl,
)

HEX64 = "0" * 64
COMMANDS = (
    "db",
    "apply",
    "show",
    "history",
    "instances",
    "service-number",
    "rejected",
    "sweep",
    "rebuild",
    "verify",
    "demo",
    "changes",
)

SHOW_KEYS = {
    "instance_id",
    "account_id",
    "product_type",
    "region",
    "billing_method",
    "expires_at",
    "status",
    "eligibility",
    "websites",
    "subjects",
    "service_numbers",
    "filings",
    "entries",
    "head_hash",
    "parked",  # SPEC §9
}
HISTORY_KEYS = {
    "seq",
    "event_id",
    "type",
    "occurred_at",
    "recorded_at",
    "outcome",
    "reasons",
    "service_number",
    "policy_version",
    "prev_hash",
    "hash",
}
APPLY_KEYS = {"event_id", "outcome", "reasons", "service_number"}
INSTANCE_KEYS = {
    "instance_id",
    "product_type",
    "status",
    "eligibility",
    "websites_remaining",
    "expires_at",
}
NUMBER_KEYS = {
    "number",
    "instance_id",
    "status",
    "issued_at",
    "filing_id",
    "invalidated_at",
    "invalidated_reason",
}
REJECTED_KEYS = {"id", "received_at", "event_id", "code", "error", "raw"}

AT = "2026-06-01T00:00:00Z"


def test_help_lists_every_command(cli) -> None:
    proc = cli("--help")
    assert proc.returncode == 0
    for command in COMMANDS:
        assert f" {command} " in proc.stdout, command
    db_help = cli("db", "--help")
    assert db_help.returncode == 0 and "upgrade" in db_help.stdout
    module = subprocess.run(
        [sys.executable, "-m", "worker", "--help"], capture_output=True, text=True, timeout=60
    )
    assert module.returncode == 0 and "apply" in module.stdout
    assert cli().returncode in (0, 2)  # no command: help, never a traceback


def test_db_upgrade_is_idempotent(cli, db_url: str) -> None:
    first = cli("db", "upgrade", "--db", db_url, "--json")
    assert first.returncode == 0, first.stderr
    second = cli("--db", db_url, "db", "upgrade", "--json")  # --db as a global option
    assert second.returncode == 0, second.stderr
    assert json_of(first)["revision"] == json_of(second)["revision"] is not None
    human = cli("db", "upgrade", extra_env={"QUOTA_LEDGER_DATABASE_URL": db_url})
    assert human.returncode == 0 and "revision" in human.stdout


def test_full_scenario(cli, db_url: str, tmp_path: Path) -> None:
    events = write_jsonl(tmp_path / "events.jsonl", SCENARIO)

    # --- apply: one JSON line per non-blank input line, in order; exit 1 (invalid lines) -----
    proc = cli("apply", str(events), "--db", db_url, "--json")
    assert proc.returncode == 1, proc.stderr
    results = lines_of(proc)
    assert len(results) == len(SCENARIO) - 1
    for result in results:
        assert APPLY_KEYS <= set(result) <= APPLY_KEYS | {"error"}
    outcomes = [(r["event_id"], r["outcome"], r["reasons"]) for r in results]
    assert outcomes == [
        ("buy:i-good", "applied", []),
        ("buy:i-payg", "applied", []),
        ("buy:i-nat", "applied", []),
        ("req:good:1", "applied", []),
        ("req:good:mallory", "rejected", ["account_mismatch"]),
        ("req:payg:1", "rejected", ["pay_as_you_go"]),
        ("req:nat:1", "applied", []),
        (None, "invalid", ["invalid_event"]),
        ("naive", "invalid", ["invalid_event"]),
        ("buy:i-good", "duplicate", []),
    ]
    number, nat_number = results[3]["service_number"], results[6]["service_number"]
    assert number and nat_number and number != nat_number
    assert results[4]["service_number"] is None
    assert "occurred_at" in results[8]["error"] and "JSON" in results[7]["error"]
    assert "error" not in results[0]

    # A filing from stdin ("-"), all valid: exit 0. --db as a global option.
    proc = cli("--db", db_url, "apply", "-", "--json", input=json.dumps(filing_of(number)) + "\n")
    assert proc.returncode == 0, proc.stderr
    assert lines_of(proc) == [
        {"event_id": "filing:good:1", "outcome": "applied", "reasons": [], "service_number": number}
    ]

    # --- show ------------------------------------------------------------------------------------
    proc = cli("show", "i-good", "--at", AT, "--db", db_url, "--json")
    assert proc.returncode == 0, proc.stderr
    view = json_of(proc)
    assert set(view) == SHOW_KEYS
    assert view["instance_id"] == "i-good" and view["account_id"] == "acct-a"
    assert (view["product_type"], view["region"]) == ("ecs", "cn-hangzhou")
    assert view["billing_method"] == "subscription" and view["status"] == "active"
    assert view["expires_at"] == "2027-01-01T00:00:00Z"
    assert view["eligibility"] == {"status": "eligible", "as_of": AT, "reasons": []}
    assert view["websites"] == {"cap": 5, "used": 1, "reserved": 0, "remaining": 4}
    assert view["subjects"] == {"cap": 5, "used": 1, "remaining": 4}
    assert view["service_numbers"] == [
        {
            "number": number,
            "status": "used",
            "issued_at": "2026-01-02T00:00:00Z",
            "filing_id": "F-1",
            "invalidated_reason": None,
        }
    ]
    assert view["filings"] == [
        {
            "filing_id": "F-1",
            "website": "www.example.cn",
            "subject_id": "subj-1",
            "status": "accepted",
        }
    ]
    assert view["entries"] == 4 and len(view["head_hash"]) == 64

    # --at makes the output independent of the wall clock: identical twice, JSON and human.
    assert cli("show", "i-good", "--at", AT, "--db", db_url, "--json").stdout == proc.stdout
    human = [
        cli("show", "i-good", "--at", "2026-06-01T08:00:00+08:00", "--db", db_url) for _ in "ab"
    ]
    assert human[0].returncode == 0 and human[0].stdout == human[1].stdout
    assert "i-good" in human[0].stdout and "eligible" in human[0].stdout

    payg = json_of(cli("show", "i-payg", "--at", AT, "--db", db_url, "--json"))
    assert payg["eligibility"]["status"] == "ineligible"
    (reason,) = payg["eligibility"]["reasons"]
    assert set(reason) == {"code", "message_zh", "message_en", "remediation"}
    assert reason["code"] == "pay_as_you_go" and reason["message_zh"] == "按量付费实例不支持备案"
    payg_human = cli("show", "i-payg", "--at", AT, "--db", db_url)
    assert "按量付费实例不支持备案" in payg_human.stdout and "pay_as_you_go" in payg_human.stdout

    missing = cli("show", "i-nowhere", "--db", db_url, "--json")
    assert missing.returncode == 1 and missing.stdout == "" and "i-nowhere" in missing.stderr
    for bad in ("yesterday", "2026-06-01T00:00:00", "2026-13-01T00:00:00Z"):
        proc = cli("show", "i-good", "--at", bad, "--db", db_url, "--json")
        assert proc.returncode == 2 and proc.stdout == "" and "--at" in proc.stderr, bad

    # --- history ---------------------------------------------------------------------------------
    entries = json_of(cli("history", "i-good", "--db", db_url, "--json"))
    assert [e["event_id"] for e in entries] == [
        "buy:i-good",
        "req:good:1",
        "req:good:mallory",
        "filing:good:1",
    ]
    assert all(set(e) == HISTORY_KEYS for e in entries)
    assert entries[0]["prev_hash"] == HEX64
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(entries))
    assert [e["seq"] for e in entries] == sorted(e["seq"] for e in entries)
    assert entries[1]["service_number"] == number and entries[3]["service_number"] == number
    assert entries[2]["outcome"] == "rejected" and entries[2]["reasons"] == ["account_mismatch"]
    assert entries[0]["occurred_at"] == "2026-01-01T00:00:00Z"
    assert entries[-1]["hash"] == view["head_hash"]
    assert {e["policy_version"] for e in entries} == {entries[0]["policy_version"]}
    assert json_of(cli("history", "i-nowhere", "--db", db_url, "--json")) == []
    assert cli("history", "i-good", "--db", db_url).returncode == 0

    # --- instances with each filter --------------------------------------------------------------
    def ids(*args: str) -> list[str]:
        proc = cli("instances", *args, "--db", db_url, "--json")
        assert proc.returncode == 0, proc.stderr
        rows = json_of(proc)
        assert all(set(row) == INSTANCE_KEYS for row in rows)
        return [row["instance_id"] for row in rows]

    rows = json_of(cli("instances", "--at", AT, "--db", db_url, "--json"))
    assert rows == [
        {
            "instance_id": "i-good",
            "product_type": "ecs",
            "status": "active",
            "eligibility": "eligible",
            "websites_remaining": 4,
            "expires_at": "2027-01-01T00:00:00Z",
        },
        {
            "instance_id": "i-nat",
            "product_type": "nat_gateway",
            "status": "active",  # expired by the clock, not yet by the sweep
            "eligibility": "ineligible",
            "websites_remaining": 1,
            "expires_at": "2026-02-01T00:00:00Z",
        },
        {
            "instance_id": "i-payg",
            "product_type": "ecs",
            "status": "active",
            "eligibility": "ineligible",
            "websites_remaining": 5,
            "expires_at": None,
        },
    ]
    assert ids("--eligibility", "eligible", "--at", AT) == ["i-good"]
    assert ids("--eligibility", "ineligible", "--at", AT) == ["i-nat", "i-payg"]
    assert ids("--eligibility", "eligible", "--at", "2026-01-15T00:00:00Z") == ["i-good", "i-nat"]
    assert ids("--product", "nat_gateway") == ["i-nat"]
    assert ids("--expiring-before", "2026-03-01T00:00:00Z") == ["i-nat"]
    assert ids("--product", "ecs", "--eligibility", "not_needed") == []
    assert cli("instances", "--product", "mainframe", "--db", db_url).returncode == 2
    assert cli("instances", "--eligibility", "maybe", "--db", db_url).returncode == 2
    assert cli("instances", "--expiring-before", "soon", "--db", db_url).returncode == 2
    assert cli("instances", "--db", db_url).returncode == 0

    # --- service-number --------------------------------------------------------------------------
    info = json_of(cli("service-number", number, "--db", db_url, "--json"))
    assert info == {
        "number": number,
        "instance_id": "i-good",
        "status": "used",
        "issued_at": "2026-01-02T00:00:00Z",
        "filing_id": "F-1",
        "invalidated_at": None,
        "invalidated_reason": None,
    }
    assert (
        json_of(cli("service-number", nat_number, "--db", db_url, "--json"))["status"] == "active"
    )
    unknown = cli("service-number", "ICP-NOPE", "--db", db_url, "--json")
    assert unknown.returncode == 1 and unknown.stdout == "" and "ICP-NOPE" in unknown.stderr
    assert cli("service-number", number, "--db", db_url).returncode == 0

    # --- rejected (dead letters) -----------------------------------------------------------------
    letters = json_of(cli("rejected", "--db", db_url, "--json"))
    assert all(set(row) == REJECTED_KEYS for row in letters)
    assert sorted((row["event_id"] or "", row["code"], row["raw"]) for row in letters) == sorted(
        [
            ("", "invalid_event", "this is not json"),
            ("naive", "invalid_event", json.dumps(SCENARIO[9])),
        ]
    )
    assert all(row["received_at"].endswith("Z") and row["error"] for row in letters)
    assert cli("rejected", "--db", db_url).returncode == 0

    # --- sweep --now -----------------------------------------------------------------------------
    proc = cli("sweep", "--now", "2026-06-01T08:00:00+08:00", "--db", db_url, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json_of(proc) == {"as_of": AT, "expired": 1}
    assert json_of(cli("sweep", "--now", AT, "--db", db_url, "--json")) == {
        "as_of": AT,
        "expired": 0,
    }
    assert cli("sweep", "--now", "2026-06-01", "--db", db_url).returncode == 2
    nat = json_of(cli("service-number", nat_number, "--db", db_url, "--json"))
    assert nat["status"] == "invalidated" and nat["invalidated_reason"] == "instance_expired"
    assert nat["invalidated_at"] == "2026-02-01T00:00:00Z"
    assert (
        json_of(cli("show", "i-nat", "--at", AT, "--db", db_url, "--json"))["status"] == "expired"
    )
    sweep_entry = json_of(cli("history", "i-nat", "--db", db_url, "--json"))[-1]
    assert sweep_entry["event_id"] == "sweep:i-nat:20260201T000000Z"
    assert sweep_entry["type"] == "instance.expired"

    # --- verify / rebuild on an intact ledger ----------------------------------------------------
    proc = cli("verify", "--db", db_url, "--json")
    assert proc.returncode == 0, proc.stderr
    # SPEC §7's shape exactly; ok also means the change feed matches the ledger.
    assert json_of(proc) == {"ok": True, "entries": 9, "instances": 3, "broken": []}
    proc = cli("rebuild", "--check", "--db", db_url, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json_of(proc) == {"instances": 3, "entries": 9, "drift": [], "broken": []}
    proc = cli("rebuild", "--db", db_url, "--json")
    assert proc.returncode == 0 and json_of(proc)["drift"] == []
    assert cli("verify", "--db", db_url).returncode == 0


def test_drift_and_broken_chains(cli, db_url: str, tmp_path: Path) -> None:
    events = write_jsonl(
        tmp_path / "events.jsonl",
        [
            purchase("i-a", "ecs", public_bandwidth_mbps=1),
            purchase("i-b", "virtual_host"),
            request("req:a", "i-a"),
            request("req:b", "i-b"),
        ],
    )
    assert cli("apply", str(events), "--db", db_url).returncode == 0
    engine = make_engine(db_url)
    try:
        # Drift: a projection row changed behind the ledger's back (projections are not
        # append-only, the ledger is).
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE service_numbers SET status = 'invalidated' WHERE instance_id = 'i-b'")
            )
        check = cli("rebuild", "--check", "--db", db_url, "--json")
        assert check.returncode == 1
        assert json_of(check) == {"instances": 2, "entries": 4, "drift": ["i-b"], "broken": []}
        repaired = cli("rebuild", "--db", db_url, "--json")
        assert repaired.returncode == 0 and json_of(repaired)["drift"] == ["i-b"]
        assert cli("rebuild", "--check", "--db", db_url).returncode == 0

        # Broken: the head claims more entries than the chain has (an entry removed).
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE instances SET entries = entries + 1 WHERE instance_id = 'i-a'")
            )
    finally:
        engine.dispose()
    proc = cli("verify", "--db", db_url, "--json")
    assert proc.returncode == 1
    assert json_of(proc) == {"ok": False, "entries": 4, "instances": 2, "broken": ["i-a"]}
    human = cli("verify", "--db", db_url)
    assert human.returncode == 1 and "i-a" in human.stdout + human.stderr
    proc = cli("rebuild", "--db", db_url, "--json")
    assert proc.returncode == 1 and json_of(proc)["broken"] == ["i-a"]
    proc = cli("rebuild", "--check", "--db", db_url)
    assert proc.returncode == 1 and "i-a" in proc.stdout


def test_apply_io_errors_and_human_output(cli, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    missing = cli("apply", str(tmp_path / "nope.jsonl"), "--db", db, "--json")
    assert missing.returncode == 2 and missing.stdout == ""
    assert "nope.jsonl" in missing.stderr
    assert cli("apply", str(tmp_path), "--db", db).returncode == 2  # a directory
    assert cli("apply", "--db", db).returncode == 2  # no FILE

    # Bytes that are not UTF-8 are dead-lettered, not a crash; other lines still apply.
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes((json.dumps(purchase("i-x", "virtual_host")) + "\n").encode() + b"\xff\xfe{}\n")
    proc = cli("apply", str(raw), "--db", db, "--json")
    assert proc.returncode == 1
    assert [r["outcome"] for r in lines_of(proc)] == ["applied", "invalid"]

    human = cli("apply", "-", "--db", db, input="not json\n")
    assert human.returncode == 1
    assert "invalid_event" in human.stdout and "duplicate" in human.stdout

    ok = cli("apply", "-", "--db", db, input="\n\n")
    assert ok.returncode == 0 and "total" in ok.stdout
    assert cli("apply", "-", "--db", db, "--json", input="").stdout == ""


def test_configuration_errors(cli, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    broken = tmp_path / "policy.toml"
    broken.write_text('version = "x"\n[products.ecs]\nwebsite_cap = "many"\n', encoding="utf-8")
    for args in (("show", "i-1"), ("apply", "-"), ("instances",), ("sweep",)):
        proc = cli(*args, "--db", db, input="", extra_env={"QUOTA_LEDGER_POLICY_FILE": str(broken)})
        assert proc.returncode == 2, args
        assert "policy" in proc.stderr, args
    proc = cli("--policy", str(tmp_path / "absent.toml"), "instances", "--db", db)
    assert proc.returncode == 2 and "absent.toml" in proc.stderr

    assert cli("verify", "--db", "mysql://localhost/x").returncode == 2
    proc = cli("verify", "--db", f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    assert proc.returncode == 2 and "database" in proc.stderr
    # The message names the path that is missing, not just "unable to open database file".
    assert str(tmp_path / "no" / "such" / "dir.db") in proc.stderr
    assert f"the directory {tmp_path / 'no' / 'such'} " in proc.stderr
    # The same one line from serve (no traceback: the fixture refuses one), before any port.
    proc = cli("serve", "--port", "1", "--db", f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    assert proc.returncode == 2 and f"the directory {tmp_path / 'no' / 'such'} " in proc.stderr
    # And from the worker, before it connects to any broker (this one does not exist).
    proc = cli(
        "worker",
        "--db",
        f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}",
        extra_env={"QUOTA_LEDGER_BROKER_URL": "redis://127.0.0.1:1/0"},
    )
    assert proc.returncode == 2 and f"the directory {tmp_path / 'no' / 'such'} " in proc.stderr

    # The environment names the database when --db is absent; a fresh file just works.
    env = {"QUOTA_LEDGER_DATABASE_URL": f"sqlite:///{tmp_path / 'env.db'}"}
    proc = cli("instances", "--json", extra_env=env)
    assert proc.returncode == 0 and json_of(proc) == []
    assert (tmp_path / "env.db").exists()
    assert json_of(cli("--json", "rejected", extra_env=env)) == []  # --json as a global option


def test_demo(cli, db_url: str, tmp_path: Path) -> None:
    where = ["--dir", str(tmp_path / "demo")] if db_url.startswith("sqlite") else ["--db", db_url]
    proc = cli("demo", *where, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json_of(proc)
    assert report["verify"]["ok"] is True and report["verify"]["broken"] == []
    assert report["sweep"] == {"as_of": report["scenario_clock"], "expired": 2}
    steps = {step["event_id"]: step for step in report["events"] + report["filings"]}
    assert all(step["outcome"] != "invalid" for step in steps.values())
    reasons = {code for step in steps.values() for code in step["reasons"]}
    assert {
        "pay_as_you_go",
        "term_too_short",
        "no_public_bandwidth",
        "account_mismatch",
        "website_limit_reached",
        "product_type_mismatch",
        "service_number_used",
        "service_number_not_needed",
        "region_not_mainland",
        "service_number_invalid",
    } <= reasons
    assert steps["request:i-ecs-good:6"]["reasons"] == ["website_limit_reached"]
    assert steps["request:i-ecs-payg:2"]["outcome"] == "applied"
    assert steps["filing:i-nat-gw:F-0008:retry"]["outcome"] == "applied"
    eligibility = {row["instance_id"]: row["eligibility"] for row in report["instances"]}
    assert eligibility["i-ecs-good"] == "eligible" and eligibility["i-ecs-hk"] == "not_required"
    assert eligibility["shop-chengxintong"] == "not_needed"

    if db_url.startswith("sqlite"):
        again = cli("demo", *where)  # not a fresh directory any more
        assert again.returncode == 2 and "fresh" in again.stderr
        human = cli("demo", "--dir", str(tmp_path / "demo2"))
        assert human.returncode == 0, human.stderr
        assert "website_limit_reached" in human.stdout and "i-ecs-good" in human.stdout
        # The sweep line names the instances it expired (the JSON counts them).
        expired = [row["instance_id"] for row in report["instances"] if row["status"] == "expired"]
        assert len(expired) == report["sweep"]["expired"]
        assert f"2 instance(s) expired: {', '.join(expired)}." in human.stdout
        default = cli("demo", "--json", extra_env={"TMPDIR": str(tmp_path)})  # a new temp dir
        assert default.returncode == 0 and Path(json_of(default)["directory"]).is_dir()
    else:
        again = cli("demo", *where)
        assert again.returncode == 2 and "empty" in again.stderr


# --- human output, as a newcomer first meets it --------------------------------------------------


def _whole_in_a_line(stdout: str, values: Sequence[str]) -> list[str]:
    """The values that no line of ``stdout`` shows in one piece (wrapped mid-value)."""
    return [value for value in values if not any(value in line for line in stdout.splitlines())]


def test_human_output_for_a_newcomer(cli, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    # 21 instances × 5 requests: more numbers than the listing of rejected lines shows.
    lines: list[dict[str, Any] | str] = []
    for n in range(21):
        iid = f"i-newcomer-{n:02d}"
        lines.append(purchase(iid, "ecs", public_bandwidth_mbps=5))
        lines += [request(f"request:{iid}:{k}", iid) for k in range(5)]
    for n in range(3):  # dead letters with long ids and long errors
        lines.append({"event_id": f"publisher-event-id-{n:04d}", "type": "x.y"})

    # Plain apply prints the service number issued for every applied request.
    proc = cli("apply", str(write_jsonl(tmp_path / "many.jsonl", lines)), "--db", db)
    assert proc.returncode == 1, proc.stderr  # the three invalid lines
    engine = make_engine(db)
    try:
        with engine.connect() as conn:
            numbers = list(conn.execute(text("SELECT number FROM service_numbers")).scalars())
    finally:
        engine.dispose()
    assert len(numbers) == 105
    assert _whole_in_a_line(proc.stdout, numbers) == []

    # history and rejected at the width of a pipe (120): timestamps, numbers and ids stay whole,
    # the free text wraps.
    narrow = {"COLUMNS": "120"}
    history = json_of(cli("history", "i-newcomer-00", "--db", db, "--json"))
    proc = cli("history", "i-newcomer-00", "--db", db, extra_env=narrow)
    assert proc.returncode == 0, proc.stderr
    values = [e["occurred_at"] for e in history] + [e["service_number"] for e in history[1:]]
    assert _whole_in_a_line(proc.stdout, values) == []
    rejected = json_of(cli("rejected", "--db", db, "--json"))
    proc = cli("rejected", "--db", db, extra_env=narrow)
    assert proc.returncode == 0, proc.stderr
    values = [row["received_at"] for row in rejected] + [row["event_id"] for row in rejected]
    assert _whole_in_a_line(proc.stdout, values) == []
    assert "invalid_event" in proc.stdout


def test_help_shows_flags_without_a_type_placeholder() -> None:
    # In-process: one subprocess per command would cost seconds for the same text.
    from typer.testing import CliRunner

    from worker.cli import app

    for command in (*COMMANDS, "parked", "serve", "publish", "reconcile", "worker", "beat"):
        args = ["db", "upgrade", "--help"] if command == "db" else [command, "--help"]
        result = CliRunner().invoke(app, args, env={"COLUMNS": "150"})
        assert result.exit_code == 0, (command, result.output)
        assert "--help" in result.stdout and "<bool>" not in result.stdout, command
