"""Service numbers (备案服务号): unguessable, globally unique, ≤ 64 of ``[A-Za-z0-9-]``."""

from __future__ import annotations

import secrets


def new_service_number() -> str:
    # 96 random bits from the OS CSPRNG: never derived from guessable input. The database's
    # primary key on service_numbers.number, not luck alone, enforces global uniqueness.
    return "ICP-" + secrets.token_hex(12).upper()
