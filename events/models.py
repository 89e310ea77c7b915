"""Event models: one frozen pydantic model per event type of SPEC §5.

Design notes (why it looks like this):

* Every field is checked by a hand-written "before" validator, and the models run in pydantic's
  strict mode. Publishers are machines; silently coercing ``"3"`` to ``3`` or ``true`` to ``1``
  would hide their bugs and make two different payloads mean the same thing. The validators word
  each problem with :mod:`events.problems`, which also formats them into the one-line,
  field-naming message that ends up in ``dead_letters.error``.
* Times are stored as aware UTC datetimes and serialised (``mode="json"``) with
  :func:`events.timefmt.iso_utc`, so one instant has one spelling in every payload and hash.
* Optional fields that only apply to some billing methods (``term_months``, ``expires_at``) and
  the optional ``order_amount_cny`` accept JSON ``null`` as "absent"; the canonical payload
  always carries them (``null`` when absent), so "absent" and "null" hash the same.
"""

import math
import re
import sys
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal, Self

import idna
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
    model_validator,
)

from events.problems import describe_value, field_problem, rule_problems
from events.timefmt import iso_utc, parse_iso_utc

__all__ = [
    "BILLING_METHODS",
    "EVENT_ADAPTER",
    "EVENT_MODELS",
    "EVENT_TYPES",
    "PRODUCT_TYPES",
    "BaseEvent",
    "Event",
    "FilingSubmitted",
    "FilingWithdrawn",
    "InstanceBandwidthChanged",
    "InstanceBillingConverted",
    "InstanceExpired",
    "InstancePurchased",
    "InstanceReleased",
    "InstanceRenewed",
    "ServiceNumberRequested",
    "decimal_str",
    "describe_value",
    "is_valid_event_id",
]

PRODUCT_TYPES: tuple[str, ...] = (
    "ecs",
    "virtual_host",
    "web_hosting",
    "simple_app_server",
    "ens",
    "marketplace",
    "nat_gateway",
    "ipv6_translation",
    "jushita_ecs",
    "jushita_slb",
    "chengxintong_shop",
)
BILLING_METHODS: tuple[str, ...] = ("subscription", "pay_as_you_go")

ProductType = Literal[
    "ecs",
    "virtual_host",
    "web_hosting",
    "simple_app_server",
    "ens",
    "marketplace",
    "nat_gateway",
    "ipv6_translation",
    "jushita_ecs",
    "jushita_slb",
    "chengxintong_shop",
]
BillingMethod = Literal["subscription", "pay_as_you_go"]

_KEY_CHARSET_RE = re.compile(r"[A-Za-z0-9._:-]+")  # ASCII only: str patterns on [A-Z] are ASCII
_REGION_RE = re.compile(r"[a-z0-9-]+")
_LDH_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_DECIMAL_RE = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_MAX_AMOUNT_CHARS = 64  # no real order amount comes close; bounds the Decimal work


def _require_str(value: object) -> str:
    if not isinstance(value, str):
        field_problem(f"must be a string (got {describe_value(value)})")
    return value


def _is_json_int(value: object) -> bool:
    # bool is an int subclass in Python but a distinct JSON type.
    return isinstance(value, int) and not isinstance(value, bool)


# --- field checkers --------------------------------------------------------------------------


def _key_checker(max_len: int) -> Any:
    """event_id / instance_id: 1..max_len of [A-Za-z0-9._:-] (safe in URLs, logs, sweep ids)."""

    def check(value: object) -> str:
        text = _require_str(value)
        if not 1 <= len(text) <= max_len:
            field_problem(f"must be 1 to {max_len} characters long (got {len(text)})")
        if not _KEY_CHARSET_RE.fullmatch(text):
            field_problem(
                f"may only contain letters A-Z a-z, digits and . _ : - (got {describe_value(text)})"
            )
        return text

    return check


def _check_printable_id(value: object) -> str:
    """account/filing/subject ids and service numbers: 1..128 printable, no whitespace."""
    text = _require_str(value)
    if not 1 <= len(text) <= 128:
        field_problem(f"must be 1 to 128 characters long (got {len(text)})")
    # isprintable() is False for control, format, surrogate and separator characters except
    # the ASCII space, which is then excluded. (Every other whitespace character is a control
    # or separator character, so once isprintable() holds, "no whitespace" is "no space".)
    if not text.isprintable() or " " in text:
        field_problem(
            f"must be printable characters without whitespace (got {describe_value(text)})"
        )
    return text


def _check_region(value: object) -> str:
    text = _require_str(value)
    if not 1 <= len(text) <= 64:
        field_problem(f"must be 1 to 64 characters long (got {len(text)})")
    if not _REGION_RE.fullmatch(text):
        field_problem(f"may only contain a-z, 0-9 and - (got {describe_value(text)})")
    return text


def _check_timestamp(value: object) -> datetime:
    if isinstance(value, datetime):  # Python publishers may pass datetimes directly
        if value.tzinfo is None or value.utcoffset() is None:
            field_problem("timestamp has no timezone")
        try:
            return value.astimezone(UTC)
        except OverflowError:
            field_problem("timestamp is out of the supported range")
    if not isinstance(value, str):
        field_problem(f"must be an ISO 8601 timestamp string (got {describe_value(value)})")
    try:
        return parse_iso_utc(value)
    except ValueError as exc:
        field_problem(f"{exc} (got {describe_value(value)})")


def _check_term_months(value: object) -> int:
    if not _is_json_int(value) or not 1 <= value <= 120:  # type: ignore[operator]
        field_problem(f"must be an integer from 1 to 120 (got {describe_value(value)})")
    number: int = int(value)  # type: ignore[call-overload]
    return number


def _check_bandwidth(value: object) -> int | float:
    if _is_json_int(value):
        number: int | float = int(value)  # type: ignore[call-overload]
    elif isinstance(value, float):
        if not math.isfinite(value):
            field_problem(f"must be a finite number >= 0 (got {describe_value(value)})")
        # Integral floats become ints so 10 and 10.0 have one canonical spelling.
        number = int(value) if value.is_integer() else value
    else:
        field_problem(f"must be a number >= 0 (got {describe_value(value)})")
    if number < 0:
        field_problem(f"must be a number >= 0 (got {describe_value(value)})")
    # JSON numbers are doubles to most consumers; beyond that range a value is a bug, and
    # a >4300-digit int could not even be serialised by Python's json.
    if number > sys.float_info.max:
        field_problem(f"must be a finite number >= 0 (got {describe_value(value)})")
    return number


def decimal_str(value: Decimal) -> str:
    """Plain decimal text without exponent or trailing zeros: 99, 99.5, 0.01.

    Done on the string form, not with Decimal.normalize(), which rounds to the context
    precision (28 digits) and produces exponents ("1E+2").
    """
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text


def _check_amount(value: object) -> Decimal:
    if isinstance(value, str):
        if len(value) > _MAX_AMOUNT_CHARS or not _DECIMAL_RE.fullmatch(value):
            if value.startswith("-") and _DECIMAL_RE.fullmatch(value[1:]):
                field_problem(f"must be >= 0 (got {describe_value(value)})")
            field_problem(
                f"must be a plain decimal number such as 99 or 99.50 (got {describe_value(value)})"
            )
        amount = Decimal(value)
    elif _is_json_int(value):
        amount = Decimal(value)  # type: ignore[arg-type]
    elif isinstance(value, float) and math.isfinite(value):
        amount = Decimal(repr(value))  # repr: the shortest text that round-trips the float
    elif isinstance(value, Decimal) and value.is_finite():
        amount = value
    else:
        field_problem(f"must be a decimal string or a number (got {describe_value(value)})")
    if amount < 0:
        field_problem(f"must be >= 0 (got {describe_value(value)})")
    if len(decimal_str(amount)) > _MAX_AMOUNT_CHARS:
        field_problem(
            f"has too many digits (at most {_MAX_AMOUNT_CHARS}; got {describe_value(value)})"
        )
    try:
        return Decimal(decimal_str(amount))  # one stored form per amount: 99 == "99.00"
    except InvalidOperation:  # pragma: no cover - decimal_str always yields valid text
        field_problem(f"not a decimal number (got {describe_value(value)})")


def _check_product_type(value: object) -> str:
    text = _require_str(value)
    if text not in PRODUCT_TYPES:
        field_problem(
            f"unknown product type {describe_value(text)} "
            f"(expected one of: {', '.join(PRODUCT_TYPES)})"
        )
    return text


def _check_billing_method(value: object) -> str:
    text = _require_str(value)
    if text not in BILLING_METHODS:
        field_problem(
            f"unknown billing method {describe_value(text)} "
            f"(expected one of: {', '.join(BILLING_METHODS)})"
        )
    return text


def _check_schema_version(value: object) -> int:
    if not _is_json_int(value) or value != 1:
        field_problem(f"only schema_version 1 is supported (got {describe_value(value)})")
    return 1


def _check_website(value: object) -> str:
    """A host name, IDNA allowed; stored as its lower-case ASCII (A-label/punycode) form.

    Why A-labels: it is the DNS wire form, so the length limits (253 / 63) are measured where
    they matter, and "Bücher.de", "bücher.de" and "xn--bcher-kva.de" — the same site — give
    the same stored value. At least two labels, and the last one not all digits: a filing is
    for a registered domain, not a bare host or an IP address. No trailing dot.
    """
    text = _require_str(value)
    if not text:
        field_problem('must be a domain name (got "")')
    if len(text) > 253:
        field_problem(f"must be at most 253 characters long (got {len(text)})")
    name = text.lower()
    if not name.isascii():
        try:
            # UTS 46 mapping = what browsers do with typed names (full-width dots, case, …).
            name = idna.encode(name, uts46=True, std3_rules=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError) as exc:
            field_problem(
                f"not a valid internationalised domain name: {exc} (got {describe_value(text)})"
            )
    labels = name.split(".")
    for label in labels:
        if not label:
            field_problem(f"has an empty label (got {describe_value(text)})")
        if len(label) > 63:
            field_problem(f"label {describe_value(label)} is longer than 63 characters")
        if not _LDH_LABEL_RE.fullmatch(label):
            field_problem(
                f"label {describe_value(label)} may only contain letters, digits and hyphens, "
                "and must not start or end with a hyphen"
            )
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except (idna.IDNAError, UnicodeError, ValueError):
                field_problem(f"label {describe_value(label)} is not valid punycode")
    if len(name) > 253:
        field_problem(f"must be at most 253 characters long in ASCII form (got {len(name)})")
    if len(labels) < 2:
        field_problem(
            f"must be a domain name with at least two labels (got {describe_value(text)})"
        )
    if labels[-1].isdigit():
        field_problem(f"top-level label must not be all digits (got {describe_value(text)})")
    return name


def is_valid_event_id(value: object) -> bool:
    """True for a string that would pass as ``event_id`` (used to label dead letters)."""
    return (
        isinstance(value, str)
        and 1 <= len(value) <= 200
        and _KEY_CHARSET_RE.fullmatch(value) is not None
    )


# --- annotated field types -------------------------------------------------------------------

EventId = Annotated[str, BeforeValidator(_key_checker(200))]
InstanceId = Annotated[str, BeforeValidator(_key_checker(128))]
PrintableId = Annotated[str, BeforeValidator(_check_printable_id)]
Region = Annotated[str, BeforeValidator(_check_region)]
Website = Annotated[str, BeforeValidator(_check_website)]
UtcDateTime = Annotated[
    datetime,
    BeforeValidator(_check_timestamp),
    PlainSerializer(iso_utc, return_type=str, when_used="json"),
]
TermMonths = Annotated[int, BeforeValidator(_check_term_months)]
Bandwidth = Annotated[int | float, BeforeValidator(_check_bandwidth)]
AmountCny = Annotated[
    Decimal,
    BeforeValidator(_check_amount),
    PlainSerializer(decimal_str, return_type=str, when_used="json"),
]
ProductTypeField = Annotated[ProductType, BeforeValidator(_check_product_type)]
BillingMethodField = Annotated[BillingMethod, BeforeValidator(_check_billing_method)]
SchemaVersion = Annotated[Literal[1], BeforeValidator(_check_schema_version)]


def _after(later: datetime, earlier: datetime) -> str:
    return f"({iso_utc(later)} is not after occurred_at {iso_utc(earlier)})"


# --- models ----------------------------------------------------------------------------------


class BaseEvent(BaseModel):
    """Fields common to every event. Not an event type itself."""

    # strict: no coercion behind our validators' back; frozen: events are values (hashable).
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    event_id: EventId
    type: str
    occurred_at: UtcDateTime
    instance_id: InstanceId
    schema_version: SchemaVersion = 1


class InstancePurchased(BaseEvent):
    """``instance.purchased``.

    * ``subscription``: ``term_months`` and ``expires_at`` are required and ``expires_at`` must
      be strictly after ``occurred_at``.
    * ``pay_as_you_go``: ``term_months`` and ``expires_at`` are optional. A pay-as-you-go
      instance has no term or end, so the ledger's rules ignore them (they stay in the payload
      as sent); an ``expires_at`` that is present must still be after ``occurred_at``.
    * ``order_amount_cny`` is required (non-null) when ``product_type`` is ``marketplace``,
      optional otherwise.
    """

    type: Literal["instance.purchased"] = "instance.purchased"
    account_id: PrintableId
    product_type: ProductTypeField
    region: Region
    billing_method: BillingMethodField
    term_months: TermMonths | None = None
    expires_at: UtcDateTime | None = None
    public_bandwidth_mbps: Bandwidth = 0
    order_amount_cny: AmountCny | None = None

    @model_validator(mode="after")
    def _check_rules(self) -> Self:
        problems: list[str] = []
        if self.billing_method == "subscription":
            if self.term_months is None:
                problems.append("term_months: required for a subscription purchase")
            if self.expires_at is None:
                problems.append("expires_at: required for a subscription purchase")
        if self.expires_at is not None and self.expires_at <= self.occurred_at:
            problems.append(
                f"expires_at: must be after occurred_at {_after(self.expires_at, self.occurred_at)}"
            )
        if self.product_type == "marketplace" and self.order_amount_cny is None:
            problems.append("order_amount_cny: required for product_type marketplace")
        rule_problems(problems)
        return self


class InstanceRenewed(BaseEvent):
    """``instance.renewed``: ``term_months`` added, ``expires_at`` the new absolute end
    (strictly after ``occurred_at``)."""

    type: Literal["instance.renewed"] = "instance.renewed"
    term_months: TermMonths
    expires_at: UtcDateTime

    @model_validator(mode="after")
    def _check_rules(self) -> Self:
        if self.expires_at <= self.occurred_at:
            when = _after(self.expires_at, self.occurred_at)
            rule_problems([f"expires_at: must be after occurred_at {when}"])
        return self


class InstanceBillingConverted(BaseEvent):
    """``instance.billing_converted``: ``billing_method`` is the new method.

    To ``subscription``: ``term_months`` and ``expires_at`` required, ``expires_at`` strictly
    after ``occurred_at``. To ``pay_as_you_go``: both optional and ignored by the rules (a
    present ``expires_at`` must still be after ``occurred_at``).
    """

    type: Literal["instance.billing_converted"] = "instance.billing_converted"
    billing_method: BillingMethodField
    term_months: TermMonths | None = None
    expires_at: UtcDateTime | None = None

    @model_validator(mode="after")
    def _check_rules(self) -> Self:
        problems: list[str] = []
        if self.billing_method == "subscription":
            if self.term_months is None:
                problems.append("term_months: required for a conversion to subscription")
            if self.expires_at is None:
                problems.append("expires_at: required for a conversion to subscription")
        if self.expires_at is not None and self.expires_at <= self.occurred_at:
            problems.append(
                "expires_at: must be after occurred_at " + _after(self.expires_at, self.occurred_at)
            )
        rule_problems(problems)
        return self


class InstanceBandwidthChanged(BaseEvent):
    """``instance.bandwidth_changed``: the new public bandwidth (>= 0 Mbps, required)."""

    type: Literal["instance.bandwidth_changed"] = "instance.bandwidth_changed"
    public_bandwidth_mbps: Bandwidth


class InstanceExpired(BaseEvent):
    """``instance.expired``: ``expires_at`` is the end that passed, so it must be at or before
    ``occurred_at`` (the sweep emits ``occurred_at == expires_at``)."""

    type: Literal["instance.expired"] = "instance.expired"
    expires_at: UtcDateTime

    @model_validator(mode="after")
    def _check_rules(self) -> Self:
        if self.expires_at > self.occurred_at:
            rule_problems(
                [
                    f"expires_at: must not be after occurred_at for an expiry "
                    f"({iso_utc(self.expires_at)} is after {iso_utc(self.occurred_at)})"
                ]
            )
        return self


class InstanceReleased(BaseEvent):
    """``instance.released``: no own fields; release is final."""

    type: Literal["instance.released"] = "instance.released"


class ServiceNumberRequested(BaseEvent):
    """``service_number.requested`` by ``account_id``."""

    type: Literal["service_number.requested"] = "service_number.requested"
    account_id: PrintableId


class FilingSubmitted(BaseEvent):
    """``filing.submitted``: a filing presenting ``service_number``; ``product_type`` is the
    type the submitter claims; ``website`` is stored as its lower-case ASCII (punycode) form."""

    type: Literal["filing.submitted"] = "filing.submitted"
    account_id: PrintableId
    filing_id: PrintableId
    service_number: PrintableId
    product_type: ProductTypeField
    subject_id: PrintableId
    website: Website


class FilingWithdrawn(BaseEvent):
    """``filing.withdrawn``."""

    type: Literal["filing.withdrawn"] = "filing.withdrawn"
    filing_id: PrintableId


Event = Annotated[
    InstancePurchased
    | InstanceRenewed
    | InstanceBillingConverted
    | InstanceBandwidthChanged
    | InstanceExpired
    | InstanceReleased
    | ServiceNumberRequested
    | FilingSubmitted
    | FilingWithdrawn,
    Field(discriminator="type"),
]
"""Any event; pydantic picks the model from ``type``."""

EVENT_MODELS: dict[str, type[BaseEvent]] = {
    model.model_fields["type"].default: model
    for model in (
        InstancePurchased,
        InstanceRenewed,
        InstanceBillingConverted,
        InstanceBandwidthChanged,
        InstanceExpired,
        InstanceReleased,
        ServiceNumberRequested,
        FilingSubmitted,
        FilingWithdrawn,
    )
}
EVENT_TYPES: tuple[str, ...] = tuple(EVENT_MODELS)

# For callers that want pydantic to do the dispatch (e.g. a FastAPI body); the codec
# dispatches by hand to word the errors for unknown or missing types itself.
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
