"""Where an event's time goes (issue 13: a profile before any change).

The ``profile`` scenario applies the same event streams the other scenarios use, in one process,
through the real write path — on SQLite (what ``quota-ledger apply`` runs) and on PostgreSQL in
batches of 500 (what one Celery task runs, without Celery) — with the stages of the path timed
by wrappers around the functions that do them. Each stage's time is *exclusive*: a stage that
calls another (``lock and load`` parses the state JSON it loads) is charged only for its own
part. What no wrapper covers (the service's loop, results, batching) is ``other``.

The Celery share is estimated from the ``celery_batched`` scenario of the same run, when it ran:
its per-event wall time per worker process minus the direct PostgreSQL path's (Celery, kombu,
Redis, message decoding and the delivery counter).

A wrapper costs well under a microsecond per call; the stages are called once per event or once
per batch, so the profile changes the total by a few per cent, which the output states by
giving the unprofiled total beside it.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import pstats
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import SessionTransaction

import ledger.entries
import ledger.service
import ledger.store
from bench import data
from bench.env import engine_for
from bench.scenarios import Context, Result, rate
from events import parse_event
from ledger.db import make_engine, upgrade
from ledger.service import Ledger
from ledger.store import SqlStore

#: (stage, owner of the attribute, attribute name), in the order of the write path.
STAGES: tuple[tuple[str, Any, str], ...] = (
    ("parse and validate", ledger.service, "parse_event"),
    ("canonical form", ledger.service, "canonical_payload"),
    ("lock and load", SqlStore, "lock"),
    ("state JSON parse", ledger.store, "state_from_json"),
    ("idempotency lookup", SqlStore, "priors"),
    ("resequencer reads", SqlStore, "gates"),
    ("decide", ledger.entries, "decide"),
    ("hash", ledger.entries, "entry_hash"),
    ("fold", ledger.entries, "fold"),
    ("write", SqlStore, "save"),
    ("commit", SessionTransaction, "commit"),
)


@dataclass
class StageClock:
    """Exclusive time per stage: a stack of running stages, each charged for its own time
    only (a nested stage's time is taken off its caller)."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    _stack: list[list[float]] = field(default_factory=list)  # [started, child seconds]

    def wrap(self, stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            frame = [time.perf_counter(), 0.0]
            self._stack.append(frame)
            try:
                return function(*args, **kwargs)
            finally:
                self._stack.pop()
                spent = time.perf_counter() - frame[0]
                self.seconds[stage] = self.seconds.get(stage, 0.0) + spent - frame[1]
                self.calls[stage] = self.calls.get(stage, 0) + 1
                if self._stack:
                    self._stack[-1][1] += spent

        return timed

    @contextlib.contextmanager
    def installed(self) -> Iterator[StageClock]:
        """The wrappers in place for the duration (restored afterwards, also on an error)."""
        saved = [(owner, name, owner.__dict__[name]) for _, owner, name in STAGES]
        try:
            for stage, owner, name in STAGES:
                setattr(owner, name, self.wrap(stage, getattr(owner, name)))
            yield self
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)


def _breakdown(clock: StageClock, events: int, total: float) -> dict[str, Any]:
    """µs per event per stage (``other``: what no stage covers), and each stage's share."""
    per_event = {stage: clock.seconds.get(stage, 0.0) / events * 1e6 for stage, _, _ in STAGES}
    per_event["other"] = max(0.0, total / events * 1e6 - sum(per_event.values()))
    whole = sum(per_event.values())
    return {
        "us_per_event": {stage: round(us, 1) for stage, us in per_event.items()},
        "share": {stage: round(us / whole, 3) for stage, us in per_event.items()},
        "calls": dict(clock.calls),
    }


def _top_functions(profiler: cProfile.Profile, limit: int = 12) -> list[str]:
    """The functions with the most own time (cProfile), for the lever each stage points to."""
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(limit)
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    return [line.strip() for line in lines[start : start + limit + 1] if line.strip()]


Run = tuple[float, float, StageClock, list[str]]


def _measure(
    open_ledger: Callable[[], contextlib.AbstractContextManager[Ledger]],
    work: Callable[[Ledger], None],
) -> Run:
    """(seconds unprofiled, seconds with the stage clock, the clock, cProfile's top functions)
    of ``work`` on a fresh ledger each time."""

    def once(profile: StageClock | None, profiler: cProfile.Profile | None) -> float:
        with open_ledger() as ledger_, profile.installed() if profile else contextlib.nullcontext():
            started = time.perf_counter()
            if profiler:
                profiler.enable()
            work(ledger_)
            if profiler:
                profiler.disable()
            return time.perf_counter() - started

    # The best of two plain runs: the first also pays one-off costs (compiled SQL, caches).
    plain = min(once(None, None), once(None, None))
    clock = StageClock()
    timed = once(clock, None)
    profiler = cProfile.Profile()
    once(None, profiler)
    return plain, timed, clock, _top_functions(profiler)


def _embedded(ctx: Context, lines: list[str]) -> Run:
    """``apply_lines`` on fresh SQLite files."""

    @contextlib.contextmanager
    def sqlite_ledger() -> Iterator[Ledger]:
        with tempfile.TemporaryDirectory(prefix="ql-bench-profile-") as tmp:
            url = f"sqlite:///{Path(tmp) / 'ledger.db'}"
            upgrade(url)
            engine = make_engine(url)
            try:
                yield Ledger(engine, ctx.policy)
            finally:
                engine.dispose()

    def work(ledger_: Ledger) -> None:
        for _ in ledger_.apply_lines(lines, batch_size=500):
            pass

    return _measure(sqlite_ledger, work)


def _postgres(ctx: Context, lines: list[str]) -> Run:
    """Each line parsed as a task decodes it, then ``Ledger.apply`` per batch of 500 (one
    task's transaction), in fresh PostgreSQL databases."""

    @contextlib.contextmanager
    def postgres_ledger() -> Iterator[Ledger]:
        url = ctx.postgres.create()
        try:
            with engine_for(url) as engine:
                yield Ledger(engine, ctx.policy)
        finally:
            ctx.postgres.drop(url)

    def work(ledger_: Ledger) -> None:
        parse = ledger.service.parse_event  # the timed one while profiling
        for batch in data.iter_chunks(lines, 500):
            ledger_.apply([parse(line) for line in batch])

    return _measure(postgres_ledger, work)


def profile(ctx: Context) -> Result:
    """The scenario: both paths, each run three times (unprofiled, stage clock, cProfile)."""
    count = ctx.n(20_000, 500)
    lines = data.event_lines(count, prefix="p-")
    # Parsing once up front warms pydantic's and the rules' caches for both paths alike.
    for line in lines[:100]:
        parse_event(line)
    figures: dict[str, Any] = {"events": count}
    notes: list[str] = []
    for path, run in (("embedded_sqlite", _embedded), ("batched_postgresql", _postgres)):
        ctx.log(f"profile: {count:,} events, {path.replace('_', ' on ')} …")
        plain, timed, clock, top = run(ctx, lines)
        figures[path] = {
            "us_per_event_unprofiled": round(plain / count * 1e6, 1),
            "us_per_event_profiled": round(timed / count * 1e6, 1),
            "events_per_s_unprofiled": round(rate(count, plain)),
            **_breakdown(clock, count, timed),
            "top_functions_by_own_time": top,
        }
        for stage, share in sorted(
            figures[path]["share"].items(), key=lambda pair: pair[1], reverse=True
        )[:4]:
            ctx.log(f"  {stage}: {share:.0%} ({figures[path]['us_per_event'][stage]} µs/event)")
    celery = ctx.setup.get("celery_batched")
    if celery:
        per_process_us = celery["concurrency"] / celery["events_per_s"] * 1e6
        direct_us = figures["batched_postgresql"]["us_per_event_unprofiled"]
        figures["celery_overhead_us_per_event"] = round(per_process_us - direct_us, 1)
        notes.append(
            "Celery overhead: celery_batched's wall time per event per worker process "
            f"({per_process_us:.0f} µs) minus the direct PostgreSQL path's ({direct_us:.0f} µs); "
            "an upper bound: the worker processes share the cores with the publisher, "
            "PostgreSQL and Redis, so they are not busy all the time"
        )
    else:
        notes.append("Celery overhead not estimated: celery_batched did not run before it")
    return Result(
        "profile",
        "where an event's time goes",
        f"{count:,} events, one process: exclusive µs per event per stage of the write path",
        figures,
        None,
        None,
        "— (a profile, no target)",
        None,
        params={"batch_size": 500, "stages": [stage for stage, _, _ in STAGES] + ["other"]},
        notes=notes,
    )


PROFILE_SCENARIOS: dict[str, Callable[[Context], Result]] = {"profile": profile}
