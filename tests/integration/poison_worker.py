"""The ``quota-ledger`` CLI with a poisoned ledger, for the poison-message tests: applying an event
whose id starts with ``poison-kill`` kills the process (``os._exit``, like the OOM killer would),
one starting with ``poison-raise`` raises, one starting with ``poison-slow`` holds its message
for ten minutes (a worker that dies while holding it). Run as ``python -m tests.integration.poison_worker
worker …`` from the repository root; prefork children inherit the patch."""

from __future__ import annotations

import os
import time

from events import BaseEvent
from ledger import service

_real_apply = service.Ledger.apply


def _poisoned_apply(self, items, *, raws=None, sequence=None):
    for item in items:
        if isinstance(item, BaseEvent):
            if item.event_id.startswith("poison-kill"):
                os._exit(3)
            if item.event_id.startswith("poison-raise"):
                raise RuntimeError("poisoned event")
            if item.event_id.startswith("poison-slow"):
                print(f"holding {item.event_id}", flush=True)
                time.sleep(600)
    return _real_apply(self, items, raws=raws, sequence=sequence)


service.Ledger.apply = _poisoned_apply  # type: ignore[method-assign]

if __name__ == "__main__":
    from worker.cli import app

    app(prog_name="quota-ledger")
