"""The ``quota-ledger`` CLI for ``tests/faults/test_cancelled_task.py``: an event whose id starts
with ``cancel-hold`` is held, on its first delivery, inside a pydantic serializer (a ten-minute
sleep), so the SIGTERM with which Celery cancels the task on a lost broker connection lands
where pydantic wraps the ``SystemExit`` in an ordinary ``PydanticSerializationError`` — what
happened by chance in ``tests/faults/test_broker_restart.py``. Later deliveries apply it.

``QL_TEST_MARKS`` names a directory that remembers first deliveries across pool processes.
With ``QL_TEST_CANCEL_AS_FAILURE=1`` the task lets the wrapped error out as it did before
``worker.tasks._stopping_as_a_stop`` (the control). Run as ``python -m tests.faults.cancel_worker
worker …`` from the repository root; prefork children inherit the patches."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pydantic

from events import BaseEvent
from ledger import service
from worker import tasks

_real_apply = service.Ledger.apply
_marks = Path(os.environ["QL_TEST_MARKS"])


class _Held(pydantic.BaseModel):
    event_id: str

    @pydantic.field_serializer("event_id")
    def _hold(self, event_id: str) -> str:
        print(f"holding {event_id} inside a pydantic serializer", flush=True)
        time.sleep(600)
        return event_id


def _holding_apply(self, items, *, raws=None, sequence=None):
    for item in items:
        if isinstance(item, BaseEvent) and item.event_id.startswith("cancel-hold"):
            first = _marks / item.event_id
            if not first.exists():
                first.touch()
                _Held(event_id=item.event_id).model_dump_json()
    return _real_apply(self, items, raws=raws, sequence=sequence)


service.Ledger.apply = _holding_apply  # type: ignore[method-assign]

if os.environ.get("QL_TEST_CANCEL_AS_FAILURE") == "1":
    tasks._stop_instead_of = lambda exc: exc  # type: ignore[assignment]

if __name__ == "__main__":
    from worker.cli import app

    app(prog_name="quota-ledger")
