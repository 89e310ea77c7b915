"""``python -m bench`` (and ``quota-ledger bench``): run the scenarios, print a Rich table, write
``bench/results.json``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.env import Postgres, Processes, machine_info

DEFAULT_OUTPUT = Path(__file__).with_name("results.json")


def scenario_names() -> list[str]:
    from bench.celery_scenarios import CELERY_SCENARIOS
    from bench.profile import PROFILE_SCENARIOS
    from bench.scenarios import SCENARIOS

    # The profile last: it reads celery_batched's figure of the same run.
    return [*SCENARIOS, *CELERY_SCENARIOS, *PROFILE_SCENARIOS]


def _scenario(name: str) -> Any:
    from bench.celery_scenarios import CELERY_SCENARIOS
    from bench.profile import PROFILE_SCENARIOS
    from bench.scenarios import SCENARIOS

    return {**SCENARIOS, **CELERY_SCENARIOS, **PROFILE_SCENARIOS}[name]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if value < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _headline(result: dict[str, Any]) -> tuple[str, str]:
    """The figure and the baseline as one short line each."""
    f, b = result["figures"], result.get("baseline") or {}
    name = result["scenario"]
    if name in ("sweep", "sweep_tuned"):
        return (
            f"{f['seconds']:.2f} s ({f['due']:,} due of {f['instances']:,})",
            f"{b['seconds']:.2f} s ({b['instances']:,} instances)",
        )
    if name == "resequencer":
        return (
            f"numbered {f['single_sequenced_events_per_s']:,} events/s (one-event messages), "
            f"{f['batched_sequenced_events_per_s']:,} (messages of 500, "
            f"{f['batched_ratio']:.2f} of not numbered); shuffled "
            f"{f['single_shuffled_events_per_s']:,} ({f['shuffled_ratio']:.2f} of in order)",
            f"not numbered {b['events_per_s']:,} events/s",
        )
    if name == "profile":
        return "; ".join(
            f"{path.split('_')[0]} {f[path]['us_per_event_unprofiled']:,.0f} µs/event: "
            + ", ".join(
                f"{stage} {share:.0%}"
                for stage, share in sorted(
                    f[path]["share"].items(), key=lambda pair: pair[1], reverse=True
                )[:4]
            )
            for path in ("embedded_sqlite", "batched_postgresql")
        ), "—"
    if name == "scaling":
        return (
            "; ".join(
                f"{label} "
                + " / ".join(f"{f[f'{label}_{c}']['events_per_s']:,}" for c in (1, 2, 4))
                + " events/s"
                for label in ("single", "batched")
            )
            + " (1 / 2 / 4 worker processes)",
            f"{b['events_per_s']:,} events/s (batched, 1 process)",
        )
    if name == "query":
        return (
            f"p50 {f['p50_ms']:.2f} ms, p99 {f['p99_ms']:.2f} ms",
            f"raw reads p50 {b['p50_ms']:.2f} ms, p99 {b['p99_ms']:.2f} ms" if b else "—",
        )
    if name == "rebuild":
        return (
            f"{f['entries_per_s']:,} entries/s, peak RSS {f['peak_rss_mb']:,.0f} MB "
            f"({f['entries']:,} entries, drift {f['drift']}, broken {f['broken']})",
            f"{b['entries_per_s']:,} entries/s read and hashed" if b else "—",
        )
    if "tasks_per_s" in b:
        return f"{f['events_per_s']:,} events/s", f"{b['tasks_per_s']:,} no-op tasks/s"
    return f"{f['events_per_s']:,} events/s", f"{b['rows_per_s']:,} rows/s"


def render_table(results: list[dict[str, Any]], machine: dict[str, Any], console: Console) -> None:
    table = Table(title="quota-ledger benchmarks", show_lines=True)
    for column in ("scenario", "measure", "result", "baseline (same run)", "ratio", "target"):
        table.add_column(column, overflow="fold")
    table.add_column("met")
    for result in results:
        if "error" in result:
            error = f"[red]error: {result['error']}[/red]"
            table.add_row(result["scenario"], "", error, "", "", "", "")
            continue
        figures, base = _headline(result)
        table.add_row(
            result["title"],
            result["measure"],
            figures,
            base,
            "—" if result["ratio"] is None else f"{result['ratio']:.3f}",
            result["target"],
            "—"
            if result["met"] is None
            else "[green]yes[/green]"
            if result["met"]
            else "[red]no[/red]",
        )
    console.print(table)
    console.print(
        f"{machine['cpu_model']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM; "
        f"Python {machine['python']}, PostgreSQL {machine['postgresql']}, "
        f"Redis {machine['redis']}; {machine['date']}; load average at start "
        f"{machine.get('load_average_start')}, at end {machine.get('load_average_end')}"
    )


def run(
    *,
    only: Sequence[str] | None = None,
    scale: float = 1.0,
    output: Path | None = DEFAULT_OUTPUT,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the scenarios; returns (and writes to ``output``) the results document."""
    from bench.scenarios import Context

    if console is None:
        console = Console(stderr=True)
        if not console.is_terminal:
            console = Console(stderr=True, width=160)
    names = list(only) if only else scenario_names()
    unknown = [n for n in names if n not in scenario_names()]
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; known: {scenario_names()}")
    # The run order of the registry (the sweep mutates the large ledger: it runs after query
    # and rebuild), whatever order --only gave.
    names = [n for n in scenario_names() if n in names]

    def log(message: str) -> None:
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {message}")

    load_start = _load_average()
    postgres = Postgres()
    processes = Processes()
    ctx = Context(scale=scale, log=log, postgres=postgres, processes=processes)
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        for name in names:
            t0 = time.perf_counter()
            try:
                result = _scenario(name)(ctx).to_json()
            except Exception as exc:
                log(f"[red]{name} failed: {exc}[/red]")
                traceback.print_exc()
                result = {"scenario": name, "error": f"{type(exc).__name__}: {exc}"}
            result["wall_seconds"] = round(time.perf_counter() - t0, 1)
            results.append(result)
        machine = machine_info(postgres, ctx._redis if ctx._redis else None)
        machine["load_average_start"] = load_start
        machine["load_average_end"] = _load_average()
        if machine["redis"] is None:
            from bench.env import RedisDb

            redis_db = None
            try:
                redis_db = RedisDb()
                machine["redis"] = redis_db.version()
            except Exception:
                pass
            finally:
                if redis_db is not None:
                    redis_db.release()
    finally:
        processes.close()
        ctx.close()
        postgres.close()
    document = {
        "command": f"python -m bench --scale {scale:g}"
        + (f" --only {' '.join(names)}" if only else ""),
        "scale": scale,
        "machine": machine,
        "setup": ctx.setup,
        "total_seconds": round(time.perf_counter() - started, 1),
        "scenarios": results,
    }
    if output is not None:
        output.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        log(f"results written to {output}")
    render_table(results, machine, console)
    return document


def markdown(document: dict[str, Any]) -> str:
    """The results as the Markdown table of docs/performance.md."""
    lines = [
        "| scenario | measure | result | baseline (same run) | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in document["scenarios"]:
        if "error" in result:
            lines.append(f"| {result['scenario']} | | error: {result['error']} | | | | |")
            continue
        figures, base = _headline(result)
        ratio = "—" if result["ratio"] is None else f"{result['ratio']:.3f}"
        met = "—" if result["met"] is None else "yes" if result["met"] else "**no**"
        lines.append(
            f"| {result['title']} | {result['measure']} | {figures} | {base} | {ratio} "
            f"| {result['target']} | {met} |"
        )
    m = document["machine"]
    lines += [
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; Python "
        f"{m['python']}; PostgreSQL {m['postgresql']}; Redis {m['redis']}; run {m['date']} "
        f"(`{document['command']}`, {document['total_seconds']:.0f} s; load average at start "
        f"{m.get('load_average_start')}, at end {m.get('load_average_end')}).",
    ]
    return "\n".join(lines)


def _load_average() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine skews every figure."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="quota-ledger benchmarks: each scenario against a baseline measured in the "
        "same run, on this machine's PostgreSQL and Redis. Writes bench/results.json.",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="SCENARIO",
        help="run only these scenarios (see --list)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every data size by this (default 1: the sizes of issue #5)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"where to write the results (default {DEFAULT_OUTPUT})",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="RESULTS",
        help="print the table of a results file as Markdown (README) and exit",
    )
    args = parser.parse_args(argv)
    # A terminated run still drops its databases, flushes Redis and stops its workers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.list:
        print("\n".join(scenario_names()))
        return 0
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    if args.scale <= 0:
        parser.error("--scale must be > 0")
    try:
        document = run(only=args.only, scale=args.scale, output=args.output)
    except ValueError as exc:
        parser.error(str(exc))
    failed = [r for r in document["scenarios"] if "error" in r]
    return 1 if failed else 0


def bench_command(
    only: list[str] | None = None,
    scale: float = 1.0,
    output: Path = DEFAULT_OUTPUT,
) -> None:
    """``quota-ledger bench``: the same as ``python -m bench``."""
    argv: list[str] = ["--scale", str(scale), "--output", str(output)]
    if only:
        argv += ["--only", *only]
    code = main(argv)
    if code:
        sys.exit(code)
