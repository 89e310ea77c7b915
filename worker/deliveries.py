"""Counting deliveries of a message, so that a message that keeps killing its worker process
(``os._exit``, SIGKILL, the OOM killer) ends in the dead-letter store instead of looping.

With ``task_acks_late`` and ``task_reject_on_worker_lost`` a message whose pool process dies
is requeued and delivered again, forever. Each task start increments
``quota_ledger:deliveries:<task id>`` in the broker's Redis (INCR + EXPIRE in one pipeline);
a task that completes in any way (applied, dead-lettered, or handed to a Celery retry) deletes
the key. A message started more than ``max_deliveries`` times has therefore never completed.

Counting is best effort: if Redis cannot be reached the task runs uncounted (it could not be
acknowledged anyway), and a broker that is not Redis (``memory://`` in tests) gets a counter in
process memory.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

log = logging.getLogger(__name__)

KEY_PREFIX = "quota_ledger:deliveries:"
#: Keys outlive any realistic redelivery cycle, then vanish on their own.
MIN_TTL_SECONDS = 24 * 3600


class DeliveryCounter(Protocol):
    def increment(self, task_id: str) -> int | None: ...

    def clear(self, task_id: str) -> None: ...

    def close(self) -> None: ...


class RedisDeliveryCounter:
    def __init__(self, url: str, *, ttl_seconds: int) -> None:
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self.ttl_seconds = ttl_seconds

    def increment(self, task_id: str) -> int | None:
        key = KEY_PREFIX + task_id
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.incr(key)
            pipe.expire(key, self.ttl_seconds)
            count, _ = pipe.execute()
            return int(count)
        except Exception as exc:  # best effort: never fail a task over its bookkeeping
            log.warning("cannot count deliveries of %s: %s", task_id, exc)
            return None

    def clear(self, task_id: str) -> None:
        try:
            self._client.delete(KEY_PREFIX + task_id)
        except Exception as exc:
            log.warning("cannot clear the delivery count of %s: %s", task_id, exc)

    def close(self) -> None:
        self._client.close()


class MemoryDeliveryCounter:
    """For brokers that are not Redis: counts within this process only."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def increment(self, task_id: str) -> int | None:
        with self._lock:
            self._counts[task_id] = self._counts.get(task_id, 0) + 1
            return self._counts[task_id]

    def clear(self, task_id: str) -> None:
        with self._lock:
            self._counts.pop(task_id, None)

    def close(self) -> None:
        pass


def delivery_counter(
    broker_url: str, *, visibility_timeout: int, max_deliveries: int
) -> DeliveryCounter:
    if broker_url.startswith(("redis://", "rediss://", "unix://")):
        ttl = max(MIN_TTL_SECONDS, 2 * visibility_timeout * (max_deliveries + 1))
        return RedisDeliveryCounter(broker_url, ttl_seconds=ttl)
    if not broker_url.startswith("memory://"):
        log.warning(
            "broker %s is not Redis: deliveries are counted per worker process only",
            broker_url.split("://", 1)[0],
        )
    return MemoryDeliveryCounter()
