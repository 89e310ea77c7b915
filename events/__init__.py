"""events package."""

# What crosses the wire: event models, validation and the canonical JSON form (SPEC §5, §7).
# Deliberately free of celery/sqlalchemy imports; publishing lives in events/publish.py.

from events.codec import (
    MAX_EVENT_BYTES,
    EventRejection,
    InvalidEvent,
    RejectionCode,
    canonical_json,
    canonical_payload,
    event_to_payload,
    parse_event,
    parse_event_obj,
    validate_event,
)
from events.models import (
    BILLING_METHODS,
    EVENT_ADAPTER,
    EVENT_MODELS,
    EVENT_TYPES,
    PRODUCT_TYPES,
    BaseEvent,
    Event,
    FilingSubmitted,
    FilingWithdrawn,
    InstanceBandwidthChanged,
    InstanceBillingConverted,
    InstanceExpired,
    InstancePurchased,
    InstanceReleased,
    InstanceRenewed,
    ServiceNumberRequested,
    is_valid_event_id,
)
from events.timefmt import iso_utc, parse_iso_utc

__all__ = [
    "BILLING_METHODS",
    "EVENT_ADAPTER",
    "EVENT_MODELS",
    "EVENT_TYPES",
    "MAX_EVENT_BYTES",
    "PRODUCT_TYPES",
    "BaseEvent",
    "Event",
    "EventRejection",
    "FilingSubmitted",
    "FilingWithdrawn",
    "InstanceBandwidthChanged",
    "InstanceBillingConverted",
    "InstanceExpired",
    "InstancePurchased",
    "InstanceReleased",
    "InstanceRenewed",
    "InvalidEvent",
    "RejectionCode",
    "ServiceNumberRequested",
    "canonical_json",
    "canonical_payload",
    "event_to_payload",
    "is_valid_event_id",
    "iso_utc",
    "parse_event",
    "parse_event_obj",
    "parse_iso_utc",
    "validate_event",
]
