"""The filing policy: the seed's product table as data (``policy.toml``) and its loader.

Every figure of SPEC §3 lives in the TOML file, never in code; the rules in ``ledger.rules`` only
read a :class:`Policy`. A broken file is refused when it is loaded, with a message naming the
file and the field, so a worker never starts on a policy it cannot apply.
"""

from __future__ import annotations

import tomllib
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from events import PRODUCT_TYPES

SHIPPED_POLICY = "policy.toml"


class PolicyError(ValueError):
    """The policy file cannot be read or does not describe a usable policy."""


class ProductPolicy(BaseModel):
    """What one product type needs before it may carry ICP filings, and how many."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name_zh: str
    name_en: str
    billing: Literal["subscription"] | None = None
    min_term_months: int = Field(default=0, ge=0, le=120)
    term_counts: Literal["total", "first_purchase"] = "total"
    min_remaining_days: int = Field(default=0, ge=0)
    requires_public_bandwidth: bool = False
    min_first_order_cny: Decimal | None = Field(default=None, ge=0)
    website_cap: int = Field(ge=0)
    subject_cap: int = Field(ge=0)
    service_number_needed: bool = True
    free_service_numbers: bool = False


class RegionPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mainland_prefix: str = "cn-"
    not_mainland: tuple[str, ...] = ("cn-hongkong",)

    def is_mainland(self, region: str) -> bool:
        return region.startswith(self.mainland_prefix) and region not in self.not_mainland


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(min_length=1, max_length=64)
    regions: RegionPolicy = RegionPolicy()
    products: dict[str, ProductPolicy]
    # Days of remaining term at which the sweep reminds (``instance.renewal_due`` changes) an
    # instance that holds active numbers or accepted filings. Decides nothing: no version bump.
    renewal_reminder_days: tuple[int, ...] = Field(default=(30, 7, 1), max_length=16)

    @model_validator(mode="after")
    def _reminder_days_are_positive_and_distinct(self) -> Policy:
        days = self.renewal_reminder_days
        if any(day < 1 or day > 3660 for day in days) or len(set(days)) != len(days):
            raise ValueError("renewal_reminder_days: distinct whole days from 1 to 3660")
        return self

    @model_validator(mode="after")
    def _covers_every_product_type(self) -> Policy:
        # An event may name any product type of the wire contract; a policy that forgot one
        # would make decisions crash at 3 a.m., so it is refused at load time instead.
        missing = sorted(set(PRODUCT_TYPES) - set(self.products))
        unknown = sorted(set(self.products) - set(PRODUCT_TYPES))
        problems = []
        if missing:
            problems.append(f"products: missing {', '.join(missing)}")
        if unknown:
            problems.append(f"products: unknown product type {', '.join(unknown)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def product(self, product_type: str) -> ProductPolicy:
        return self.products[product_type]


def _format_validation_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(file)"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def parse_policy(text: str, *, source: str = "<policy>") -> Policy:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy file {source} is not valid TOML: {exc}") from None
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(
            f"policy file {source} is invalid: {_format_validation_error(exc)}"
        ) from None


def load_policy(path: Path | str | None = None) -> Policy:
    """Load ``path``, or the policy shipped with the package when ``path`` is None."""
    if path is None:
        text = resources.files("ledger").joinpath(SHIPPED_POLICY).read_text(encoding="utf-8")
        return parse_policy(text, source=f"(shipped) {SHIPPED_POLICY}")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc.strerror or exc}") from None
    return parse_policy(text, source=str(path))


@lru_cache(maxsize=8)
def cached_policy(path: str | None) -> Policy:
    """One parsed policy per file per process (workers decide thousands of events a second)."""
    return load_policy(path)
