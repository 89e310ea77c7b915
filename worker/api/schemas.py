"""OpenAPI documentation of the response shapes (SPEC §7).

These models only *describe* the answers; the answers themselves are the dicts of
``ledger.views`` (the one serialiser), returned as they are. ``extra="forbid"`` makes the schema
strict, so the tests that validate live responses against ``/openapi.json`` notice any drift
between this description and the serialiser.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ledger.rules import EligibilityStatus

IsoTime = Annotated[
    str,
    Field(
        pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?Z$",
        description="ISO 8601 in UTC with a Z",
        examples=["2026-09-01T00:00:00Z"],
    ),
]
Hash = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
InstanceStatus = Literal["active", "expired", "released", "unknown"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Reason(_Model):
    code: str
    message_zh: str
    message_en: str
    remediation: str


class Eligibility(_Model):
    status: EligibilityStatus
    as_of: IsoTime
    reasons: list[Reason]


class Websites(_Model):
    cap: int
    used: int
    reserved: int
    remaining: int


class Subjects(_Model):
    cap: int
    used: int
    remaining: int


class InstanceServiceNumber(_Model):
    number: str
    status: Literal["active", "used", "invalidated"]
    issued_at: IsoTime
    filing_id: str | None
    invalidated_reason: str | None


class Filing(_Model):
    filing_id: str
    website: str
    subject_id: str
    status: Literal["accepted", "withdrawn"]


class InstanceView(_Model):
    """``quota-ledger show --json``."""

    instance_id: str
    account_id: str | None
    product_type: str | None
    region: str | None
    billing_method: Literal["subscription", "pay_as_you_go"] | None
    expires_at: IsoTime | None
    status: InstanceStatus
    eligibility: Eligibility
    websites: Websites
    subjects: Subjects
    service_numbers: list[InstanceServiceNumber]
    filings: list[Filing]
    entries: int
    head_hash: Hash
    parked: int = Field(description="Events parked behind a gap in publish numbers (SPEC §9)")


class ParkedEvent(_Model):
    """One row of ``quota-ledger parked --json`` (SPEC §9)."""

    instance_id: str
    epoch: int
    n: int
    event_id: str
    type: str
    parked_at: IsoTime
    waiting_for: int = Field(description="The publish number the instance waits for")


class Entry(_Model):
    """One row of ``quota-ledger history --json``."""

    seq: int
    event_id: str
    type: str
    occurred_at: IsoTime
    recorded_at: IsoTime
    outcome: Literal["applied", "rejected", "stale"]
    reasons: list[str]
    service_number: str | None
    policy_version: str
    prev_hash: Hash
    hash: Hash


class InstanceSummary(_Model):
    """One row of ``quota-ledger instances --json``."""

    instance_id: str
    product_type: str | None
    status: InstanceStatus
    eligibility: EligibilityStatus
    websites_remaining: int
    expires_at: IsoTime | None


class InstancePage(_Model):
    items: list[InstanceSummary]
    next_cursor: str | None = Field(
        description="Pass as ?cursor= for the next page; null on the last page."
    )


class ServiceNumberInfo(_Model):
    """``quota-ledger service-number --json``."""

    number: str
    instance_id: str
    status: Literal["active", "used", "invalidated"]
    issued_at: IsoTime
    filing_id: str | None
    invalidated_at: IsoTime | None
    invalidated_reason: str | None


class DeadLetter(_Model):
    """One row of ``quota-ledger rejected --json``."""

    id: int
    received_at: IsoTime
    event_id: str | None
    code: str
    error: str
    raw: str


class RejectedPage(_Model):
    items: list[DeadLetter]
    next_cursor: str | None


class InvalidEvent(_Model):
    index: int = Field(
        description="0-based position in the JSON array, or 0-based line number in JSONL"
    )
    code: Literal["too_large", "invalid_event"]
    error: str
    event_id: str | None


class IngestResult(_Model):
    accepted: int = Field(description="Valid events enqueued for the worker")
    invalid: list[InvalidEvent] = Field(
        description="The first 100 invalid events, in input order (all are dead-lettered)"
    )
    invalid_count: int = Field(description="How many events were invalid in all")


class ErrorDetail(_Model):
    loc: list[str | int]
    message: str


class Error(_Model):
    error: str = Field(description="A stable machine-readable code, e.g. not_found")
    message: str
    details: list[ErrorDetail] | None = None


class Health(_Model):
    status: Literal["ok"]


class Readiness(_Model):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str]
    error: str | None = None
    message: str | None = None


# --- the change feed (docs/changes.md) -----------------------------------------------------------


class Change(_Model):
    position: int = Field(ge=1, description="Gap-free, increasing in commit order: the cursor.")
    kind: str = Field(examples=["service_number.invalidated"])
    instance_id: str | None
    seq: int | None = Field(description="The ledger entry that caused it (null: none).")
    event_id: str | None
    instance_seq: int | None
    occurred_at: IsoTime
    recorded_at: IsoTime
    data: dict[str, object] = Field(description="The kind's own fields (docs/changes.md).")


class ChangesPage(_Model):
    items: list[Change]
    next_after: int = Field(
        ge=0, description="Pass as `after` next time: the last position returned, or `after`."
    )


class WebhookCreate(_Model):
    url: str = Field(max_length=2000, examples=["https://hooks.example.com/quota-ledger"])
    kinds: list[str] = Field(
        default_factory=list, max_length=32, description="Change kinds to send; empty: all."
    )
    from_start: bool = Field(
        default=False, description="Deliver the whole feed, not only the changes from now on."
    )


class WebhookEndpoint(_Model):
    id: int
    url: str
    kinds: list[str]
    enabled: bool
    cursor: int = Field(description="The last position delivered (or passed over).")
    failures: int
    failing_since: IsoTime | None
    next_attempt_at: IsoTime | None
    last_status: int | None
    last_error: str | None
    disabled_reason: str | None
    created_at: IsoTime | None
    secret: str | None = Field(
        default=None, description="The signing secret: only in the answer that creates it."
    )


class WebhookDelivery(_Model):
    id: int
    position: int
    attempt: int
    status: int | None
    error: str | None
    duration_ms: int
    attempted_at: IsoTime
