"""The pure rules (no database): decision order, facts that commute, expiry, repair, release."""

from __future__ import annotations

import itertools

import pytest

from ledger.policy import load_policy
from ledger.rules import eligibility
from tests.support import Events, MemoryLedger, day

POLICY = load_policy()


@pytest.fixture
def led() -> MemoryLedger:
    return MemoryLedger(POLICY)


@pytest.fixture
def ev() -> Events:
    return Events()


def last_entry(led: MemoryLedger, iid: str) -> dict:
    return led.entries[iid][-1]


def reasons(led: MemoryLedger, iid: str) -> list[str]:
    return last_entry(led, iid)["reasons"]


# -- eligibility ----------------------------------------------------------------------------------


def test_released_before_purchase_is_ineligible_with_instance_released(led, ev) -> None:
    led.apply(ev.release("i", at=1))
    verdict = eligibility(led.state("i"), POLICY, day(2))
    assert (verdict.status, verdict.reasons) == ("ineligible", ("instance_released",))
    assert led.state("i").status == "released"
    # A purchase after the release is stale: release is final.
    assert led.apply(ev.purchase("i", at=0)) == "stale"


def test_unknown_until_purchase(led, ev) -> None:
    led.apply(ev.bandwidth("i", 10, at=1))
    assert eligibility(led.state("i"), POLICY, day(2)).status == "unknown"
    assert led.state("i").status == "unknown"


def test_not_mainland_wins_over_other_reasons(led, ev) -> None:
    led.apply(ev.purchase("hk", region="cn-hongkong", billing="pay_as_you_go", bandwidth=0))
    assert eligibility(led.state("hk"), POLICY, day(1)).status == "not_required"
    led.apply(ev.purchase("sg", region="ap-southeast-1"))
    assert eligibility(led.state("sg"), POLICY, day(1)).status == "not_required"


def test_all_reasons_reported_together_in_table_order(led, ev) -> None:
    led.apply(ev.purchase("i", term=1, expires=20, bandwidth=0))
    verdict = eligibility(led.state("i"), POLICY, day(1))
    assert verdict.reasons == ("term_too_short", "remaining_term_too_short", "no_public_bandwidth")


def test_expired_is_not_reported_with_remaining_term(led, ev) -> None:
    led.apply(ev.purchase("i", term=1, expires=20))
    verdict = eligibility(led.state("i"), POLICY, day(20))
    assert verdict.reasons == ("term_too_short", "instance_expired")


def test_pay_as_you_go_only_judges_billing_bandwidth_and_amount(led, ev) -> None:
    led.apply(ev.purchase("i", billing="pay_as_you_go", bandwidth=0))
    assert eligibility(led.state("i"), POLICY, day(1)).reasons == (
        "pay_as_you_go",
        "no_public_bandwidth",
    )
    led.apply(ev.purchase("m", "marketplace", billing="pay_as_you_go", amount="10"))
    assert eligibility(led.state("m"), POLICY, day(1)).reasons == (
        "pay_as_you_go",
        "order_amount_too_low",
    )


def test_conversion_to_subscription_makes_payg_eligible(led, ev) -> None:
    led.apply(ev.purchase("i", billing="pay_as_you_go"))
    led.apply(ev.convert("i", "subscription", at=5, term=3, expires=200))
    assert eligibility(led.state("i"), POLICY, day(6)).status == "eligible"
    # The latest conversion wins, whatever the arrival order.
    led.apply(ev.convert("i", "pay_as_you_go", at=3))
    assert led.state("i").billing_method == "subscription"


def test_expired_by_time_before_the_sweep(led, ev) -> None:
    led.apply(ev.purchase("i", expires=100))
    assert led.state("i").status == "active"
    assert eligibility(led.state("i"), POLICY, day(100)).reasons == ("instance_expired",)


# -- service-number requests ------------------------------------------------------------------------


def test_request_step_three_reports_both_codes(led, ev) -> None:
    led.apply(ev.purchase("i", "chengxintong_shop", region="cn-hongkong"))
    led.apply(ev.request("i"))
    assert reasons(led, "i") == ["service_number_not_needed", "region_not_mainland"]


def test_request_order_account_before_eligibility(led, ev) -> None:
    led.apply(ev.purchase("i", billing="pay_as_you_go"))
    led.apply(ev.request("i", account="acct-other"))
    assert reasons(led, "i") == ["account_mismatch"]


def test_request_eligibility_before_slots(led, ev) -> None:
    led.apply(ev.purchase("i", "nat_gateway", term=1, expires=100))
    led.apply_all([ev.request("i", at=1), ev.request("i", at=1)])
    led.apply(ev.request("i", at=90))
    assert reasons(led, "i") == ["website_limit_reached"]
    led.apply(ev.request("i", at=100))
    assert reasons(led, "i") == ["instance_expired"]


def test_request_on_unknown_instance_even_if_released(led, ev) -> None:
    led.apply(ev.release("i", at=1))
    led.apply(ev.request("i"))
    assert reasons(led, "i") == ["instance_unknown"]


# -- filings ----------------------------------------------------------------------------------------


def _issued(
    led: MemoryLedger, ev: Events, iid: str, product: str = "ecs", n: int = 1, **purchase
) -> list[str]:
    led.apply(ev.purchase(iid, product, **purchase))
    for _ in range(n):
        assert led.apply(ev.request(iid, at=10)) == "applied"
    return [num for num, sn in led.state(iid).numbers.items() if sn.status == "active"]


def test_filing_with_number_of_another_instance_is_invalid(led, ev) -> None:
    (number,) = _issued(led, ev, "a")
    _issued(led, ev, "b")
    led.apply(ev.file("b", number))
    assert reasons(led, "b") == ["service_number_invalid"]


def test_filing_on_expired_instance_reports_invalid_and_expired(led, ev) -> None:
    (number,) = _issued(led, ev, "i", expires=100)
    led.apply(ev.file("i", number, at=100))
    assert reasons(led, "i") == ["service_number_invalid", "instance_expired"]


def test_filing_checks_product_before_use_before_filing_id_before_account(led, ev) -> None:
    first, second = _issued(led, ev, "i", n=2)
    led.apply(ev.file("i", first, filing="F1"))
    led.apply(ev.file("i", first, filing="F1", product="virtual_host", account="x"))
    assert reasons(led, "i") == ["product_type_mismatch"]
    led.apply(ev.file("i", first, filing="F1", account="x"))
    assert reasons(led, "i") == ["service_number_used"]
    led.apply(ev.file("i", second, filing="F1", account="x"))
    assert reasons(led, "i") == ["filing_id_reused"]
    led.apply(ev.file("i", second, filing="F2", account="x"))
    assert reasons(led, "i") == ["account_mismatch"]


def test_rejected_filing_may_be_retried_under_its_id(led, ev) -> None:
    (number,) = _issued(led, ev, "i")
    assert led.apply(ev.file("i", number, filing="F1", account="x")) == "rejected"
    assert led.apply(ev.file("i", number, filing="F1")) == "applied"


def test_filing_other_eligibility_reasons_after_account(led, ev) -> None:
    (number,) = _issued(led, ev, "i")
    led.apply(ev.bandwidth("i", 0, at=10.5))
    led.apply(ev.file("i", number))
    assert reasons(led, "i") == ["no_public_bandwidth"]


def test_withdrawal_frees_nothing(led, ev) -> None:
    (number,) = _issued(led, ev, "i", "nat_gateway", term=1, expires=100)
    assert (
        led.apply(ev.file("i", number, filing="F1", subject="s1", product="nat_gateway"))
        == "applied"
    )
    assert led.apply(ev.withdraw("i", "F1")) == "applied"
    assert led.apply(ev.withdraw("i", "F1")) == "stale"
    state = led.state("i")
    assert state.filings["F1"].status == "withdrawn"
    assert state.websites_used == 1 and state.subjects == {"s1"}


def test_withdrawal_on_released_instance(led, ev) -> None:
    (number,) = _issued(led, ev, "i")
    led.apply(ev.file("i", number, filing="F1"))
    led.apply(ev.release("i", at=20))
    assert led.apply(ev.withdraw("i", "F1", at=21)) == "rejected"
    assert reasons(led, "i") == ["instance_released"]


# -- facts ------------------------------------------------------------------------------------------


def test_facts_before_purchase_count_once_it_arrives(led, ev) -> None:
    assert led.apply(ev.renew("i", at=50, term=12, expires=800)) == "applied"
    assert led.apply(ev.bandwidth("i", 0, at=60)) == "applied"
    led.apply(ev.purchase("i", at=0, term=12, expires=365, bandwidth=5))
    state = led.state("i")
    assert state.term_months == 24 and state.expires_at == day(800)
    assert state.public_bandwidth_mbps == 0  # the later bandwidth change wins


def test_second_purchase_is_stale(led, ev) -> None:
    led.apply(ev.purchase("i", account="a1", term=12))
    assert led.apply(ev.purchase("i", account="a2", term=24, expires=900)) == "stale"
    state = led.state("i")
    assert state.purchase.account_id == "a1" and state.term_months == 12


def test_facts_after_release_are_stale_and_release_invalidates(led, ev) -> None:
    numbers = _issued(led, ev, "i", n=2)
    assert led.apply(ev.release("i", at=20)) == "applied"
    assert last_entry(led, "i")["result"] == {"invalidated": numbers}
    assert led.apply(ev.renew("i", at=21, term=12, expires=900)) == "stale"
    assert led.apply(ev.release("i", at=22)) == "stale"
    assert {sn.invalidated_reason for sn in led.state("i").numbers.values()} == {
        "instance_released"
    }


# -- expiry and late renewal repair -----------------------------------------------------------------


def test_expiry_invalidates_unused_numbers_issued_before_the_end(led, ev) -> None:
    first, second = _issued(led, ev, "i", n=2, expires=100)
    led.apply(ev.file("i", first))
    assert led.apply(ev.expire("i", end=100)) == "applied"
    state = led.state("i")
    assert state.status == "expired"
    assert state.numbers[first].status == "used"
    assert state.numbers[second].status == "invalidated"
    assert state.numbers[second].invalidated_reason == "instance_expired"
    assert led.apply(ev.expire("i", end=100, at=101)) == "stale"  # same end again


def test_expiry_void_when_renewed_before_the_end(led, ev) -> None:
    _issued(led, ev, "i", expires=100)
    led.apply(ev.renew("i", at=90, term=12, expires=465))
    assert led.apply(ev.expire("i", end=100)) == "stale"
    assert led.state("i").status == "active"


def test_grace_period_renewal_reactivates_but_revives_nothing(led, ev) -> None:
    (number,) = _issued(led, ev, "i", expires=100)
    led.apply(ev.expire("i", end=100))
    assert led.apply(ev.renew("i", at=105, term=12, expires=470)) == "applied"
    state = led.state("i")
    assert state.status == "active"
    assert state.numbers[number].status == "invalidated"
    # The freed slot can be issued anew.
    assert led.apply(ev.request("i", at=106)) == "applied"


def test_late_renewal_repair_revives_oldest_first_within_free_slots(led, ev) -> None:
    numbers = _issued(led, ev, "i", "nat_gateway", n=2, term=1, expires=100)
    led.apply(ev.expire("i", end=100))
    # Grace renewal, then a new number takes one of the two slots.
    led.apply(ev.renew("i", at=105, term=1, expires=135))
    assert led.apply(ev.request("i", at=106)) == "applied"
    # A renewal that happened before the end arrives late: the expiry is void.
    assert led.apply(ev.renew("i", at=95, term=1, expires=130)) == "applied"
    result = last_entry(led, "i")["result"]
    assert result["revived"] == numbers[:1]  # one free slot, oldest first
    state = led.state("i")
    assert state.numbers[numbers[0]].status == "active"
    assert state.numbers[numbers[1]].status == "invalidated"
    assert state.websites_reserved == 2 and state.status == "active"


def test_expiry_before_purchase_is_voided_by_it(led, ev) -> None:
    assert led.apply(ev.expire("i", end=50)) == "applied"
    led.apply(ev.purchase("i", at=0, expires=365))
    state = led.state("i")
    assert state.status == "active"
    assert all(expiry.void for expiry in state.expiries)


def test_hash_chain_links_entries(led, ev) -> None:
    led.apply_all([ev.purchase("i"), ev.request("i"), ev.request("i", account="x")])
    entries = led.entries["i"]
    assert [e["instance_seq"] for e in entries] == [1, 2, 3]
    assert entries[0]["prev_hash"] == "0" * 64
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(entries))
    assert led.state("i").head_hash == entries[-1]["hash"]


def test_pay_as_you_go_purchase_term_and_end_are_ignored(led, ev) -> None:
    data = ev.purchase("i", billing="pay_as_you_go")
    data.update(term_months=12, expires_at=data["occurred_at"].replace("2026", "2027"))
    assert led.apply(data) == "applied"
    state = led.state("i")
    assert state.term_months == 0 and state.expires_at is None
    assert eligibility(state, POLICY, day(1)).reasons == ("pay_as_you_go",)
    # Converted later: only the conversion's term counts.
    led.apply(ev.convert("i", "subscription", at=5, term=3, expires=200))
    assert led.state("i").term_months == 3
