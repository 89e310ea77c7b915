"""``quota-ledger changes`` in a subprocess, on SQLite and PostgreSQL: a consumer that reads
from its cursor, crashes and resumes sees every change exactly once, in order; ``--follow``
prints changes as they commit."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.helpers.cli import CLI, SCENARIO, filing_of, lines_of, write_jsonl


def test_a_consumer_resumes_from_its_cursor(cli, db_url: str, tmp_path: Path) -> None:
    events = write_jsonl(tmp_path / "events.jsonl", SCENARIO)
    assert cli("apply", str(events), "--db", db_url).returncode == 1  # two invalid lines
    everything = lines_of(cli("changes", "--db", db_url, "--json"))
    assert [c["position"] for c in everything] == list(range(1, len(everything) + 1))
    kinds = {c["kind"] for c in everything}
    assert {"service_number.issued", "service_number.request_rejected"} <= kinds
    assert {"event.dead_lettered", "instance.status_changed"} <= kinds

    # The consumer processes at most two changes per run, then "crashes"; its cursor is a file.
    cursor_file, seen = tmp_path / "cursor", []
    cursor_file.write_text("0")
    while True:
        cursor = cursor_file.read_text()
        page = lines_of(cli("changes", "--after", cursor, "--limit", "2", "--db", db_url, "--json"))
        if not page:
            break
        seen += page
        cursor_file.write_text(str(page[-1]["position"]))
    assert seen == everything

    # i-good and i-nat hold numbers; i-nat ends 2026-02-01, i-good 2027-01-01.
    due = cli(
        "instances", "--renewal-due", "--at", "2026-01-10T00:00:00Z", "--db", db_url, "--json"
    )
    assert [row["instance_id"] for row in json.loads(due.stdout)] == ["i-nat"]

    human = cli("changes", "--after", "2", "--limit", "1", "--db", db_url)
    assert human.returncode == 0 and human.stdout.split()[0] == "3"
    assert cli("changes", "--after", "-1", "--db", db_url).returncode == 2


def test_follow_prints_changes_as_they_commit(cli, db_url: str, tmp_path: Path) -> None:
    first = write_jsonl(tmp_path / "first.jsonl", SCENARIO[:4])
    assert cli("apply", str(first), "--db", db_url).returncode == 0
    head = len(lines_of(cli("changes", "--db", db_url, "--json")))
    number = next(
        c["data"]["number"]
        for c in lines_of(cli("changes", "--db", db_url, "--json"))
        if c["kind"] == "service_number.issued"
    )
    follower = subprocess.Popen(
        [
            *CLI,
            "changes",
            "--follow",
            "--after",
            str(head),
            "--limit",
            "2",
            "--json",
            "--db",
            db_url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        time.sleep(1.0)  # it is waiting now
        assert follower.poll() is None
        second = write_jsonl(tmp_path / "second.jsonl", [filing_of(number)])
        assert cli("apply", str(second), "--db", db_url).returncode == 0
        out, err = follower.communicate(timeout=60)
    finally:
        follower.kill()
    assert follower.returncode == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    assert [(c["position"], c["kind"]) for c in got] == [
        (head + 1, "service_number.used"),
        (head + 2, "filing.accepted"),
    ]


def test_webhooks_commands(cli, db_url: str, tmp_path: Path) -> None:
    from ledger.webhooks import SIGNATURE_HEADER, verify_signature
    from tests.helpers.webhooks import Receiver

    receiver = Receiver()
    try:
        proc = cli(
            *("webhooks", "add", receiver.url, "--kind", "service_number.issued"),
            *("--db", db_url, "--json"),
        )
        assert proc.returncode == 0, proc.stderr
        endpoint = json.loads(proc.stdout)
        assert endpoint["secret"].startswith("whsec_") and endpoint["cursor"] == 0
        assert cli("webhooks", "add", "ftp://nowhere", "--db", db_url).returncode == 2

        events = write_jsonl(tmp_path / "events.jsonl", SCENARIO[:4])
        assert cli("apply", str(events), "--db", db_url).returncode == 0
        proc = cli("webhooks", "deliver", "--db", db_url, "--json")
        assert json.loads(proc.stdout) == {
            "endpoints": 1,
            "delivered": 1,
            "failed": 0,
            "disabled": [],
        }
        ((headers, body),) = receiver.accepted()
        assert json.loads(body)["kind"] == "service_number.issued"
        assert verify_signature(
            endpoint["secret"], headers[SIGNATURE_HEADER], body, now=int(time.time())
        )
        (listed,) = json.loads(cli("webhooks", "list", "--db", db_url, "--json").stdout)
        head = len(lines_of(cli("changes", "--db", db_url, "--json")))
        assert "secret" not in listed and listed["cursor"] == head  # passed over other kinds
        (attempt,) = json.loads(
            cli("webhooks", "log", str(endpoint["id"]), "--db", db_url, "--json").stdout
        )
        assert (attempt["status"], attempt["attempt"]) == (200, 1)
        assert cli("webhooks", "remove", str(endpoint["id"]), "--db", db_url).returncode == 0
        assert cli("webhooks", "remove", str(endpoint["id"]), "--db", db_url).returncode == 1
    finally:
        receiver.close()
