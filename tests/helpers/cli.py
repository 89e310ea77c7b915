"""The CLI end-to-end tests' shared pieces: the console script, JSON readers, the scenario's
events (``tests/e2e``: the ``cli`` fixture lives in its conftest)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _command() -> list[str]:
    script = Path(sys.executable).with_name("quota-ledger")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "worker"]


CLI = _command()


def json_of(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.stdout.strip(), f"no output; stderr: {proc.stderr}"
    return json.loads(proc.stdout)


def lines_of(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stdout.splitlines()]


def write_jsonl(path: Path, lines: Sequence[dict[str, Any] | str]) -> Path:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
        encoding="utf-8",
    )
    return path


def purchase(iid: str, product: str, **fields: Any) -> dict[str, Any]:
    event = {
        "event_id": f"buy:{iid}",
        "type": "instance.purchased",
        "occurred_at": "2026-01-01T00:00:00Z",
        "instance_id": iid,
        "account_id": "acct-a",
        "product_type": product,
        "region": "cn-hangzhou",
        "billing_method": "subscription",
        "term_months": 12,
        "expires_at": "2027-01-01T00:00:00Z",
    }
    event.update(fields)
    return {k: v for k, v in event.items() if v is not None}


def request(event_id: str, iid: str, account: str = "acct-a", at: str = "2026-01-02T00:00:00Z"):
    return {
        "event_id": event_id,
        "type": "service_number.requested",
        "occurred_at": at,
        "instance_id": iid,
        "account_id": account,
    }


SCENARIO: list[dict[str, Any] | str] = [
    purchase("i-good", "ecs", public_bandwidth_mbps=5),
    purchase(
        "i-payg",
        "ecs",
        billing_method="pay_as_you_go",
        term_months=None,
        expires_at=None,
        public_bandwidth_mbps=5,
    ),
    purchase("i-nat", "nat_gateway", term_months=1, expires_at="2026-02-01T00:00:00Z"),
    request("req:good:1", "i-good"),
    request("req:good:mallory", "i-good", account="acct-mallory"),
    request("req:payg:1", "i-payg"),
    request("req:nat:1", "i-nat"),
    "",  # blank lines are skipped: no output line for them
    "this is not json",
    {  # a naive timestamp
        "event_id": "naive",
        "type": "instance.released",
        "occurred_at": "2026-01-03T00:00:00",
        "instance_id": "i-good",
    },
    purchase("i-good", "ecs", public_bandwidth_mbps=5),  # a re-delivery: duplicate
]


def filing_of(number: str) -> dict[str, Any]:
    return {
        "event_id": "filing:good:1",
        "type": "filing.submitted",
        "occurred_at": "2026-01-03T00:00:00Z",
        "instance_id": "i-good",
        "account_id": "acct-a",
        "filing_id": "F-1",
        "service_number": number,
        "product_type": "ecs",
        "subject_id": "subj-1",
        "website": "www.example.cn",
    }
