"""Bearer tokens with scopes (``QUOTA_LEDGER_API_TOKENS="read:…,ingest:…"``).

Tokens are kept only as SHA-256 digests and a presented token is compared, in constant time
(:func:`hmac.compare_digest`), with every configured one, without stopping at the first match:
the time an answer takes says nothing about which token, or how much of one, was right.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

# ``admin``: webhook endpoints (register, list, remove, delivery log).
# ``metrics``: optional; once any token has it, GET /metrics needs one of those tokens.
SCOPES = ("read", "ingest", "admin", "metrics")
MIN_TOKEN_CHARS = 16
# RFC 6750 ``b64token`` characters: what may follow "Bearer " in an Authorization header.
_TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/=-]+")
ENV_NAME = "QUOTA_LEDGER_API_TOKENS"


class TokenConfigError(ValueError):
    """``QUOTA_LEDGER_API_TOKENS`` is malformed; the message never contains a token."""


@dataclass(frozen=True)
class ApiToken:
    scope: str
    digest: bytes


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def parse_tokens(text: str) -> tuple[ApiToken, ...]:
    """Parse ``scope:token,scope:token``; raise :class:`TokenConfigError` if malformed.

    Blank space around entries is ignored; an empty setting means no token at all (every
    authenticated endpoint answers 401). The same token may be listed under both scopes.
    """
    if not text.strip():
        return ()
    tokens: list[ApiToken] = []
    for position, part in enumerate(text.split(","), 1):
        item = part.strip()
        where = f"{ENV_NAME}: entry {position}"
        if not item:
            raise TokenConfigError(
                f"{where} is empty (expected comma-separated scope:token pairs, "
                "e.g. read:TOKEN,ingest:TOKEN)"
            )
        scope, sep, token = item.partition(":")
        scope, token = scope.strip(), token.strip()
        if not sep:
            raise TokenConfigError(f"{where} has no ':' (expected scope:token)")
        if scope not in SCOPES:
            # The scope is not echoed: someone who wrote token:scope would see the token in logs.
            raise TokenConfigError(
                f"{where} has an unknown scope (expected {', '.join(SCOPES[:-1])} or {SCOPES[-1]} "
                "before the ':')"
            )
        if not token:
            raise TokenConfigError(f"{where} ({scope}) has an empty token")
        if not _TOKEN_RE.fullmatch(token):
            raise TokenConfigError(
                f"{where} ({scope}): the token may only contain A-Z a-z 0-9 . _ ~ + / = -"
            )
        if len(token) < MIN_TOKEN_CHARS:
            raise TokenConfigError(
                f"{where} ({scope}): the token is shorter than {MIN_TOKEN_CHARS} characters "
                "(generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        tokens.append(ApiToken(scope, _digest(token)))
    return tuple(tokens)


class Authenticator:
    """Maps a presented token to its scopes."""

    def __init__(self, tokens: tuple[ApiToken, ...]) -> None:
        self._tokens = tokens

    @property
    def configured(self) -> bool:
        return bool(self._tokens)

    def has_scope(self, scope: str) -> bool:
        """Whether any configured token carries ``scope``."""
        return any(token.scope == scope for token in self._tokens)

    def scopes(self, presented: str | None) -> frozenset[str] | None:
        """The scopes of ``presented``, or None when it is missing or matches no token."""
        if not presented:
            return None
        digest = _digest(presented)
        granted: set[str] = set()
        for token in self._tokens:  # every token is compared: no early exit
            if hmac.compare_digest(digest, token.digest):
                granted.add(token.scope)
        return frozenset(granted) if granted else None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip() or None
