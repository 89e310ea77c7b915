"""``quota-ledger``, the operator CLI (SPEC §7): ``app`` is the Typer application."""

from worker.cli.app import app

__all__ = ["app"]
