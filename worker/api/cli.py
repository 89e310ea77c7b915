"""``quota-ledger serve``: the HTTP API and ops page under uvicorn.

Registered on the CLI by ``worker/cli/app.py``. Imports of FastAPI and uvicorn happen inside the
command, so the rest of the CLI starts as fast as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

MAX_HEADER_BYTES = 16 * 1024


def serve_command(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option("--host", metavar="HOST", help="Interface to listen on.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", metavar="PORT", min=0, max=65535, help="TCP port.")
    ] = 8000,
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            metavar="URL",
            help="Database URL; overrides QUOTA_LEDGER_DATABASE_URL.",
            show_default=False,
        ),
    ] = None,
    log_level: Annotated[
        str, typer.Option("--log-level", metavar="LEVEL", help="uvicorn log level.")
    ] = "info",
    proxy_headers: Annotated[
        bool,
        typer.Option(
            "--proxy-headers/--no-proxy-headers",
            help="Trust X-Forwarded-Proto/For from --forwarded-allow-ips (behind TLS proxies).",
        ),
    ] = False,
    forwarded_allow_ips: Annotated[
        str, typer.Option("--forwarded-allow-ips", metavar="IPS", help="Proxies to trust.")
    ] = "127.0.0.1",
) -> None:
    """Serve the HTTP API (/v1, /healthz, /readyz, /metrics) and the ops page (/ui/)."""
    import pydantic

    from ledger.policy import PolicyError
    from ledger.settings import Settings

    glob = ctx.find_root().obj  # the CLI's global options (--db, --policy), if any
    try:
        settings = Settings()
    except pydantic.ValidationError as exc:
        _fail(f"invalid configuration: {exc.errors(include_url=False)[0]['msg']}")
    update: dict[str, object] = {}
    url = db or getattr(glob, "db", None)
    if url:
        update["database_url"] = url
    policy: Path | None = getattr(glob, "policy", None)
    if policy is not None:
        update["policy_file"] = policy
    if update:
        settings = settings.model_copy(update=update)

    import uvicorn

    from worker.api.app import create_app

    try:
        app = create_app(settings)
    except PolicyError as exc:
        _fail(str(exc))
    except ValueError as exc:  # TokenConfigError, or an unsupported database URL
        _fail(str(exc))
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        proxy_headers=proxy_headers,
        forwarded_allow_ips=forwarded_allow_ips,
        server_header=False,
        timeout_graceful_shutdown=10,
        # The connection limits of docs/security.md. h11 explicitly, so that its header limit
        # applies whatever else is installed: a request line plus headers over 16 KiB is a 400.
        http="h11",
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        limit_concurrency=settings.api_limit_concurrency,
        timeout_keep_alive=settings.api_keep_alive_timeout,
    )


def _fail(message: str) -> None:
    typer.echo(f"quota-ledger: error: {message}", err=True)
    raise typer.Exit(2)
