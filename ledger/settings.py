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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
