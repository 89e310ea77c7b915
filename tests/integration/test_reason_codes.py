"""One test per reason code of SPEC §4, through the public apply/show path (SQLite)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ledger.policy import load_policy
from ledger.reasons import REASONS, explain
from ledger.service import ApplyResult, Ledger
from tests.helpers.ledger_harness import Harness
from tests.support import Events, Numbers, day

Scenario = Callable[[Harness, Events, str], ApplyResult]


def _eligible_ecs(h: Harness, ev: Events, iid: str, **purchase) -> str:
    """An eligible ECS instance with one issued service number; returns the number."""
    h.apply_one(ev.purchase(iid, "ecs", **purchase))
    result = h.apply_one(ev.request(iid, at=10))
    assert result.outcome == "applied", result
    return result.service_number


def instance_unknown(h: Harness, ev: Events, iid: str) -> ApplyResult:
    return h.apply_one(ev.request(iid))


def product_type_mismatch(h: Harness, ev: Events, iid: str) -> ApplyResult:
    number = _eligible_ecs(h, ev, iid)
    return h.apply_one(ev.file(iid, number, product="virtual_host"))


def service_number_invalid(h: Harness, ev: Events, iid: str) -> ApplyResult:
    _eligible_ecs(h, ev, iid)
    return h.apply_one(ev.file(iid, "SN-never-issued"))


def service_number_used(h: Harness, ev: Events, iid: str) -> ApplyResult:
    number = _eligible_ecs(h, ev, iid)
    assert h.apply_one(ev.file(iid, number)).outcome == "applied"
    return h.apply_one(ev.file(iid, number, subject="subject-2"))


def service_number_not_needed(h: Harness, ev: Events, iid: str) -> ApplyResult:
    h.apply_one(ev.purchase(iid, "chengxintong_shop"))
    return h.apply_one(ev.request(iid))


def account_mismatch(h: Harness, ev: Events, iid: str) -> ApplyResult:
    h.apply_one(ev.purchase(iid, "ecs", account="acct-owner"))
    return h.apply_one(ev.request(iid, account="acct-someone-else"))


def pay_as_you_go(h: Harness, ev: Events, iid: str) -> ApplyResult:
    h.apply_one(ev.purchase(iid, "ecs", billing="pay_as_you_go"))
    return h.apply_one(ev.request(iid))


def term_too_short(h: Harness, ev: Events, iid: str) -> ApplyResult:
    h.apply_one(ev.purchase(iid, "ecs", term=2, expires=200))
    return h.apply_one(ev.request(iid))


def remaining_term_too_short(h: Harness, ev: Events, iid: str) -> ApplyResult:
    h.apply_one(ev.purchase(iid, "ecs", term=3, expires=100))
    return h.apply_one(ev.request(iid, at=80))


def no_public_bandwidth(h: Harness, ev: Events, iid: str) -> ApplyResult:
    h.apply_one(ev.purchase(iid, "ecs", bandwidth=0))
    return h.apply_one(ev.request(iid))


def order_amount_too_low(h: Harness, ev: Events, iid: str) -> ApplyResult:
    h.apply_one(ev.purchase(iid, "marketplace", amount="98"))
    return h.apply_one(ev.request(iid))


def instance_expired(h: Harness, ev: Events, iid: str) -> ApplyResult:
    h.apply_one(ev.purchase(iid, "ecs", expires=100))
    return h.apply_one(ev.request(iid, at=100))


def instance_released(h: Harness, ev: Events, iid: str) -> ApplyResult:
    h.apply_one(ev.purchase(iid, "ecs"))
    h.apply_one(ev.release(iid, at=5))
    return h.apply_one(ev.request(iid))


def website_limit_reached(h: Harness, ev: Events, iid: str) -> ApplyResult:
    h.apply_one(ev.purchase(iid, "nat_gateway", term=1, expires=40))
    h.apply(ev.request(iid), ev.request(iid))
    return h.apply_one(ev.request(iid))


def subject_limit_reached(h: Harness, ev: Events, iid: str) -> ApplyResult:
    # With the seed's figures websites cap = subjects cap, so the subject cap can only bind
    # under a policy that allows more websites than subjects: an operator's policy file.
    seed = load_policy()
    ecs = seed.products["ecs"].model_copy(update={"subject_cap": 1})
    policy = seed.model_copy(update={"products": {**seed.products, "ecs": ecs}})
    narrow = Harness(h.engine, Ledger(h.engine, policy, new_number=Numbers("SUBJ")))
    narrow.apply_one(ev.purchase(iid, "ecs"))
    first, second = narrow.apply(ev.request(iid), ev.request(iid))
    assert narrow.apply_one(ev.file(iid, first.service_number, subject="a")).outcome == "applied"
    # The same subject may file again; a new one may not.
    assert narrow.apply_one(ev.file(iid, second.service_number, subject="b")).outcome == "rejected"
    return narrow.apply_one(ev.file(iid, second.service_number, subject="b"))


def region_not_mainland(h: Harness, ev: Events, iid: str) -> ApplyResult:
    h.apply_one(ev.purchase(iid, "ecs", region="cn-hongkong"))
    return h.apply_one(ev.request(iid))


def filing_unknown(h: Harness, ev: Events, iid: str) -> ApplyResult:
    _eligible_ecs(h, ev, iid)
    return h.apply_one(ev.withdraw(iid, "filing-never-accepted"))


def filing_id_reused(h: Harness, ev: Events, iid: str) -> ApplyResult:
    number = _eligible_ecs(h, ev, iid)
    other = h.apply_one(ev.request(iid, at=10)).service_number
    assert h.apply_one(ev.file(iid, number, filing="F-1")).outcome == "applied"
    return h.apply_one(ev.file(iid, other, filing="F-1"))


SCENARIOS: dict[str, tuple[Scenario, tuple[str, ...]]] = {
    "instance_unknown": (instance_unknown, ("instance_unknown",)),
    "product_type_mismatch": (product_type_mismatch, ("product_type_mismatch",)),
    "service_number_invalid": (service_number_invalid, ("service_number_invalid",)),
    "service_number_used": (service_number_used, ("service_number_used",)),
    "service_number_not_needed": (service_number_not_needed, ("service_number_not_needed",)),
    "account_mismatch": (account_mismatch, ("account_mismatch",)),
    "pay_as_you_go": (pay_as_you_go, ("pay_as_you_go",)),
    "term_too_short": (term_too_short, ("term_too_short",)),
    "remaining_term_too_short": (remaining_term_too_short, ("remaining_term_too_short",)),
    "no_public_bandwidth": (no_public_bandwidth, ("no_public_bandwidth",)),
    "order_amount_too_low": (order_amount_too_low, ("order_amount_too_low",)),
    "instance_expired": (instance_expired, ("instance_expired",)),
    "instance_released": (instance_released, ("instance_released",)),
    "website_limit_reached": (website_limit_reached, ("website_limit_reached",)),
    "subject_limit_reached": (subject_limit_reached, ("subject_limit_reached",)),
    "region_not_mainland": (region_not_mainland, ("region_not_mainland",)),
    "filing_unknown": (filing_unknown, ("filing_unknown",)),
    "filing_id_reused": (filing_id_reused, ("filing_id_reused",)),
}


def test_every_reason_code_has_a_scenario() -> None:
    assert set(SCENARIOS) == set(REASONS)


@pytest.mark.parametrize("code", list(SCENARIOS))
def test_reason_code(sqlite_ledger: Harness, code: str) -> None:
    scenario, expected = SCENARIOS[code]
    iid = f"reason-{code}"
    result = scenario(sqlite_ledger, Events(f"rc-{code}"), iid)
    assert (result.outcome, result.reasons) == ("rejected", expected)
    # The refusal is kept in the ledger with its reasons.
    history_view = sqlite_ledger.show(iid, day(50))
    assert history_view["entries"] >= 1


SEED_MESSAGES = {
    "product_type_mismatch": "产品信息无效",
    "service_number_invalid": "验证产品信息失败，接口异常",
    "service_number_used": "每个备案服务号只可以使用一次",
    "service_number_not_needed": "诚信通旺铺备案无需申请备案服务号",
    "account_mismatch": "您登录的账号不是您购买该服务器时使用的账号",
    "pay_as_you_go": "按量付费实例不支持备案",
    "remaining_term_too_short": "包年包月的剩余时长已不满足备案要求",
    "website_limit_reached": "已超过该服务器可备案的网站数量限制",
    "subject_limit_reached": "产品已经提交过网站备案，备案主体数已经达到了规定的主体上限，请更换其他产品",
    "region_not_mainland": "使用中国香港地区的服务器托管网站，不用备案",
    "order_amount_too_low": "订单金额99元及以上",
}


@pytest.mark.parametrize("code", list(REASONS))
def test_reason_explanations(code: str) -> None:
    policy = load_policy()
    product = policy.products["marketplace" if code == "order_amount_too_low" else "ecs"]
    explained = explain(code, product)
    assert set(explained) == {"code", "message_zh", "message_en", "remediation"}
    assert all(explained.values())
    if code in SEED_MESSAGES:
        assert explained["message_zh"] == SEED_MESSAGES[code]
    assert "{" not in "".join(explained.values())


def test_term_message_names_the_products_minimum() -> None:
    policy = load_policy()
    assert explain("term_too_short", policy.products["ecs"])["message_zh"] == "包月3个月及以上"
    assert (
        explain("term_too_short", policy.products["web_hosting"])["message_zh"] == "包月6个月及以上"
    )


def test_show_explains_each_reason(sqlite_ledger: Harness) -> None:
    ev = Events("explain")
    sqlite_ledger.apply_one(ev.purchase("explain-1", "ecs", term=1, expires=20, bandwidth=0))
    reasons = sqlite_ledger.show("explain-1", day(1))["eligibility"]["reasons"]
    assert [r["code"] for r in reasons] == [
        "term_too_short",
        "remaining_term_too_short",
        "no_public_bandwidth",
    ]
    assert reasons[2]["message_zh"] == "未开通公网带宽"
