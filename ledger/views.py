"""The one serialiser from ledger data to the JSON shapes of SPEC §7.

The CLI's ``--json``, the HTTP API and the web page all print these dicts, so the three can
never disagree.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from events import iso_utc
from ledger.policy import Policy
from ledger.reasons import explain
from ledger.results import entry_service_number
from ledger.rules import eligibility, product_of, subject_cap, website_cap
from ledger.state import InstanceState


def _time(value: datetime | None) -> str | None:
    return iso_utc(value) if value is not None else None


def instance_view(state: InstanceState, policy: Policy, at: datetime) -> dict[str, Any]:
    """``show --json``: the projection with eligibility evaluated at ``at``."""
    purchase = state.purchase
    product = product_of(state, policy)
    verdict = eligibility(state, policy, at)
    websites_cap = website_cap(state, policy)
    subjects_cap = subject_cap(state, policy)
    used = state.websites_used
    reserved = state.websites_reserved
    subjects_used = len(state.subjects)
    return {
        "instance_id": state.instance_id,
        "account_id": purchase.account_id if purchase else None,
        "product_type": purchase.product_type if purchase else None,
        "region": purchase.region if purchase else None,
        "billing_method": state.billing_method,
        "expires_at": _time(state.expires_at),
        "status": state.status,
        "eligibility": {
            "status": verdict.status,
            "as_of": iso_utc(at),
            "reasons": [explain(code, product) for code in verdict.reasons],
        },
        "websites": {
            "cap": websites_cap,
            "used": used,
            "reserved": reserved,
            # Never negative, even if an operator lowers a cap below what is already spent.
            "remaining": max(websites_cap - used - reserved, 0),
        },
        "subjects": {
            "cap": subjects_cap,
            "used": subjects_used,
            "remaining": max(subjects_cap - subjects_used, 0),
        },
        "service_numbers": [
            {
                "number": number.number,
                "status": number.status,
                "issued_at": iso_utc(number.issued_at),
                "filing_id": number.filing_id,
                "invalidated_reason": number.invalidated_reason,
            }
            for number in sorted(state.numbers.values(), key=lambda n: n.issue_order)
        ],
        "filings": [
            {
                "filing_id": filing.filing_id,
                "website": filing.website,
                "subject_id": filing.subject_id,
                "status": filing.status,
            }
            for filing in sorted(state.filings.values(), key=lambda f: f.accept_order)
        ],
        "entries": state.entries,
        "head_hash": state.head_hash,
    }


def instance_summary(state: InstanceState, policy: Policy, at: datetime) -> dict[str, Any]:
    """One row of ``instances --json``."""
    purchase = state.purchase
    cap = website_cap(state, policy)
    return {
        "instance_id": state.instance_id,
        "product_type": purchase.product_type if purchase else None,
        "status": state.status,
        "eligibility": eligibility(state, policy, at).status,
        "websites_remaining": max(cap - state.websites_used - state.websites_reserved, 0),
        "expires_at": _time(state.expires_at),
    }


def entry_view(entry: Any) -> dict[str, Any]:
    """One row of ``history --json`` from a ``ledger_entries`` row."""
    return {
        "seq": entry.seq,
        "event_id": entry.event_id,
        "type": entry.type,
        "occurred_at": iso_utc(entry.occurred_at),
        "recorded_at": iso_utc(entry.recorded_at),
        "outcome": entry.outcome,
        "reasons": list(entry.reasons or ()),
        "service_number": entry_service_number(entry.type, entry.payload, entry.result or {}),
        "policy_version": entry.policy_version,
        "prev_hash": entry.prev_hash,
        "hash": entry.hash,
    }


def service_number_view(row: Any) -> dict[str, Any]:
    """``service-number --json`` from a ``service_numbers`` row."""
    return {
        "number": row.number,
        "instance_id": row.instance_id,
        "status": row.status,
        "issued_at": iso_utc(row.issued_at),
        "filing_id": row.filing_id,
        "invalidated_at": _time(row.invalidated_at),
        "invalidated_reason": row.invalidated_reason,
    }


def dead_letter_view(row: Any) -> dict[str, Any]:
    """One row of ``rejected --json``."""
    return {
        "id": row.id,
        "received_at": iso_utc(row.received_at),
        "event_id": row.event_id,
        "code": row.code,
        "error": row.error,
        "raw": row.raw,
    }


def parked_view(row: dict[str, Any]) -> dict[str, Any]:
    """One row of ``parked --json`` (SPEC §9) from ``ledger.store.list_parked``."""
    return {**row, "parked_at": _time(row["parked_at"])}
