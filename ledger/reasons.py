"""Reason codes (SPEC §4): every "no" the ledger says, with the seed's Chinese message, an English
message and what to do about it.

The order of ``REASONS`` is the order of SPEC §4's table; whenever several reasons are reported
together they are sorted by it (:func:`in_table_order`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ledger.policy import ProductPolicy


@dataclass(frozen=True)
class Reason:
    code: str
    message_zh: str
    message_en: str
    remediation: str


_TABLE: tuple[Reason, ...] = (
    Reason(
        "instance_unknown",
        # The seed has no message; its closest case is "服务器是其他供应商的".
        "未找到该服务器的购买记录",
        "No purchase is known for this instance.",
        "If the server is at another provider, file with that provider (服务器是其他供应商的: "
        "请联系您的服务器提供商进行备案操作).",
    ),
    Reason(
        "product_type_mismatch",
        "产品信息无效",
        "The product type claimed by the filing does not match the product bought.",
        "Check that the product type selected matches the product bought.",
    ),
    Reason(
        "service_number_invalid",
        "验证产品信息失败，接口异常",
        "The service number is unknown, belongs to another instance, or is no longer valid.",
        "The server it came from has expired; request a number from a server within its term.",
    ),
    Reason(
        "service_number_used",
        "每个备案服务号只可以使用一次",
        "This service number has already been used by a filing.",
        "Request a new service number.",
    ),
    Reason(
        "service_number_not_needed",
        "诚信通旺铺备案无需申请备案服务号",
        "A Chengxintong shop needs no service number.",
        "Bind the domain to the shop and file in the shop filing system (旺铺备案系统).",
    ),
    Reason(
        "account_mismatch",
        "您登录的账号不是您购买该服务器时使用的账号",
        "The account is not the one that bought the server.",
        "Log in with the account that bought the server.",
    ),
    Reason(
        "pay_as_you_go",
        "按量付费实例不支持备案",
        "Pay-as-you-go instances cannot carry ICP filings.",
        "Convert to subscription (按量付费转包年包月) for at least the minimum term.",
    ),
    Reason(
        "term_too_short",
        "包月{min_term_months}个月及以上",
        "The subscription term is shorter than {min_term_months} months.",
        "Renew or buy a longer term ({min_term_months} months or more).",
    ),
    Reason(
        "remaining_term_too_short",
        "包年包月的剩余时长已不满足备案要求",
        "Less than {min_remaining_days} days of the subscription remain.",
        "Renew the subscription (续费).",
    ),
    Reason(
        "no_public_bandwidth",
        "未开通公网带宽",
        "The ECS instance has no public bandwidth.",
        "Add public bandwidth (升降配).",
    ),
    Reason(
        "order_amount_too_low",
        "订单金额{min_first_order_cny}元及以上",
        "The first order amount is below {min_first_order_cny} CNY.",
        "Buy a qualifying marketplace product ({min_first_order_cny} CNY or more).",
    ),
    Reason(
        "instance_expired",
        "服务器已到期",
        "The instance has expired.",
        "Renew it, or use a server within its term.",
    ),
    Reason(
        "instance_released",
        "服务器已释放",
        "The instance has been released.",
        "Use another server.",
    ),
    Reason(
        "website_limit_reached",
        "已超过该服务器可备案的网站数量限制",
        "No website slot is left on this instance.",
        "Use another server.",
    ),
    Reason(
        "subject_limit_reached",
        "产品已经提交过网站备案，备案主体数已经达到了规定的主体上限，请更换其他产品",
        "The instance already carries the maximum number of filing subjects.",
        "Use another server.",
    ),
    Reason(
        "region_not_mainland",
        "使用中国香港地区的服务器托管网站，不用备案",
        "The region is outside mainland China; no ICP filing is needed.",
        "No filing is needed.",
    ),
    Reason(
        "filing_unknown",
        "该服务器没有此备案",
        "The instance never accepted this filing.",
        "Check the filing id.",
    ),
    Reason(
        "filing_id_reused",
        "该备案号已提交过",
        "A filing with this id was already accepted on this instance.",
        "Use a new filing id.",
    ),
)

REASONS: dict[str, Reason] = {reason.code: reason for reason in _TABLE}
_ORDER: dict[str, int] = {reason.code: index for index, reason in enumerate(_TABLE)}


def in_table_order(codes: set[str] | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted(set(codes), key=_ORDER.__getitem__))


def explain(code: str, product: ProductPolicy | None = None) -> dict[str, Any]:
    """The code with its messages and remediation, figures filled in from the product's policy."""
    reason = REASONS[code]
    figures = {
        "min_term_months": product.min_term_months if product else "N",
        "min_remaining_days": product.min_remaining_days if product else "N",
        "min_first_order_cny": (
            format(product.min_first_order_cny.normalize(), "f")
            if product and product.min_first_order_cny is not None
            else "N"
        ),
    }
    return {
        "code": reason.code,
        "message_zh": reason.message_zh.format(**figures),
        "message_en": reason.message_en.format(**figures),
        "remediation": reason.remediation.format(**figures),
    }
