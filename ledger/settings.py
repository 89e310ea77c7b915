"""The one settings object. Every process (CLI, worker, beat, API) reads its configuration here."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: SPEC §9 defaults: events parked per instance before its lowest gap is skipped, and the gap
#: timeout of a ledger built without settings (``Settings.gap_timeout_seconds`` is the real one).
DEFAULT_MAX_PARKED = 1000
DEFAULT_GAP_TIMEOUT = 600.0 + 10.0 + 30.0


def unacked_restore_interval(visibility_timeout: int) -> int:
    """Seconds between two looks of kombu's Redis transport for messages whose visibility
    timeout ran out (``unacked_restore_interval``): a fifth of the timeout, 1–10 s."""
    return max(1, min(10, visibility_timeout // 5))


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
    # Seconds between two beat-scheduled webhook delivery passes (docs/changes.md).
    webhook_interval: float = Field(default=5.0, gt=0)
    # An endpoint that has failed every attempt for this many days is disabled.
    webhook_disable_after_days: float = Field(default=3.0, gt=0)
    # ``scope:token`` pairs, comma separated (scopes: read, ingest, metrics). A SecretStr, so
    # that a repr of the settings, a validation error or a debugger never shows the tokens.
    api_tokens: SecretStr = SecretStr("")

    # --- the HTTP API's own limits (docs/security.md) ----------------------------------------
    # Events one POST /v1/events may carry; a request over it is refused whole (413) and kept
    # as ONE dead letter. Counted before any event is parsed, so a body of millions of tiny
    # lines costs a scan, not a parse per line.
    api_max_events_per_request: int = Field(default=10_000, ge=1, le=100_000)
    # Seconds a client may take to send a whole request body once the app starts reading it;
    # a stalled upload gets a 408 and its connection is closed.
    api_body_timeout: float = Field(default=60.0, gt=0)
    # uvicorn: connections + running requests before new requests get a 503 (None: no limit),
    # and seconds an idle keep-alive connection is kept open.
    api_limit_concurrency: int | None = Field(default=200, ge=1)
    api_keep_alive_timeout: int = Field(default=5, ge=1)
    # Host headers the API answers (TrustedHostMiddleware; "*" = any, "*.example.com" allowed);
    # comma separated in the environment. Anything else is a 400.
    api_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["*"])
    # Swagger UI at /docs loads its script from a CDN: off unless asked for (/openapi.json is
    # always served).
    api_docs: bool = False
    # The ops page: how long a sign-in lasts on the server, and sign-in attempts per client
    # address and minute (429 beyond).
    ui_session_lifetime: int = Field(default=12 * 3600, ge=60)
    ui_login_attempts_per_minute: int = Field(default=10, ge=1)

    # --- the Celery pipeline (worker/celery_app.py; docs/operations.md "Celery settings") ----
    # Seconds a delivered, unacknowledged message stays invisible before Redis hands it to
    # another worker (only matters when a whole worker dies without a warm shutdown, or Redis
    # restarts under running tasks). Should be longer than the longest task plus the longest
    # retry countdown (``retry_backoff_max``): a shorter one hands a running or retrying message
    # out a second time, which the ledger answers with duplicates (harmless, wasted work). The
    # floor is 5 s so that the fault suite (and deployments that want fast recovery) can go
    # below a minute. Publishers read the same variable (events/publish.py), because kombu
    # uses the shortest value of everybody sharing the broker.
    visibility_timeout: int = Field(default=600, ge=5)
    # Seconds between two scans of every worker for messages whose visibility timeout ran out
    # (kombu's ``unacked_restore_interval``, with the throttle at 1 so that every tick scans).
    # Default (None): min(10, visibility_timeout // 5), at least 1. A crashed worker's messages
    # are handed out again at most ``visibility_timeout + unacked_restore_interval`` seconds
    # after the crash (docs/reliability.md).
    unacked_restore_interval: int | None = Field(default=None, ge=1)
    # Seconds before the Redis mutex of that scan (kombu's ``unacked_mutex``) expires on its
    # own. A worker killed while it holds the mutex blocks every other worker's scan until
    # then; kombu's default is 300 s, which held a crashed worker's messages back for up to
    # five minutes after their visibility timeout. Default (None): the restore interval. Must
    # not exceed ``visibility_timeout``, so that such a kill never delays recovery beyond
    # ``visibility_timeout + unacked_restore_interval``. A scan that outlives it is harmless:
    # kombu restores each message in a WATCH/MULTI transaction, so two scans never restore one
    # message twice.
    unacked_mutex_expire: int | None = Field(default=None, ge=1)
    # Celery's worker_prefetch_multiplier: a worker holds at most multiplier × concurrency
    # unacknowledged messages (bench/prefetch.py, docs/operations.md "Celery settings").
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
    # --- the resequencer (SPEC §9; ledger/resequencer.py) ----------------------------------
    # Seconds a gap in an instance's publish numbers may stay open before the events parked
    # behind it are applied without the missing ones. None: the visibility timeout plus the
    # unacked-restore interval plus 30 s, so that a crashed worker's messages (which come back
    # after that) arrive before their successors give up on them.
    gap_timeout: float | None = Field(default=None, gt=0)
    # Events parked for one instance beyond which its lowest gap is skipped at once.
    max_parked: int = Field(default=DEFAULT_MAX_PARKED, ge=1)
    # Seconds between two looks of each worker for timed-out gaps.
    gap_check_interval: float = Field(default=5.0, gt=0, le=5.0)

    # Celery beat's schedule file (None: a fresh temporary file per beat process; the sweep is
    # idempotent, so losing the last-run time costs at most one extra, harmless sweep).
    beat_schedule_file: Path | None = None

    @field_validator("api_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [host.strip() for host in value.split(",") if host.strip()]
        return value

    @model_validator(mode="after")
    def _restore_figures(self) -> Settings:
        if self.unacked_restore_interval is None:
            self.unacked_restore_interval = unacked_restore_interval(self.visibility_timeout)
        if self.unacked_mutex_expire is None:
            self.unacked_mutex_expire = self.unacked_restore_interval
        if self.unacked_restore_interval > self.visibility_timeout:
            raise ValueError(
                f"unacked_restore_interval ({self.unacked_restore_interval}) must not exceed "
                f"visibility_timeout ({self.visibility_timeout})"
            )
        if self.unacked_mutex_expire > self.visibility_timeout:
            raise ValueError(
                f"unacked_mutex_expire ({self.unacked_mutex_expire}) must not exceed "
                f"visibility_timeout ({self.visibility_timeout})"
            )
        return self

    @property
    def crash_recovery_seconds(self) -> int:
        """The longest a crashed worker's messages wait before another worker can take them:
        the visibility timeout plus one restore interval (docs/reliability.md)."""
        assert self.unacked_restore_interval is not None
        return self.visibility_timeout + self.unacked_restore_interval

    @property
    def gap_timeout_seconds(self) -> float:
        if self.gap_timeout is not None:
            return self.gap_timeout
        return float(self.crash_recovery_seconds + 30)

    def resequencer_options(self) -> dict[str, Any]:
        """The ``Ledger`` keyword arguments of the resequencer."""
        return {"gap_timeout": self.gap_timeout_seconds, "max_parked": self.max_parked}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
