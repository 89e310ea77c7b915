"""``quota-ledger publish`` (in-process, fakeredis broker, SQLite for dead letters) and the
registration of ``publish`` / ``worker`` / ``beat`` on the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import select
from sqlmodel import Session
from typer.testing import CliRunner

from events.publish import QUEUE_EVENTS, close_producer
from ledger.db import make_engine
from ledger.settings import get_settings
from ledger.tables import DeadLetter
from tests.support import Events, message_body
from worker.cli import app
from worker.embedded import fake_redis_server

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def broker(monkeypatch) -> Iterator[str]:
    with fake_redis_server() as url:
        monkeypatch.setenv("QUOTA_LEDGER_BROKER_URL", url)
        get_settings.cache_clear()
        try:
            yield url
        finally:
            get_settings.cache_clear()
            close_producer(url)


def _queued_batches(url: str) -> list[list[dict]]:
    client = redis.Redis.from_url(url)
    try:
        raw = reversed(client.lrange(QUEUE_EVENTS, 0, -1))
        return [message_body(json.loads(m))[0][0] for m in raw]
    finally:
        client.close()


def _file(tmp_path: Path, lines: list[bytes]) -> Path:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_publish_enqueues_valid_lines_and_dead_letters_invalid_ones(broker, tmp_path) -> None:
    factory = Events("cli")
    good = [json.dumps(factory.purchase(f"i-{n}")).encode() for n in range(3)]
    path = _file(tmp_path, [good[0], b"", b"{broken", good[1], b"\xff\xfe", good[2]])
    db = f"sqlite:///{tmp_path / 'dl.db'}"
    result = CliRunner().invoke(
        app, ["publish", str(path), "--json", "--db", db, "--batch-size", "2"]
    )
    assert result.exit_code == 1, result.output
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["outcome"] for a in answers] == ["queued", "invalid", "queued", "invalid", "queued"]
    assert answers[0] == {
        "event_id": "cli-1",
        "outcome": "queued",
        "reasons": [],
        "service_number": None,
    }
    assert answers[1]["reasons"] == ["invalid_event"] and "not valid JSON" in answers[1]["error"]
    assert "UTF-8" in answers[3]["error"]
    # Chunks of --batch-size input lines; each chunk's valid lines are one message.
    assert [[e["event_id"] for e in batch] for batch in _queued_batches(broker)] == [
        ["cli-1"],
        ["cli-2"],
        ["cli-3"],
    ]
    engine = make_engine(db)
    try:
        with Session(engine) as session:
            letters = session.execute(select(DeadLetter.code, DeadLetter.raw)).all()
    finally:
        engine.dispose()
    assert letters == [("invalid_event", "{broken"), ("invalid_event", "\\xff\\xfe")]


def test_publish_human_output_names_line_numbers(broker, tmp_path) -> None:
    factory = Events("human")
    path = _file(tmp_path, [json.dumps(factory.purchase("i-h")).encode(), b"[1, 2]"])
    result = CliRunner().invoke(
        app, ["publish", str(path), "--db", f"sqlite:///{tmp_path / 'h.db'}"]
    )
    assert result.exit_code == 1
    assert "1 event(s) queued in 1 message(s)" in result.stdout
    assert "expected a JSON object" in result.stdout
    row = next(line for line in result.stdout.splitlines() if "expected a JSON object" in line)
    assert row.split()[1] == "2"  # the line number


def test_clean_file_needs_no_database(broker, tmp_path) -> None:
    path = _file(tmp_path, [json.dumps(Events("ok").purchase("i-ok")).encode()])
    db_file = tmp_path / "never.db"
    result = CliRunner().invoke(app, ["publish", str(path), "--db", f"sqlite:///{db_file}"])
    assert result.exit_code == 0, result.output
    assert not db_file.exists()
    assert len(_queued_batches(broker)) == 1


def test_publish_from_stdin(broker, tmp_path) -> None:
    line = json.dumps(Events("in").purchase("i-in"))
    result = CliRunner().invoke(app, ["publish", "-", "--json"], input=line + "\n")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["outcome"] == "queued"


def test_publish_usage_and_io_errors(broker, tmp_path, monkeypatch) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["publish", str(tmp_path / "missing.jsonl")])
    assert missing.exit_code == 2 and "cannot read" in missing.output
    too_big = runner.invoke(app, ["publish", "-", "--batch-size", "1001"], input="")
    assert too_big.exit_code == 2

    from events import publish as module

    monkeypatch.setattr(
        module,
        "PUBLISH_RETRY_POLICY",
        {"max_retries": 1, "interval_start": 0, "interval_step": 0.1, "interval_max": 0.1},
    )
    monkeypatch.setattr(module, "PUBLISH_CONNECT_SECONDS", 0.5)
    monkeypatch.setenv("QUOTA_LEDGER_BROKER_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    try:
        path = _file(tmp_path, [json.dumps(Events("down").purchase("i-d")).encode()])
        down = runner.invoke(app, ["publish", str(path)])
        assert down.exit_code == 2
        assert "broker error" in down.output
    finally:
        close_producer("redis://127.0.0.1:1/0")


def test_cli_lists_the_pipeline_commands() -> None:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in ("publish", "worker", "beat"):
        assert f" {name} " in result.stdout, name
    worker_help = CliRunner().invoke(app, ["worker", "--help"], env={"COLUMNS": "200"})
    for option in ("--concurrency", "--pool", "--queues", "--loglevel"):
        assert option in worker_help.stdout
