"""The one settings object. Every process (CLI, worker, beat, API) reads its configuration here."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration from the environment (prefix ``QUOTA_LEDGER_``).

    The CLI's ``--db`` overrides ``database_url``.
    """

    model_config = SettingsConfigDict(env_prefix="QUOTA_LEDGER_", extra="ignore")

    database_url: str = "sqlite:///quota-ledger.db"
    broker_url: str = "redis://127.0.0.1:6379/0"
    # None means the policy file shipped inside the ``ledger`` package.
    policy_file: Path | None = None
    # Seconds between two beat-scheduled expiry sweeps.
    sweep_interval: float = Field(default=300.0, gt=0)
    # How many due instances one sweep transaction expires.
    sweep_chunk_size: int = Field(default=500, ge=1)
    # ``scope:token`` pairs, comma separated (scopes: read, ingest).
    api_tokens: str = ""

    # --- the Celery pipeline (worker/celery_app.py; README "Celery settings") ---------------
    # Seconds a delivered, unacknowledged message stays invisible before Redis hands it to
    # another worker (only matters when a whole worker dies without a warm shutdown, or Redis
    # restarts under running tasks). Should be longer than the longest task plus the longest
    # retry countdown (``retry_backoff_max``): a shorter one hands a running or retrying message
    # out a second time, which the ledger answers with duplicates (harmless, wasted work). The
    # floor is 5 s so that the fault suite (and deployments that want fast recovery) can go
    # below a minute. Publishers read the same variable (events/publish.py), because kombu
    # uses the shortest value of everybody sharing the broker.
    visibility_timeout: int = Field(default=600, ge=5)
    # Celery's worker_prefetch_multiplier: a worker holds at most multiplier × concurrency
    # unacknowledged messages (bench/prefetch.py, README "Celery settings").
    prefetch_multiplier: int = Field(default=1, ge=1)
    # A message started this many times without completing (it keeps killing its worker
    # process) is dead-lettered as ``processing_error`` and acknowledged.
    max_deliveries: int = Field(default=5, ge=1)
    # Celery retries of a message after a transient database/broker error, and the backoff
    # (seconds: full jitter over min(retry_backoff_max, retry_backoff * 2**retries)).
    max_retries: int = Field(default=8, ge=0)
    retry_backoff: int = Field(default=1, ge=1)
    retry_backoff_max: int = Field(default=60, ge=1)
    # Port for the worker's Prometheus metrics (None: not served).
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # Celery beat's schedule file (None: a fresh temporary file per beat process; the sweep is
    # idempotent, so losing the last-run time costs at most one extra, harmless sweep).
    beat_schedule_file: Path | None = None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
