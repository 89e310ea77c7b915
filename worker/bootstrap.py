"""The one wiring point: settings in, engine, policy, store and :class:`~ledger.service.Ledger`
out, for every process — the CLI, the HTTP API, the Celery tasks (and so the worker's gap
check, beat's sweeps and the demo's embedded worker) and the demo itself.

Each of them used to assemble these on its own, with slightly different options (the CLI's
ledger had no resequencer settings, the API built a ``Ledger`` per request); here they are
built one way, from one :class:`~ledger.settings.Settings`. Callers that must resolve the
settings first (the CLI's ``--db`` / ``--policy``) do so and hand the result in.

Process-wide tuning lives here too, and is applied once per process, never per call:
:func:`tune_for_batches` is called by the worker's per-process runtime (``worker.tasks``) and
by every CLI command that opens the database, but not by the HTTP API, whose request threads
share the interpreter and should keep CPython's default collector rhythm.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

from sqlalchemy.engine import Engine

from ledger.db import ensure_schema, make_engine
from ledger.policy import Policy, cached_policy
from ledger.results import ApplyResult
from ledger.service import Ledger
from ledger.settings import Settings
from ledger.store import SqlStorage

__all__ = ["BATCH_THRESHOLD", "build_ledger", "open_engine", "policy_of", "tune_for_batches"]

#: CPython's generation-0 collection threshold in worker and CLI processes (the default is 700).
BATCH_THRESHOLD = 100_000


def tune_for_batches() -> None:
    """Fewer garbage-collector passes for the rest of this process (idempotent).

    A batch of 500 events, or a rebuild page of 500 instances, allocates hundreds of thousands
    of short-lived containers (parsed events, states, rows, JSON). CPython runs a generation-0
    collection every 700 net container allocations and every tenth of those a generation-1 one,
    so the collector ran thousands of times per batch, its periodic full passes walking every
    object of the process (the ORM registry, the policy, caches): 15–30 % of the time of
    ``apply`` and ``rebuild`` on the benchmarks (issue #5). Nothing the ledger does depends on
    when cycles are collected (its objects are freed by reference counting), so the threshold
    is raised once; the collector still runs, about 140 times less often, and garbage stays
    bounded. Set per process rather than around each batch, so that no thread ever sees the
    thresholds change under it. A process whose collector is off (threshold 0) keeps it off,
    and one already tuned higher is left alone.
    """
    first, *rest = gc.get_threshold()
    if first and first < BATCH_THRESHOLD:
        gc.set_threshold(BATCH_THRESHOLD, *rest)


def policy_of(settings: Settings) -> Policy:
    """The policy of ``settings`` (its file, or the shipped one), parsed once per process.

    Raises :class:`~ledger.policy.PolicyError` for a file that is missing or broken."""
    path = settings.policy_file
    return cached_policy(str(path) if path is not None else None)


def open_engine(settings: Settings, *, schema: bool = True) -> Engine:
    """A new engine (its own pool) on ``settings.database_url``; with ``schema``, the schema is
    brought to head first (one cheap query when ``db upgrade`` already ran), so a fresh
    database works. The caller disposes of the engine."""
    engine = make_engine(settings.database_url)
    if schema:
        try:
            ensure_schema(engine)
        except BaseException:
            engine.dispose()
            raise
    return engine


def build_ledger(
    settings: Settings,
    engine: Engine,
    policy: Policy | None = None,
    *,
    on_released: Callable[[list[ApplyResult]], None] | None = None,
    on_gaps_skipped: Callable[[int], None] | None = None,
) -> Ledger:
    """The ledger service on ``engine``'s SQL store with the resequencer's settings (SPEC §9)
    and ``policy`` (default: :func:`policy_of` ``settings``). ``on_released`` and
    ``on_gaps_skipped`` are the worker's metrics observers."""
    return Ledger(
        SqlStorage(engine),
        policy if policy is not None else policy_of(settings),
        **settings.resequencer_options(),
        on_released=on_released,
        on_gaps_skipped=on_gaps_skipped,
    )
