"""The third-party internals the project overrides, pinned by shape: an upgrade that changes
them fails here, loudly, instead of silently in production (the version ceilings in
pyproject.toml say which releases were checked)."""

from __future__ import annotations

import inspect

import kombu.transport.redis as kombu_redis
import redis
from typer.testing import CliRunner

from events import codec


def test_pydantic_models_are_still_built_directly() -> None:
    # events/codec.py sets __dict__ and __pydantic_fields_set__ itself when that gives exactly
    # model_construct's result; if pydantic changed, the check at import fell back silently.
    assert codec._construct is codec._direct_construct


def test_kombu_redis_channel_has_the_methods_worker_transport_overrides() -> None:
    channel = kombu_redis.Channel
    assert list(inspect.signature(channel._connparams).parameters) == ["self", "asynchronous"]
    assert list(inspect.signature(channel._get_client).parameters) == ["self"]
    assert isinstance(channel.Message, type)
    assert hasattr(kombu_redis, "logger") and isinstance(channel.sep, str)
    # The repair of worker/transport.py reads the connection's client and kombu's message.
    assert "connection" in inspect.getsource(channel._connparams)


def test_kombu_redis_consumer_loop_is_what_the_atomic_take_replaces() -> None:
    """worker/transport.py replaces kombu's BRPOP-then-record: ``_brpop_start`` sends a command
    on the channel's client connection, ``_brpop_read`` parses it and hands the message to
    ``connection._deliver``, which calls ``QoS.append`` (the record it skips)."""
    channel = kombu_redis.Channel
    start = inspect.getsource(channel._brpop_start)
    assert "self._queue_cycle.consume(len(self.active_queues))" in start
    assert "self._q_for_pri(queue, pri) for pri in self.priority_steps" in start
    assert "self._in_poll = self.client.connection" in start
    read = inspect.getsource(channel._brpop_read)
    assert "self._queue_cycle.rotate(dest)" in read
    assert "self.connection._deliver(loads(bytes_to_str(item)), dest)" in read
    assert "self._in_poll = None" in read
    assert list(inspect.signature(kombu_redis.QoS.append).parameters) == [
        "self",
        "message",
        "delivery_tag",
    ]
    assert "self.unacked_key" in inspect.getsource(kombu_redis.QoS.append)
    assert {"unacked_key", "unacked_index_key"} <= set(dir(channel))


def test_redis_client_parse_response_keeps_its_signature() -> None:
    parameters = inspect.signature(redis.Redis.parse_response).parameters
    assert list(parameters)[:3] == ["self", "connection", "command_name"]
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def test_cli_help_shows_flags_without_a_value_placeholder() -> None:
    from worker.cli import app

    result = CliRunner().invoke(app, ["show", "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    assert "--json" in result.stdout and "<bool>" not in result.stdout
