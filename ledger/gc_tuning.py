"""Fewer garbage-collector passes while the ledger works through a batch or a page.

A batch of 500 events, or a rebuild page of 500 instances, allocates hundreds of thousands of
short-lived containers (parsed events, states, rows, JSON). CPython runs a generation-0
collection every 700 net container allocations, and every tenth of those a generation-1 one,
so the collector runs thousands of times per batch, and its periodic full passes walk every
object of the process (the ORM registry, the policy, caches). Measured on the benchmarks, that
was 15–30 % of the time of ``apply`` and ``rebuild`` (issue #5).

Nothing the ledger does depends on when cycles are collected: its objects are freed by
reference counting, and the few cycles (sessions, transactions) are collected on the next
pass. So while a batch or page is in progress the generation-0 threshold is raised to
:data:`BATCH_THRESHOLD` (the collector still runs, just 100-odd times less often, so garbage
stays bounded), and the previous thresholds are restored when the last batch in progress ends
(re-entrant and thread-safe: rebuild works on two pages at once).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["BATCH_THRESHOLD", "fewer_collections"]

#: The generation-0 threshold while a batch is in progress (CPython's default is 700).
BATCH_THRESHOLD = 100_000

_lock = threading.Lock()
_depth = 0
_saved: tuple[int, ...] = ()


@contextmanager
def fewer_collections() -> Iterator[None]:
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = gc.get_threshold()
            if _saved[0] and _saved[0] < BATCH_THRESHOLD:  # 0: the collector is off
                gc.set_threshold(BATCH_THRESHOLD, *_saved[1:])
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                gc.set_threshold(*_saved)
