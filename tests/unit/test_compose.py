"""``docker-compose.yml`` and ``Dockerfile`` checked structurally (no Docker engine here, so
``docker compose config`` cannot run): services, commands, health checks, dependencies,
volumes, scalability."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
IMAGE_SERVICES = ("migrate", "worker", "beat", "api")

pytestmark = pytest.mark.timeout(10)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def test_services(compose) -> None:
    assert set(compose["services"]) == {"redis", "postgres", "migrate", "worker", "beat", "api"}
    for name, service in compose["services"].items():
        assert "container_name" not in service, f"{name} would not scale"
    assert "deploy" not in compose["services"]["beat"]  # exactly one beat, never replicated


def test_redis_is_durable_and_never_evicts(compose) -> None:
    redis = compose["services"]["redis"]
    command = " ".join(_command(redis))
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])


def test_postgres_has_a_named_volume_and_a_health_check(compose) -> None:
    postgres = compose["services"]["postgres"]
    volume, target = postgres["volumes"][0].split(":", 1)
    assert volume in compose["volumes"] and target == "/var/lib/postgresql/data"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])


def test_the_ledger_services_run_the_cli(compose) -> None:
    services = compose["services"]
    assert _command(services["migrate"]) == ["db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    assert _command(services["worker"])[0] == "worker"
    assert _command(services["beat"])[0] == "beat"
    assert _command(services["api"]) == ["serve", "--host", "0.0.0.0", "--port", "8000"]
    assert "healthz" in " ".join(services["api"]["healthcheck"]["test"])
    for name in IMAGE_SERVICES:
        env = services[name]["environment"]  # YAML merge keys resolved by the loader
        assert "@postgres:5432/" in env["QUOTA_LEDGER_DATABASE_URL"], name
        assert env["QUOTA_LEDGER_BROKER_URL"].startswith("redis://redis:6379/"), name
        assert services[name]["build"] == "." and services[name]["image"], name


def test_dependencies_wait_for_health_and_migration(compose) -> None:
    services = compose["services"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("worker", "api"):
        assert services[name]["depends_on"] == {
            "redis": {"condition": "service_healthy"},
            "postgres": {"condition": "service_healthy"},
            "migrate": {"condition": "service_completed_successfully"},
        }, name
    assert services["beat"]["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert services["beat"]["depends_on"]["migrate"] == {
        "condition": "service_completed_successfully"
    }
    for name in ("redis", "postgres", "api"):
        check = services[name]["healthcheck"]
        assert check["interval"] and check["retries"] >= 3, name


def test_dockerfile_installs_the_project_and_runs_the_cli() -> None:
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    assert text.startswith("#") and "FROM python:3.11" in text
    assert 'ENTRYPOINT ["quota-ledger"]' in text
    assert "USER ledger" in text  # not root
    for path in ("events", "ledger", "worker", "examples", "pyproject.toml"):
        assert path in text
