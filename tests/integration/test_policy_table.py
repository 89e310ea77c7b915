"""One table-driven test per row of SPEC §3, through the public apply/show path (SQLite)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import pytest

from tests.helpers.ledger_harness import Harness
from tests.support import Events, day


@dataclass(frozen=True)
class Row:
    product: str
    min_term: int  # 0 = no minimum
    min_remaining_days: int
    websites: int
    subjects: int


ROWS = [
    Row("ecs", 3, 30, 5, 5),
    Row("virtual_host", 0, 0, 5, 5),
    Row("web_hosting", 6, 30, 5, 5),
    Row("simple_app_server", 3, 30, 5, 5),
    Row("ens", 3, 30, 5, 5),
    Row("marketplace", 12, 30, 1, 1),
    Row("nat_gateway", 1, 0, 2, 2),
    Row("ipv6_translation", 1, 0, 2, 2),
    Row("jushita_ecs", 0, 0, 5, 5),
    Row("jushita_slb", 0, 0, 5, 5),
]


def _codes(view: dict) -> list[str]:
    return [reason["code"] for reason in view["eligibility"]["reasons"]]


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.product)
def test_policy_row(sqlite_ledger: Harness, row: Row) -> None:
    ev = Events(f"row-{row.product}")
    term = max(row.min_term, 1)
    base = f"{row.product}-"

    # Qualifying purchase: subscription of exactly the minimum term, 200 days to run.
    good = base + "good"
    assert (
        sqlite_ledger.apply_one(ev.purchase(good, row.product, term=term, expires=200)).outcome
        == "applied"
    )
    view = sqlite_ledger.show(good, day(10))
    assert view["eligibility"]["status"] == "eligible", view["eligibility"]
    assert view["websites"] == {
        "cap": row.websites,
        "used": 0,
        "reserved": 0,
        "remaining": row.websites,
    }
    assert view["subjects"] == {"cap": row.subjects, "used": 0, "remaining": row.subjects}

    # websites = service numbers: exactly the cap is issued, the next is refused.
    results = sqlite_ledger.apply(*[ev.request(good, at=10) for _ in range(row.websites + 1)])
    assert [r.outcome for r in results] == ["applied"] * row.websites + ["rejected"]
    assert results[-1].reasons == ("website_limit_reached",)
    numbers = [r.service_number for r in results[:-1]]

    # subjects: each number used by a new subject until the subject cap.
    filings = [
        ev.file(good, number, at=11, subject=f"subject-{i}", product=row.product)
        for i, number in enumerate(numbers)
    ]
    assert [r.outcome for r in sqlite_ledger.apply(*filings)] == ["applied"] * row.websites
    view = sqlite_ledger.show(good, day(12))
    assert view["websites"]["used"] == row.websites and view["websites"]["remaining"] == 0
    assert view["subjects"]["used"] == row.subjects and view["subjects"]["remaining"] == 0

    # Min term: one month short is refused with term_too_short.
    if row.min_term > 1:
        short = base + "short-term"
        sqlite_ledger.apply_one(ev.purchase(short, row.product, term=row.min_term - 1, expires=200))
        assert _codes(sqlite_ledger.show(short, day(10))) == ["term_too_short"]

    # Min remaining: exactly the minimum passes, one second less fails. With no minimum the
    # instance is eligible up to its end and expired from it on.
    edge = base + "remaining"
    sqlite_ledger.apply_one(ev.purchase(edge, row.product, term=term, expires=100))
    second = timedelta(seconds=1)
    if row.min_remaining_days:
        boundary = day(100) - timedelta(days=row.min_remaining_days)
        assert sqlite_ledger.show(edge, boundary)["eligibility"]["status"] == "eligible"
        assert _codes(sqlite_ledger.show(edge, boundary + second)) == ["remaining_term_too_short"]
    else:
        assert sqlite_ledger.show(edge, day(100) - second)["eligibility"]["status"] == "eligible"
    assert _codes(sqlite_ledger.show(edge, day(100))) == ["instance_expired"]

    # Every row needs a subscription.
    payg = base + "payg"
    sqlite_ledger.apply_one(ev.purchase(payg, row.product, billing="pay_as_you_go"))
    assert _codes(sqlite_ledger.show(payg, day(10))) == ["pay_as_you_go"]


def test_ecs_row_needs_public_bandwidth(sqlite_ledger: Harness) -> None:
    ev = Events("row-ecs-bw")
    sqlite_ledger.apply_one(ev.purchase("ecs-no-bw", "ecs", bandwidth=0))
    assert _codes(sqlite_ledger.show("ecs-no-bw", day(10))) == ["no_public_bandwidth"]
    sqlite_ledger.apply_one(ev.bandwidth("ecs-no-bw", 1, at=20))
    assert sqlite_ledger.show("ecs-no-bw", day(21))["eligibility"]["status"] == "eligible"
    # Other products need no public bandwidth.
    sqlite_ledger.apply_one(ev.purchase("vh-no-bw", "virtual_host", bandwidth=0))
    assert sqlite_ledger.show("vh-no-bw", day(10))["eligibility"]["status"] == "eligible"


def test_marketplace_row_counts_first_purchase_and_order_amount(sqlite_ledger: Harness) -> None:
    ev = Events("row-mkt")
    # 11 months first, then a 12-month renewal: still short, only the first purchase counts.
    sqlite_ledger.apply(
        ev.purchase("mkt-short", "marketplace", term=11, expires=330),
        ev.renew("mkt-short", at=20, term=12, expires=700),
    )
    assert _codes(sqlite_ledger.show("mkt-short", day(30))) == ["term_too_short"]
    # Order amount: 98.99 is too low, exactly 99 passes.
    sqlite_ledger.apply_one(ev.purchase("mkt-cheap", "marketplace", amount="98.99"))
    assert _codes(sqlite_ledger.show("mkt-cheap", day(10))) == ["order_amount_too_low"]
    sqlite_ledger.apply_one(ev.purchase("mkt-99", "marketplace", amount="99"))
    assert sqlite_ledger.show("mkt-99", day(10))["eligibility"]["status"] == "eligible"


def test_renewals_and_conversions_add_to_the_term(sqlite_ledger: Harness) -> None:
    ev = Events("row-term")
    sqlite_ledger.apply(
        ev.purchase("ecs-term", "ecs", term=1, expires=31),
        ev.renew("ecs-term", at=5, term=1, expires=62),
    )
    assert _codes(sqlite_ledger.show("ecs-term", day(10))) == ["term_too_short"]
    sqlite_ledger.apply_one(ev.renew("ecs-term", at=6, term=1, expires=200))
    assert sqlite_ledger.show("ecs-term", day(10))["eligibility"]["status"] == "eligible"


def test_chengxintong_shop_row_needs_no_service_number(sqlite_ledger: Harness) -> None:
    ev = Events("row-cxt")
    sqlite_ledger.apply_one(
        ev.purchase("cxt", "chengxintong_shop", billing="pay_as_you_go", bandwidth=0)
    )
    view = sqlite_ledger.show("cxt", day(10))
    assert view["eligibility"] == {
        "status": "not_needed",
        "as_of": "2026-01-11T00:00:00Z",
        "reasons": [],
    }
    assert view["websites"]["cap"] == 0 and view["subjects"]["cap"] == 0
    result = sqlite_ledger.apply_one(ev.request("cxt"))
    assert (result.outcome, result.reasons) == ("rejected", ("service_number_not_needed",))


def test_jushita_rows_issue_five_free_single_use_numbers(sqlite_ledger: Harness) -> None:
    ev = Events("row-jst")
    sqlite_ledger.apply_one(ev.purchase("jst", "jushita_slb", term=1, expires=40))
    number = sqlite_ledger.apply_one(ev.request("jst")).service_number
    assert (
        sqlite_ledger.apply_one(ev.file("jst", number, product="jushita_slb")).outcome == "applied"
    )
    again = sqlite_ledger.apply_one(ev.file("jst", number, product="jushita_slb", subject="other"))
    assert again.reasons == ("service_number_used",)
