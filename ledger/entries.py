"""Recording one event: decide, hash onto the instance's chain, fold. Pure (no I/O).

The service layer and the in-memory model used by the property tests both call :func:`record`,
so what is stored and what is tested is one piece of code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from events import Event, iso_utc
from ledger.chain import entry_hash
from ledger.policy import Policy
from ledger.rules import decide, fold
from ledger.state import InstanceState


def record(
    state: InstanceState,
    event: Event,
    *,
    payload: str,
    policy: Policy,
    new_number: Callable[[], str],
) -> tuple[dict[str, Any], InstanceState]:
    """The chain fields of the new entry (everything but ``seq``/``recorded_at``) and the state
    after it. ``payload`` is the event's canonical JSON text."""
    decision = decide(state, event, policy, new_number=new_number)
    fields: dict[str, Any] = {
        "instance_seq": state.entries + 1,
        "event_id": event.event_id,
        "type": event.type,
        "occurred_at": iso_utc(event.occurred_at),
        "payload": payload,
        "outcome": decision.outcome,
        "reasons": list(decision.reasons),
        "result": dict(decision.result),
        "policy_version": policy.version,
        "prev_hash": state.head_hash,
    }
    fields["hash"] = entry_hash(**{k: v for k, v in fields.items()})
    new_state = fold(
        state,
        event,
        outcome=decision.outcome,
        result=decision.result,
        instance_seq=fields["instance_seq"],
        entry_hash=fields["hash"],
    )
    return fields, new_state
