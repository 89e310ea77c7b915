"""The HTTP API and the ops web page (``quota-ledger serve``).

``create_app(settings)`` builds the FastAPI application; ``serve_command`` runs it under uvicorn.
Thin like the CLI: every answer comes from ``ledger.queries`` and the one serialiser
``ledger.views``; every write goes through ``events.publish`` (valid events) or
``ledger.service.Ledger.apply`` (dead letters).

The names are imported lazily, so that ``worker.cli`` (which registers ``serve``) does not load
FastAPI, Starlette and Jinja2 for every other command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.api.app import create_app
    from worker.api.auth import TokenConfigError

__all__ = ["TokenConfigError", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from worker.api.app import create_app

        return create_app
    if name == "TokenConfigError":
        from worker.api.auth import TokenConfigError

        return TokenConfigError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
