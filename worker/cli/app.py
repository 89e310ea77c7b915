"""``quota-ledger``: the operator CLI (SPEC §7), assembled here from its parts:
``options`` (shared options and the error guard), ``ledger`` (the ledger commands), ``pipeline``
(publish, worker, beat) and ``worker.api.cli`` (serve).

Thin by design: every command parses its options, opens the database (upgrading a fresh one to
the current schema first), calls one function of ``ledger`` and prints the result, either as
JSON (``--json``: the shapes of ``ledger.views``, nothing else on stdout) or as Rich tables
built from the same dicts (``worker.render``).

Exit codes: 0 success; 1 a "no" the command is about (``apply``: some line was invalid;
``show`` / ``service-number``: not found; ``rebuild``: broken chains, or drift with
``--check``; ``verify``: broken chains; ``demo``: its ledger did not verify); 2 a usage,
configuration or I/O error (bad option or timestamp, unreadable file, broken policy file,
database unreachable, demo directory or database not fresh). User errors never print a
traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from worker.cli import feed, ledger, pipeline, webhooks
from worker.cli.options import DbOption, GlobalOptions, JsonOption, _utf8_stdout

app = typer.Typer(
    name="quota-ledger",
    help=(
        "ICP filing quota ledger (备案服务号): an append-only ledger of instance events that "
        "decides service numbers and filings and keeps each instance's eligibility and slots."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
db_app = typer.Typer(no_args_is_help=True, help="Database schema commands.")
app.add_typer(db_app, name="db", help="Database schema: `db upgrade` creates or migrates it.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"quota-ledger {version('quota-ledger')}")
        except PackageNotFoundError:
            typer.echo("quota-ledger (not installed)")
        raise typer.Exit(0)


@app.callback()
def main(
    ctx: typer.Context,
    db: DbOption = None,
    as_json: JsonOption = False,
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            metavar="FILE",
            help="Policy file (TOML); overrides QUOTA_LEDGER_POLICY_FILE (default: shipped).",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """ICP filing quota ledger. Options given here apply to every command."""
    _utf8_stdout()
    ctx.obj = GlobalOptions(db=db, json=as_json, policy=policy)


# --- the commands ---------------------------------------------------------------------------------

db_app.command("upgrade")(ledger.db_upgrade)
for command in (ledger.apply, ledger.show, ledger.history, ledger.instances):
    app.command()(command)
app.command("service-number")(ledger.service_number)
for command in (ledger.rejected, ledger.parked, ledger.sweep, ledger.rebuild, ledger.verify):
    app.command()(command)
app.command()(ledger.demo)
app.command()(feed.changes)
app.add_typer(webhooks.webhooks_app, name="webhooks")

from worker.api.cli import serve_command  # noqa: E402  (the HTTP API; imports FastAPI lazily)

app.command("serve", help="Serve the HTTP API and the ops page (/ui/).")(serve_command)
app.command("publish", help="Validate JSONL events and enqueue them for workers.")(
    pipeline.publish_command
)
app.command(
    "reconcile", help="Which published events the ledger never saw (after a broker crash)."
)(pipeline.reconcile_command)
app.command("worker", help="Run a Celery worker that applies queued events.")(
    pipeline.worker_command
)
app.command("beat", help="Run Celery beat: the expiry sweep every few minutes.")(
    pipeline.beat_command
)
