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

**A worker killed right after taking a message cannot lose it.** kombu takes a message with
BRPOP and only then, in a second round trip, records it in the ``unacked`` hash from which the
visibility timeout restores it. A worker killed between the two (kombu issue #305) lost the
message: it was in neither the queue nor ``unacked`` (seen in ``tests/faults/
test_worker_kills.py``). Here one Lua script (:data:`CLAIM_SCRIPT`) pops the message *and*
records it, atomically; the blocking wait for an empty queue is a non-destructive
``BLMOVE key key RIGHT RIGHT``, which takes nothing (``tests/integration/test_transport.py``).
"""

from __future__ import annotations

import base64
import json
import uuid
from queue import Empty
from time import monotonic, time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = [
    "CLAIM_SCRIPT",
    "TASK_DEAD_LETTER",
    "Channel",
    "QoS",
    "Transport",
    "dead_letter_envelope",
]

#: The task that stores a message the worker cannot read (``worker/tasks.py``).
TASK_DEAD_LETTER = "quota_ledger.dead_letter"


#: Take the first message of the queue keys ``KEYS[3..]`` (kombu's BRPOP order) and, in the same
#: atomic step, record it as kombu's ``QoS.append`` would: ``HSET unacked tag [message, exchange,
#: routing_key]`` (``KEYS[1]``) and ``ZADD unacked_index now tag`` (``KEYS[2]``, ``ARGV[1]``).
#: The message is JSON text, so the array is built by concatenation, byte for byte what kombu's
#: restore reads back. An item with no string ``properties.delivery_tag`` or no
#: ``delivery_info`` is returned unrecorded (Python dead-letters it). Replies ``{key, item,
#: tag or nil}``, or nil when every key is empty.
CLAIM_SCRIPT = """
for i = 3, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, message = pcall(cjson.decode, item)
    if ok and type(message) == 'table' and type(message.properties) == 'table' then
      local tag = message.properties.delivery_tag
      local info = message.properties.delivery_info
      if type(tag) == 'string' and type(info) == 'table' then
        redis.call('HSET', KEYS[1], tag, '[' .. item .. ',' .. cjson.encode(info.exchange) ..
                   ',' .. cjson.encode(info.routing_key) .. ']')
        redis.call('ZADD', KEYS[2], ARGV[1], tag)
        return {KEYS[i], item, tag}
      end
    end
    return {KEYS[i], item}
  end
end
return false
"""


def dead_letter_envelope(
    raw: str, error: str, queue: str, *, delivery_tag: str | None = None
) -> dict[str, Any]:
    """A well-formed ``quota_ledger.dead_letter(raw, error)`` message for ``queue`` (protocol 2,
    JSON, kombu's Redis envelope: docs/events.md "Publishing from other languages"), under
    ``delivery_tag`` if given (a fresh one otherwise)."""
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
            "delivery_tag": delivery_tag or str(uuid.uuid4()),
        },
    }


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        """kombu's append, minus its Redis writes for a message :data:`CLAIM_SCRIPT` already
        recorded (the local bookkeeping of delivered messages stays)."""
        if delivery_tag is not None and delivery_tag == self.channel._claimed_tag:
            kombu_virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS

    #: The tag of the message being delivered that :data:`CLAIM_SCRIPT` recorded, if any.
    _claimed_tag: str | None = None
    #: The next fetch is the claim script (True) or the blocking wait for a message (False).
    _claim_next: bool = True
    #: The command whose reply the BRPOP socket is waiting for.
    _sent_command: str = "BRPOP"
    #: The queue that delivered last: the one the blocking wait watches.
    _last_queue: str | None = None

    def _brpop_start(self, timeout: float | None = None) -> None:
        """Send the claim script, or, after it found every queue empty, the blocking wait:
        ``BLMOVE`` of the last-served queue onto itself (no Redis command blocks on several
        lists without taking from them). It returns as soon as a message is there, or after
        ``brpop_timeout``; either way the claim script runs next, over every queue, so a
        message on another queue waits at most ``brpop_timeout`` (1 s) while the worker idles.
        """
        if self.global_keyprefix:  # kombu's own BRPOP (prefixing is kombu's business)
            return super()._brpop_start(timeout)  # type: ignore[no-any-return]
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        if self._claim_next:
            self._sent_command = "EVAL"
            args: list[Any] = [CLAIM_SCRIPT, 2 + len(keys), self.unacked_key]
            args += [self.unacked_index_key, *keys, repr(time())]
        else:
            wait = self._last_queue if self._last_queue in keys else keys[0]
            wait_seconds = self.brpop_timeout if timeout is None else timeout
            self._sent_command = "BLMOVE"
            args = [wait, wait, "RIGHT", "RIGHT", wait_seconds or 0]
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]
        self.client.connection.send_command(self._sent_command, *args)

    def _brpop_read(self, **options: Any) -> bool:
        if self._sent_command == "BRPOP":
            return super()._brpop_read(**options)  # type: ignore[no-any-return]
        try:
            try:
                reply = self.client.parse_response(
                    self.client.connection, self._sent_command, **options
                )
            except self.connection_errors:
                # As kombu: the next poll reconnects.
                self.client.connection.disconnect()
                raise
            if self._sent_command == "BLMOVE" or not reply:
                # After a wait, claim; after an empty claim, wait.
                self._claim_next = self._sent_command == "BLMOVE"
                raise Empty()
            self._claim_next = True
            key, item, *recorded = reply
            tag = bytes_to_str(recorded[0]) if recorded and recorded[0] else None
            readable = self._readable(key, item, delivery_tag=tag)
            queue = bytes_to_str(key).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            self._last_queue = queue
            # A recorded item that turned out unreadable is dead-lettered under its own tag,
            # and QoS.append then overwrites its unacked entry with the dead-letter message.
            self._claimed_tag = tag if readable is item else None
            try:
                self.connection._deliver(loads(bytes_to_str(readable)), queue)
            finally:
                self._claimed_tag = None
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            flush_reauth = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.6
            if flush_reauth is not None:
                flush_reauth()

    def _poll_error(self, type: str, **options: Any) -> Any:
        """kombu reads the pending reply of a socket in error as a BRPOP reply; ours is the
        reply of the command actually sent. A claimed message read here is not delivered, but
        it is recorded in ``unacked``: the visibility timeout hands it out again."""
        if type == "BRPOP" and self._sent_command != "BRPOP":
            reply = self.client.parse_response(self.client.connection, self._sent_command)
            self._in_poll = None  # type: ignore[assignment]  # nothing pending any more
            return reply
        return super()._poll_error(type, **options)

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

    def _readable(
        self, key: bytes | str, item: bytes | str, *, delivery_tag: str | None = None
    ) -> bytes | str:
        """``item`` if kombu can read it, else a dead-letter message carrying its text (under
        ``delivery_tag`` if given)."""
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
            envelope = dead_letter_envelope(raw, error, queue, delivery_tag=delivery_tag)
            return json.dumps(envelope)
        return item


class Transport(kombu_redis.Transport):
    Channel = Channel
