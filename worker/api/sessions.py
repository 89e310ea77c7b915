"""The ops page's server-side sign-in sessions and the sign-in rate limit.

The cookie holds a random session id, never the API token: a stolen cookie is worth at most the
rest of one session, is limited to reading the ops page, and dies on the server when its owner
signs out or the lifetime ends — whatever the browser does with its copy. The store keeps
SHA-256 digests of the ids (a memory dump shows no usable cookie), in this process only: a
restart signs everybody out, and several API processes behind one name need sticky routing
for the ops page (docs/security.md).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

Clock = Callable[[], float]


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).digest()


class SessionStore:
    """Session ids with a server-side expiry, revocable; at most ``max_sessions`` (the oldest
    is dropped first, so a flood of sign-ins cannot grow the process without bound)."""

    def __init__(
        self, lifetime_s: float, *, max_sessions: int = 10_000, clock: Clock = time.monotonic
    ) -> None:
        self.lifetime_s = lifetime_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._expiry: OrderedDict[bytes, float] = OrderedDict()  # oldest first
        self._lock = threading.Lock()

    def create(self) -> str:
        session_id = secrets.token_urlsafe(32)
        now = self._clock()
        with self._lock:
            self._purge(now)
            while len(self._expiry) >= self.max_sessions:
                self._expiry.popitem(last=False)
            self._expiry[_digest(session_id)] = now + self.lifetime_s
        return session_id

    def valid(self, session_id: str | None) -> bool:
        if not session_id or len(session_id) > 128:
            return False
        key = _digest(session_id)
        with self._lock:
            expiry = self._expiry.get(key)
            if expiry is None:
                return False
            if expiry <= self._clock():
                del self._expiry[key]
                return False
            return True

    def revoke(self, session_id: str | None) -> None:
        if session_id:
            with self._lock:
                self._expiry.pop(_digest(session_id), None)

    def __len__(self) -> int:
        return len(self._expiry)

    def _purge(self, now: float) -> None:
        # Entries are in creation order and share one lifetime: the expired ones lead.
        while self._expiry:
            key, expiry = next(iter(self._expiry.items()))
            if expiry > now:
                break
            del self._expiry[key]


class RateLimiter:
    """At most ``limit`` events per key in each fixed window of ``window_s`` seconds.

    Bounded memory: at most ``max_keys`` keys are tracked; when full, windows that ended are
    dropped, and if none has, the key is refused (a flood from many addresses fails closed for
    new addresses until a window ends, rather than growing the table).
    """

    def __init__(
        self,
        limit: int,
        window_s: float = 60.0,
        *,
        max_keys: int = 10_000,
        clock: Clock = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_keys = max_keys
        self._clock = clock
        self._windows: dict[str, tuple[float, int]] = {}  # key -> (window start, count)
        self._lock = threading.Lock()

    def hit(self, key: str) -> float | None:
        """Count one event for ``key``; None if allowed, else the seconds until it is again."""
        now = self._clock()
        with self._lock:
            start, count = self._windows.get(key, (now, 0))
            if now - start >= self.window_s:
                start, count = now, 0
            if key not in self._windows and len(self._windows) >= self.max_keys:
                self._windows = {
                    k: v for k, v in self._windows.items() if now - v[0] < self.window_s
                }
                if len(self._windows) >= self.max_keys:
                    return self.window_s
            if count >= self.limit:
                return max(self.window_s - (now - start), 0.0)
            self._windows[key] = (start, count + 1)
            return None
