"""kombu's Redis transport, with one repair: a worker must survive a Redis restart.

When the broker connection drops, Celery's consumer calls ``Connection.collect()`` and then
``Connection.close()``. ``collect()`` drops the transport's client while the default channel is
still open (its first close attempt fails on the dead socket), and the ``close()`` that follows
closes that channel again: it tries to requeue its unacknowledged messages, needs a new Redis
client for that, and kombu's ``Channel._connparams`` dereferences the dropped client —
``AttributeError: 'NoneType' object has no attribute 'hostname'``. That is not a connection
error, so nothing ignores it: "Unrecoverable error", and the whole worker exits (found by
``tests/faults/test_broker_restart.py``: Redis SIGKILLed while a message was in flight).

Here the missing client is reported as the connection error it is. Every close path ignores
connection errors, the consumer reconnects, and the messages that were in flight stay in
Redis's ``unacked`` hash until their visibility timeout hands them out again (the same path as
a worker that died).
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ["Channel", "Transport"]


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise RedisConnectionError("the broker connection is closed")
        return super()._connparams(asynchronous)


class Transport(kombu_redis.Transport):
    Channel = Channel
