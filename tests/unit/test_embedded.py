"""The embedded pipeline (fakeredis over TCP + a Celery worker thread, the production tasks) gives
the same answers as applying in-process, duplicates, reused ids and invalid lines included."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ledger.db import make_engine, upgrade
from ledger.policy import load_policy
from ledger.service import Ledger
from tests.support import Events
from worker.embedded import embedded_pipeline

pytestmark = pytest.mark.timeout(60)

POLICY = load_policy()


def _lines() -> list[str]:
    factory = Events("emb")
    purchase = factory.purchase("i-emb")
    lines = [json.dumps(purchase)]
    lines += [json.dumps(factory.request("i-emb", at=1 + k)) for k in range(6)]
    lines += [
        json.dumps(purchase),  # duplicate
        json.dumps({**purchase, "region": "cn-beijing"}),  # same id, other content
        "",
        "not json",
        json.dumps({**factory.request("i-emb"), "extra": 1}),
        json.dumps(factory.bandwidth("i-emb", 0, at=8)),
        json.dumps(factory.request("i-emb", at=9)),
    ]
    return lines


def _numbers_as_ordinals(results: list[dict]) -> list[dict]:
    names: dict[str, str] = {}
    out = []
    for result in results:
        number = result["service_number"]
        if number is not None:
            result = {**result, "service_number": names.setdefault(number, f"N{len(names) + 1}")}
        out.append(result)
    return out


def test_through_the_queue_equals_in_process(tmp_path: Path) -> None:
    lines = _lines()
    queued_url = f"sqlite:///{tmp_path / 'queued.db'}"
    local_url = f"sqlite:///{tmp_path / 'local.db'}"
    upgrade(queued_url)
    upgrade(local_url)
    queued_engine, local_engine = make_engine(queued_url), make_engine(local_url)
    try:
        with embedded_pipeline(queued_engine, POLICY) as pipeline:
            assert re.fullmatch(r"redis://127\.0\.0\.1:\d+/0", pipeline.broker_url)
            via_queue = [r.to_json() for r in pipeline.apply_lines(lines)]
        in_process = [r.to_json() for r in Ledger(local_engine, POLICY).apply_lines(lines)]
    finally:
        queued_engine.dispose()
        local_engine.dispose()
    assert _numbers_as_ordinals(via_queue) == _numbers_as_ordinals(in_process)
    outcomes = [r["outcome"] for r in via_queue]
    assert outcomes.count("duplicate") == 1 and outcomes.count("invalid") == 3
    assert [r["outcome"] for r in via_queue[1:7]] == ["applied"] * 5 + ["rejected"]
