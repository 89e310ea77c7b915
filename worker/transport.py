"""kombu's Redis transport, with two repairs, both found by the fault suite (``tests/faults``).

**A worker survives a Redis restart.** When the broker connection drops, Celery's consumer
calls ``Connection.collect()`` and then ``Connection.close()``. ``collect()`` drops the
transport's client while the default channel is still open (its first close attempt fails on
the dead socket), and the ``close()`` that follows closes that channel again: it tries to
requeue its unacknowledged messages, needs a new Redis client for that, and kombu's
``Channel._connparams`` dereferences the dropped client — ``AttributeError: 'NoneType' object
has no attribute 'hostname'``. That is not a connection error, so nothing ignores it:
"Unrecoverable error", and the whole worker exits (found by ``tests/faults/
test_broker_restart.py``: Redis SIGKILLed while a message was in flight).

Here the missing client is reported as the connection error it is. Every close path ignores
connection errors, the consumer reconnects, and the messages that were in flight stay in
Redis's ``unacked`` hash until their visibility timeout hands them out again (the same path as
a worker that died).

**A list item that is not a kombu message cannot kill a worker.** kombu decodes what BRPOP
returns (JSON, then the envelope's ``properties``, ``delivery_tag``, ``delivery_info`` and
base64 body) in the consumer's event loop, where any exception is "Unrecoverable error": one
LPUSH of junk onto ``quota_ledger.events`` stopped a worker, and the item was gone (BRPOP had
removed it). Here every popped item is first checked the way kombu will read it; one that would
fail is replaced by a message of the task ``quota_ledger.dead_letter`` carrying the item's text
and the reason, so the worker stores it in the dead-letter store (``invalid_event``) like any
other input it cannot use, and goes on (``tests/faults/test_poison.py``).
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ["TASK_DEAD_LETTER", "Channel", "Transport", "dead_letter_envelope"]

#: The task that stores a message the worker cannot read (``worker/tasks.py``).
TASK_DEAD_LETTER = "quota_ledger.dead_letter"


def dead_letter_envelope(raw: str, error: str, queue: str) -> dict[str, Any]:
    """A well-formed ``quota_ledger.dead_letter(raw, error)`` message for ``queue`` (protocol 2,
    JSON, kombu's Redis envelope: docs/events.md "Publishing from other languages")."""
    task_id = str(uuid.uuid4())
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    body = json.dumps([[raw, error], {}, embed]).encode("utf-8", "surrogatepass")
    return {
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": TASK_DEAD_LETTER,
            "id": task_id,
            "root_id": task_id,
            "parent_id": None,
            "group": None,
            "retries": 0,
            "eta": None,
            "expires": None,
            "timelimit": [None, None],
        },
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,
            "delivery_info": {"exchange": queue, "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise RedisConnectionError("the broker connection is closed")
        return super()._connparams(asynchronous)

    def _get_client(self) -> Any:
        client_class = super()._get_client()
        if not isinstance(client_class, type):  # a global key prefix (a partial): as it is
            return client_class
        channel = self

        class Client(client_class):  # type: ignore[misc, valid-type]
            def parse_response(self, connection: Any, command_name: Any, **options: Any) -> Any:
                response = super().parse_response(connection, command_name, **options)
                if command_name == "BRPOP" and response:
                    key, item = response
                    return key, channel._readable(key, item)
                return response

        return Client

    def _readable(self, key: bytes | str, item: bytes | str) -> bytes | str:
        """``item`` if kombu can read it, else a dead-letter message carrying its text."""
        try:
            message = self.Message(loads(bytes_to_str(item)), channel=self)
            delivery = message.delivery_info
            _ = delivery["exchange"], delivery["routing_key"]  # what kombu's QoS.append reads
            if not isinstance(message.delivery_tag, str):
                raise TypeError("properties.delivery_tag is not a string")
        except Exception as exc:
            queue = bytes_to_str(key).rsplit(self.sep, 1)[0]
            raw = item.decode("utf-8", "backslashreplace") if isinstance(item, bytes) else item
            error = f"not a readable message: {type(exc).__name__}: {exc}"[:1000]
            kombu_redis.logger.error("dead-lettering an unreadable item of %s: %s", queue, error)
            return json.dumps(dead_letter_envelope(raw, error, queue))
        return item


class Transport(kombu_redis.Transport):
    Channel = Channel
