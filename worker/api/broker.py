"""The API's two views of the broker: is it reachable (``/readyz``) and how deep is the events
queue (``/metrics``). Publishing itself is ``events.publish``'s job."""

from __future__ import annotations

from contextlib import closing
from urllib.parse import urlsplit

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


def _redis_client(url: str):  # -> redis.Redis
    import redis

    if url.startswith("redis+socket://"):
        url = "unix://" + url.removeprefix("redis+socket://")
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=CHECK_TIMEOUT_S,
        socket_timeout=CHECK_TIMEOUT_S,
        retry_on_timeout=False,
    )


def check_broker(url: str) -> None:
    """Raise if the broker does not answer (Redis: PING; others: a kombu connection)."""
    if is_redis_url(url):
        with closing(_redis_client(url)) as client:
            client.ping()
        return
    from kombu import Connection

    with Connection(url, connect_timeout=CHECK_TIMEOUT_S) as connection:
        connection.ensure_connection(max_retries=1, timeout=CHECK_TIMEOUT_S)


def queue_depth(url: str, queue: str) -> int | None:
    """Messages waiting in ``queue`` (LLEN of its lists), or None for a non-Redis broker."""
    if not is_redis_url(url):
        return None
    keys = [queue] + [f"{queue}{_PRIORITY_SEP}{step}" for step in _PRIORITY_STEPS]
    with closing(_redis_client(url)) as client:
        pipe = client.pipeline(transaction=False)
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
    with closing(_redis_client(url)) as client:
        return {"queued": queued, "unacked": int(client.hlen("unacked"))}
