"""The worker's Celery consumer (``worker_consumer``): a message it cannot run ends in the
dead-letter store instead of only in the log, and never stops the worker.

Celery's own consumer handles such messages in its main process, before any task runs:

- a body that does not decode (broken JSON, not UTF-8): logged ("Can't decode message body")
  and acknowledged, i.e. dropped;
- a task name nobody runs, or a message without one: logged and rejected, i.e. dropped;
- headers Celery does not expect: a task name that is a list raised in the event loop,
  "Unrecoverable error", and the whole worker exited; a message without a task id raised
  ``KeyError``, which kombu's Redis transport counts as a connection error, so the consumer
  reconnected, the message was requeued and popped again, forever (both found by
  ``tests/faults/test_poison.py``).

Here each of them is also sent, with its body as text and the reason, to the task
``quota_ledger.dead_letter`` (``worker/tasks.py``), which stores it as ``invalid_event``; the
message itself is then acknowledged as before. A message in a content type the worker refuses
to read (pickle, YAML, …) is still refused unread and only logged (docs/operations.md,
"Celery settings").
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.exceptions import ContentDisallowed
from vine import promise

from events.publish import QUEUE_EVENTS
from worker.transport import TASK_DEAD_LETTER

__all__ = ["Consumer"]

log = logging.getLogger(__name__)

_MAX_ERROR_CHARS = 1000


def _text(body: Any) -> str:
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body).decode("utf-8", "backslashreplace")
    return body if isinstance(body, str) else repr(body)


class Consumer(CeleryConsumer):
    def dead_letter(self, message: Any, error: str) -> None:
        """Send ``message``'s body and ``error`` to ``quota_ledger.dead_letter`` (best effort:
        if even that fails, the log line is all that is left, as with Celery's own handling)."""
        error = error[:_MAX_ERROR_CHARS]
        try:
            self.app.send_task(
                TASK_DEAD_LETTER,
                args=[_text(message.body), error],
                queue=QUEUE_EVENTS,
                routing_key=QUEUE_EVENTS,
                ignore_result=True,
            )
        except Exception:
            log.exception("could not dead-letter an unreadable message (%s)", error)

    def create_task_handler(self, promise: Any = promise) -> Any:
        handle = super().create_task_handler(promise)

        def on_task_received(message: Any) -> Any:
            try:
                return handle(message)
            except Exception as exc:
                # kombu's Redis transport counts KeyError among its connection errors, so a
                # message without ``headers.id`` looked like a lost connection: reconnect, the
                # message requeued, popped again — forever. Here it is the message's fault.
                lost = isinstance(exc, self.connection_errors) and not isinstance(exc, KeyError)
                if lost or message.acknowledged:
                    raise
                log.exception("cannot run a message; dead-lettering it")
                self.dead_letter(message, f"cannot run the message: {type(exc).__name__}: {exc}")
                message.ack_log_error(log, self.connection_errors)
                return None

        return on_task_received

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self.dead_letter(
            message, f"the message body does not decode ({message.content_type}): {exc}"
        )
        super().on_decode_error(message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self.dead_letter(message, "not a task message (no task name)")
        super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        self.dead_letter(message, f"unknown task {headers.get('task')!r}: no worker runs it")
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        if not isinstance(exc, ContentDisallowed):
            self.dead_letter(message, f"invalid task message: {exc}")
        super().on_invalid_task(body, message, exc)
