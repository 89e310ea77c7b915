"""A retry whose copy cannot be published, against a real refused connection (no broker mock).

Celery retries a task by publishing a copy of its message and acknowledging the original. When
the copy cannot be published, ``Task.retry`` raises ``Reject(requeue=False)``, and the
original is acknowledged all the same: a message whose database call failed while the broker
was down longer than the publish retries was gone. ``worker.tasks._retry`` requeues it instead.
"""

from __future__ import annotations

import pytest
from celery.exceptions import Reject

from events.publish import TASK_APPLY_BATCH
from ledger.settings import Settings
from worker import tasks
from worker.celery_app import create_app


def test_a_retry_that_cannot_be_published_requeues_its_message(sqlite_url) -> None:
    # Port 1 refuses at once; redis-py still retries each connection for ~4 s.
    celery = create_app(Settings(database_url=sqlite_url, broker_url="redis://127.0.0.1:1/0"))
    celery.conf.task_publish_retry = False
    task = celery.tasks[TASK_APPLY_BATCH]
    task.push_request(id="rq-1", retries=0, is_eager=False, called_directly=False)
    error = ConnectionError("the database is down")
    try:
        with pytest.raises(Reject) as celerys_own:
            task.retry(exc=error, countdown=1, max_retries=None)
        assert celerys_own.value.requeue is False  # what made the original message go
        with pytest.raises(Reject) as ours:
            tasks._retry(task, error, countdown=1, max_retries=None)
        assert ours.value.requeue is True
        assert ours.value.__cause__ is error
    finally:
        task.pop_request()
