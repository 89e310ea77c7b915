"""A task Celery cancels on a lost broker connection, at the worst place: inside a pydantic
serializer, which wraps the SIGTERM's ``SystemExit`` in an ordinary exception.

``tests/faults/test_broker_restart.py`` lost a message that way now and then (when the kill
happened to land there): the task reported the wrapped error, Celery took it for the task's
failure and — late ack, ``task_acks_on_failure_or_timeout`` — acknowledged the message once the
worker had reconnected to the restarted Redis, through the old channel's client, which
reconnects on its own. Here the task is held there on purpose (``tests/faults/cancel_worker.py``)
and Redis is SIGKILLed and restarted under it: with ``worker.tasks._stopping_as_a_stop`` the
task leaves as the stop it is, Celery acknowledges nothing, and the message comes back after
the visibility timeout and is applied; in the control, where the task lets the wrapped error out
as before, the message is acknowledged unapplied and gone — which shows the test hits the
window.
"""

from __future__ import annotations

import time

import pytest

from events.publish import close_producer, publish_many
from tests.helpers import wait_until
from tests.helpers.faults import check_engine, ledger_event_ids, redis_queue_state
from tests.support import Events

pytestmark = [pytest.mark.faults, pytest.mark.postgres]

VISIBILITY_S = 5


@pytest.mark.timeout(120)
@pytest.mark.parametrize("variant", ["ours", "control"])
def test_a_task_cancelled_inside_a_pydantic_serializer_is_delivered_again(
    pipeline, redis_server, monkeypatch, tmp_path, variant
) -> None:
    monkeypatch.setenv("QUOTA_LEDGER_VISIBILITY_TIMEOUT", str(VISIBILITY_S))
    pipeline.env["QUOTA_LEDGER_VISIBILITY_TIMEOUT"] = str(VISIBILITY_S)
    pipeline.broker_url = redis_server.url
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {"QL_TEST_MARKS": str(marks)}
    if variant == "control":
        env["QL_TEST_CANCEL_AS_FAILURE"] = "1"
    worker = pipeline.worker("holder", concurrency=1, module="tests.faults.cancel_worker", env=env)
    engine = check_engine(pipeline.database_url)
    try:
        publish_many([Events("cancel-hold").purchase("i-cancel")], broker_url=redis_server.url)
        worker.wait_for_log("holding cancel-hold-1 inside a pydantic serializer", timeout=30)
        redis_server.kill()
        killed_at = time.monotonic()
        time.sleep(1.0)
        redis_server.start()
        worker.wait_for_log("Terminating it instead", timeout=30)  # Celery's cancel
        # Back after the visibility timeout, one restore interval (1 s) and the reconnect (2 s).
        bound = VISIBILITY_S + 1 + 2 + 10
        if variant == "ours":
            wait_until(
                lambda: ledger_event_ids(engine, "cancel-hold") == {"cancel-hold-1"},
                bound,
                "the cancelled message to come back and be applied",
            )
            recovered_s = time.monotonic() - killed_at
            assert recovered_s < bound
            assert "raised unexpected" not in worker.text()
        else:
            # Acknowledged as failed once the worker reconnected: in no queue, not in `unacked`,
            # never applied, whatever the wait.
            worker.wait_for_log("raised unexpected", timeout=30)
            time.sleep(bound)
            assert ledger_event_ids(engine, "cancel-hold") == set()
            state = redis_queue_state(redis_server.url)
            assert (state["queued"], state["unacked"]) == (0, 0), state
    finally:
        engine.dispose()
        close_producer(redis_server.url)
    assert worker.popen.poll() is None, "the worker died"
