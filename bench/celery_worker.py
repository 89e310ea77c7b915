"""A Celery worker for the benchmark's baseline: the project's own Celery app and settings
(``worker.celery_app.create_app``), the same worker options as ``quota-ledger worker``, plus one
task that does nothing.

    python -m bench.celery_worker noop --concurrency 2
    python -m bench.celery_worker ledger --concurrency 2  # if `quota-ledger worker` is missing

``ledger`` runs the real tasks exactly as ``quota-ledger worker`` does; the benchmark uses it only
when the CLI command is not there.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

NOOP_TASK = "quota_ledger_bench.noop"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.celery_worker")
    parser.add_argument("kind", choices=("noop", "ledger"))
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--queues", default="quota_ledger.events")
    parser.add_argument("--loglevel", default="WARNING")
    args = parser.parse_args()

    from ledger.settings import get_settings
    from worker.celery_app import create_app

    celery = create_app(get_settings())
    if args.kind == "noop":

        @celery.task(name=NOOP_TASK, bind=True)
        def noop(self: Any, *args: Any, **kwargs: Any) -> None:
            return None

    celery.worker_main(
        [
            "worker",
            f"--loglevel={args.loglevel}",
            "--pool=prefork",
            f"--queues={args.queues}",
            f"--hostname=quota-ledger-bench-{os.getpid()}@%h",
            "--without-mingle",
            "--without-gossip",
            f"--concurrency={args.concurrency}",
        ]
    )


if __name__ == "__main__":
    main()
