"""A private database index on the machine's Redis (127.0.0.1:6379) for one test."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import pytest
import redis

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
REDIS_MARKER = "quota-ledger-test:claimed-by"


@contextlib.contextmanager
def private_redis_db(host: str = REDIS_HOST, port: int = REDIS_PORT) -> Iterator[str]:
    """A Redis URL on an empty database index (15 down to 1) claimed with a SETNX marker,
    flushed afterwards. An unreachable server fails the test (CI guarantees it runs)."""
    claim = uuid.uuid4().hex
    for index in range(15, 0, -1):
        client = redis.Redis(host=host, port=port, db=index, socket_timeout=5)
        try:
            if client.dbsize() == 0 and client.set(REDIS_MARKER, claim, nx=True, ex=3600):
                if client.dbsize() == 1:
                    break
                client.delete(REDIS_MARKER)
        except redis.ConnectionError as exc:
            client.close()
            pytest.fail(f"Redis is required but does not answer at {host}:{port}: {exc}")
        except Exception:
            client.close()
            raise
        client.close()
    else:
        pytest.fail(f"no free Redis database index (1-15) on {host}:{port}")
    try:
        yield f"redis://{host}:{port}/{index}"
    finally:
        # The marker expires after an hour, so that a killed run does not keep the index.
        if client.get(REDIS_MARKER) in (claim.encode(), None):
            client.flushdb()
        client.close()
