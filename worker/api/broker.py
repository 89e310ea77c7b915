"""The API's two views of the broker: is it reachable (``/readyz``) and how deep is the events
queue (``/metrics``). Publishing itself is ``events.publish``'s job."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import redis

QUEUE_EVENTS_DEFAULT = "quota_ledger.events"
CHECK_TIMEOUT_S = 2.0
# kombu's Redis transport keeps one list per priority step besides the plain queue key
# (``<queue>\x06\x16<priority>``); the default steps are 0, 3, 6 and 9.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)


def events_queue_name() -> str:
    try:
        from events.publish import QUEUE_EVENTS
    except ImportError:  # publisher not installed: the documented default
        return QUEUE_EVENTS_DEFAULT
    return str(QUEUE_EVENTS)


def is_redis_url(url: str) -> bool:
    return urlsplit(url).scheme in ("redis", "rediss", "redis+socket", "unix")


# One client (and so one small connection pool) per broker URL for the life of the process:
# every /readyz, /metrics scrape and ingest check reuses its connection instead of opening a
# new TCP connection to Redis each time. redis-py's pool is thread-safe and reconnects by itself
# after a Redis restart.
_clients: dict[str, redis.Redis] = {}
_clients_lock = threading.Lock()


def _redis_client(url: str) -> redis.Redis:
    import redis

    with _clients_lock:
        client = _clients.get(url)
        if client is None:
            target = url
            if target.startswith("redis+socket://"):
                target = "unix://" + target.removeprefix("redis+socket://")
            client = redis.Redis.from_url(
                target,
                socket_connect_timeout=CHECK_TIMEOUT_S,
                socket_timeout=CHECK_TIMEOUT_S,
                retry_on_timeout=False,
                health_check_interval=30,
            )
            _clients[url] = client
        return client


def close_clients() -> None:
    """Close the cached Redis clients (at shutdown)."""
    with _clients_lock:
        clients = list(_clients.values())
        _clients.clear()
    for client in clients:
        client.close()


def check_broker(url: str) -> None:
    """Raise if the broker does not answer (Redis: PING; others: a kombu connection)."""
    if is_redis_url(url):
        _redis_client(url).ping()
        return
    from kombu import Connection

    with Connection(url, connect_timeout=CHECK_TIMEOUT_S) as connection:
        connection.ensure_connection(max_retries=1, timeout=CHECK_TIMEOUT_S)


def queue_depth(url: str, queue: str) -> int | None:
    """Messages waiting in ``queue`` (LLEN of its lists), or None for a non-Redis broker."""
    if not is_redis_url(url):
        return None
    keys = [queue] + [f"{queue}{_PRIORITY_SEP}{step}" for step in _PRIORITY_STEPS]
    pipe = _redis_client(url).pipeline(transaction=False)
    for key in keys:
        pipe.llen(key)
    return int(sum(pipe.execute()))


def broker_backlog(url: str, queue: str) -> dict[str, int] | None:
    """What the broker still holds for the workers: ``queued`` (waiting in ``queue``) and
    ``unacked`` (delivered to a worker, not acknowledged yet: kombu's ``unacked`` hash, which
    also keeps a dead worker's messages until their visibility timeout). Both 0 means every
    message published so far was either applied or lost. None for a non-Redis broker."""
    queued = queue_depth(url, queue)
    if queued is None:
        return None
    return {"queued": queued, "unacked": int(_redis_client(url).hlen("unacked"))}
