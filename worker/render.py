"""Human (non-JSON) output of the CLI: Rich tables built from the very dicts ``--json`` prints.

Every function takes the JSON-shaped data of ``ledger.views`` (or a report's ``to_json()``), so
the human output can never show something the JSON does not say. Cell values are wrapped in
:class:`rich.text.Text`, never passed as markup: ids, domains and raw input may contain ``[``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

_STDOUT: Console | None = None
PIPE_WIDTH = 120

# Outcome and status colours: green = good, red = refused, yellow = neither.
_STYLES = {
    "applied": "green",
    "duplicate": "cyan",
    "stale": "yellow",
    "rejected": "red",
    "invalid": "bold red",
    "eligible": "green",
    "ineligible": "red",
    "unknown": "yellow",
    "not_needed": "cyan",
    "not_required": "cyan",
    "active": "green",
    "used": "blue",
    "invalidated": "red",
    "expired": "red",
    "released": "magenta",
    "accepted": "green",
    "withdrawn": "yellow",
}


def console() -> Console:
    """The stdout console (created on first use so tests may swap ``sys.stdout``)."""
    global _STDOUT
    if _STDOUT is None or _STDOUT.file is not sys.stdout:
        # A terminal's own width rules; into a pipe or file (Rich would assume 80 columns)
        # ids, numbers and timestamps fit on one line at 120, unless COLUMNS says otherwise.
        width = None if is_terminal() or os.environ.get("COLUMNS") else PIPE_WIDTH
        _STDOUT = Console(file=sys.stdout, highlight=False, soft_wrap=False, width=width)
    return _STDOUT


def is_terminal() -> bool:
    return sys.stdout.isatty()


def cell(value: Any, style: str | None = None) -> Text:
    if value is None:
        return Text("—", style="dim")
    if isinstance(value, bool):
        value = "yes" if value else "no"
    text = str(value)
    return Text(text, style=style if style is not None else _STYLES.get(text, ""))


def codes(reasons: Iterable[Any]) -> str:
    """Reason codes as one string; accepts codes or explained reasons."""
    return ", ".join(r["code"] if isinstance(r, Mapping) else str(r) for r in reasons)


def short_hash(value: str | None) -> str | None:
    return None if value is None else value[:8] + "…"


def clip(text: str | None, width: int = 80) -> str | None:
    if text is None or len(text) <= width:
        return text
    return text[: width - 1] + "…"


def _table(title: str | None = None, *columns: str, **kwargs: Any) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAVY, title_justify="left", **kwargs)
    for column in columns:
        # Fold, never truncate: an id cut short with "…" is worse than a wrapped one.
        table.add_column(column, overflow="fold")
    return table


#: The narrowest a free-text column (an error, raw input, reasons) is squeezed to by :func:`_fit`.
FREE_TEXT_MIN = 12


def _fit(table: Table, whole: Sequence[str]) -> Table:
    """Keep the ``whole`` columns (ids, numbers, timestamps) on one line while the console has
    room for them, in the order given, next to the other columns wrapped down to
    :data:`FREE_TEXT_MIN`: free text wraps first. A value column that does not fit folds like
    the rest, so a narrow console still shows every character (nothing is ever cut off)."""

    def natural(column: Column) -> int:
        cells = [column.header, *column.cells]
        return max(cell_len(c.plain if isinstance(c, Text) else str(c)) for c in cells)

    columns = {str(column.header): column for column in table.columns}
    widths = {name: natural(column) for name, column in columns.items()}
    # Every column squeezed as far as it goes; one space of padding on either side of each and
    # one rule character between them.
    room = console().width - 3 * len(columns) - 1
    room -= sum(min(width, FREE_TEXT_MIN) for width in widths.values())
    for name in whole:
        extra = widths[name] - min(widths[name], FREE_TEXT_MIN)
        if extra <= room:
            columns[name].no_wrap = True
            room -= extra
    return table


def _facts(rows: Sequence[tuple[str, Any]], title: str | None = None) -> None:
    if title:
        console().print(Text(title, style="bold"))
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value if isinstance(value, Text) else cell(value))
    console().print(table)


# --- show -------------------------------------------------------------------------------------


def show(view: Mapping[str, Any], product_names: Mapping[str, str] | None = None) -> None:
    out = console()
    product = view["product_type"]
    if product and product_names and product in product_names:
        product_text = Text(f"{product} ({product_names[product]})")
    else:
        product_text = cell(product)
    eligibility = view["eligibility"]
    _facts(
        [
            ("instance", view["instance_id"]),
            ("account", view["account_id"]),
            ("product", product_text),
            ("region", view["region"]),
            ("billing", view["billing_method"]),
            ("expires at", view["expires_at"]),
            ("status", view["status"]),
            ("eligibility", eligibility["status"]),
            ("as of", eligibility["as_of"]),
            ("entries", view["entries"]),
            ("parked", view.get("parked", 0)),
            ("head hash", view["head_hash"]),
        ]
    )
    if eligibility["reasons"]:
        table = _table("Why not eligible", "code", "中文", "English", "remediation")
        for reason in eligibility["reasons"]:
            table.add_row(
                cell(reason["code"], "red"),
                cell(reason["message_zh"]),
                cell(reason["message_en"]),
                cell(reason["remediation"]),
            )
        out.print(table)
    slots = _table("Slots", "", "cap", "used", "reserved", "remaining")
    websites, subjects = view["websites"], view["subjects"]
    slots.add_row(
        cell("websites (service numbers)"),
        cell(websites["cap"]),
        cell(websites["used"]),
        cell(websites["reserved"]),
        cell(websites["remaining"], "bold"),
    )
    slots.add_row(
        cell("subjects"),
        cell(subjects["cap"]),
        cell(subjects["used"]),
        cell(None),
        cell(subjects["remaining"], "bold"),
    )
    out.print(slots)
    if view["service_numbers"]:
        table = _table("Service numbers", "number", "status", "issued at", "filing", "invalidated")
        for number in view["service_numbers"]:
            table.add_row(
                cell(number["number"]),
                cell(number["status"]),
                cell(number["issued_at"]),
                cell(number["filing_id"]),
                cell(number["invalidated_reason"]),
            )
        out.print(table)
    else:
        out.print(Text("No service numbers issued.", style="dim"))
    if view["filings"]:
        table = _table("Filings", "filing", "website", "subject", "status")
        for filing in view["filings"]:
            table.add_row(
                cell(filing["filing_id"]),
                cell(filing["website"]),
                cell(filing["subject_id"]),
                cell(filing["status"]),
            )
        out.print(table)
    else:
        out.print(Text("No filings accepted.", style="dim"))


# --- lists ------------------------------------------------------------------------------------


def history(instance_id: str, entries: Sequence[Mapping[str, Any]]) -> None:
    if not entries:
        message(f"The ledger has no entry for {instance_id}.", "dim")
        return
    policies = sorted({entry["policy_version"] for entry in entries})
    table = _table(
        f"History of {instance_id}: {len(entries)} entries, policy {', '.join(policies)}",
        "seq",
        "occurred at",
        "type",
        "event",
        "outcome",
        "reasons / number",
        "hash",
    )
    for entry in entries:
        table.add_row(
            cell(entry["seq"]),
            cell(entry["occurred_at"]),
            cell(entry["type"]),
            cell(entry["event_id"]),
            cell(entry["outcome"]),
            cell(codes(entry["reasons"]) or entry["service_number"]),
            cell(short_hash(entry["hash"])),
        )
    # Short values first, then the service number, the event id, the type; reasons wrap.
    whole = ("seq", "occurred at", "outcome", "hash", "reasons / number", "event", "type")
    console().print(_fit(table, whole))


def instances(rows: Sequence[Mapping[str, Any]], at: str) -> None:
    table = _table(
        f"Instances ({len(rows)}), eligibility as of {at}",
        "instance",
        "product",
        "status",
        "eligibility",
        "websites left",
        "expires at",
    )
    for row in rows:
        table.add_row(
            cell(row["instance_id"]),
            cell(row["product_type"]),
            cell(row["status"]),
            cell(row["eligibility"]),
            cell(row["websites_remaining"]),
            cell(row["expires_at"]),
        )
    console().print(table)


def service_number(info: Mapping[str, Any]) -> None:
    _facts(
        [
            ("number", info["number"]),
            ("instance", info["instance_id"]),
            ("status", info["status"]),
            ("issued at", info["issued_at"]),
            ("filing", info["filing_id"]),
            ("invalidated at", info["invalidated_at"]),
            ("invalidated reason", info["invalidated_reason"]),
        ]
    )


def rejected(rows: Sequence[Mapping[str, Any]], total: int | None = None) -> None:
    if not rows:
        message("No dead letters.", "green")
        return
    title = f"Dead letters ({len(rows)}" + (f" of {total})" if total is not None else ")")
    table = _table(title, "id", "received at", "event", "code", "error", "raw")
    for row in rows:
        table.add_row(
            cell(row["id"]),
            cell(row["received_at"]),
            cell(row["event_id"]),
            cell(row["code"], "red"),
            cell(row["error"]),
            cell(clip(row["raw"], 60)),
        )
    console().print(_fit(table, ("id", "received at", "code", "event")))


def parked(rows: Sequence[Mapping[str, Any]]) -> None:
    if not rows:
        message("No parked events: every instance is applied up to its last published event.")
        return
    table = _table(
        f"Parked events ({len(rows)}), waiting for an earlier publish number",
        "parked at",
        "instance",
        "epoch",
        "n",
        "waiting for",
        "event",
        "type",
    )
    for row in rows:
        table.add_row(
            cell(row["parked_at"]),
            cell(row["instance_id"]),
            cell(row["epoch"]),
            cell(row["n"]),
            cell(row["waiting_for"], "yellow"),
            cell(row["event_id"]),
            cell(row["type"]),
        )
    console().print(table)


# --- apply ------------------------------------------------------------------------------------

OUTCOMES = ("applied", "rejected", "stale", "duplicate", "invalid", "parked")


def apply_summary(
    source: str,
    counts: Mapping[str, int],
    notable: Sequence[tuple[int, Mapping[str, Any]]],
    omitted: int,
    issued: Sequence[tuple[int, str, str]] = (),
) -> None:
    out = console()
    if issued:
        numbers = _table("Service numbers issued", "line", "instance", "service number")
        for line, instance_id, number in issued:
            numbers.add_row(cell(line), cell(instance_id), cell(number, "green"))
        out.print(numbers)
    if notable:
        table = _table("Rejected and invalid lines", "line", "event", "outcome", "reasons", "error")
        for line, result in notable:
            table.add_row(
                cell(line),
                cell(result["event_id"]),
                cell(result["outcome"]),
                cell(codes(result["reasons"])),
                cell(result.get("error")),
            )
        out.print(table)
        if omitted:
            out.print(Text(f"… and {omitted} more rejected or invalid lines.", style="dim"))
    out.print(Text(f"Applied {source}", style="bold"))
    summary = _table(None, "outcome", "lines")
    for outcome in OUTCOMES:
        summary.add_row(cell(outcome), cell(counts.get(outcome, 0)))
    summary.add_row(cell("total", "bold"), cell(sum(counts.values()), "bold"))
    out.print(summary)


# --- sweep, rebuild, verify, db ---------------------------------------------------------------


def sweep(report: Mapping[str, Any], expired_ids: Sequence[str] = ()) -> None:
    """The sweep's line; with ``expired_ids`` (the demo) it names the instances it expired."""
    line = f"Sweep as of {report['as_of']}: {report['expired']} instance(s) expired"
    message(f"{line}: {', '.join(expired_ids)}." if expired_ids else f"{line}.")


def rebuild(report: Mapping[str, Any], *, check: bool) -> None:
    out = console()
    drift_label = "drift found" if check else "drift repaired"
    _facts(
        [
            ("instances", report["instances"]),
            ("entries", report["entries"]),
            (drift_label, ", ".join(report["drift"]) or "none"),
            ("broken chains", ", ".join(report["broken"]) or "none"),
        ],
        title="Rebuild (check only, nothing written)" if check else "Rebuild",
    )
    if report["broken"]:
        out.print(
            Text(
                "Broken instances were left as they are: their entries do not verify or end "
                "before the recorded head. Run `quota-ledger verify` and investigate.",
                style="bold red",
            )
        )


def verify(report: Mapping[str, Any]) -> None:
    out = console()
    _facts(
        [
            ("instances", report["instances"]),
            ("entries", report["entries"]),
            ("broken chains", ", ".join(report["broken"]) or "none"),
            ("change feed", _feed_fact(report.get("feed"))),
        ],
        title="Hash chain verification",
    )
    if report["ok"]:
        out.print(Text("OK: every chain verifies and ends at its recorded head.", style="green"))
    else:
        out.print(
            Text(f"BROKEN: {', '.join(report['broken'])}", style="bold red"),
        )


def _feed_fact(feed: Mapping[str, Any] | None) -> str:
    if not feed:
        return "not checked"
    state = "ok" if feed["ok"] else f"{feed['gaps']} missing, orphans at {feed['orphans']}"
    return f"{feed['changes']} changes up to position {feed['position']}: {state}"


def message(text: str, style: str | None = None) -> None:
    # soft_wrap: a long command line stays one line (copy-pasteable) instead of being broken.
    console().print(Text(text, style=style or ""), soft_wrap=True)


# --- demo -------------------------------------------------------------------------------------


def demo_events(title: str, steps: Sequence[Mapping[str, Any]]) -> None:
    # No "type" column: the demo's event ids name their type (purchase:…, request:…).
    table = _table(title, "#", "event", "outcome", "reasons / number")
    for index, step in enumerate(steps, 1):
        detail = codes(step["reasons"]) or step["service_number"]
        if step["outcome"] == "invalid" and step.get("error"):
            detail = f"{detail}: {step['error']}"
        table.add_row(
            cell(index),
            cell(step["event_id"]),
            cell(step["outcome"]),
            cell(detail),
        )
    console().print(table)
