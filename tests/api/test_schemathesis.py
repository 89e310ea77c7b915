"""The OpenAPI document says exactly what the server accepts: Schemathesis, with every check,
against a real ``quota-ledger serve`` (SQLite holding the scenario, a private Redis database as
the broker).

Every operation is fuzzed in its examples, coverage and fuzzing phases (schema-valid and
schema-violating requests), then the API is walked as a state machine along the links
Schemathesis infers. A schema-valid request refused, a schema-violating one accepted, a 5xx, a
response the document does not describe, or auth that can be skipped fails the test.

Reproducible and bounded: a fixed seed, a fixed number of examples, no example database.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test
from schemathesis import GenerationMode

from events import iso_utc
from ledger.db import ensure_schema, make_engine
from tests.helpers.api import (
    API_TOKENS,
    BOTH_TOKEN,
    ServeProcess,
    seed,
    serve_process,
)
from tests.helpers.redis_db import private_redis_db
from worker.api.deps import INSTANCE_ID_RE
from worker.api.pagination import encode_cursor
from worker.api.routes import cursor_format

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow, pytest.mark.redis]

SEED = 20261202
MAX_EXAMPLES = 25
STATEFUL_STEPS = 10
STATEFUL_EXAMPLES = 15

# The cursors the server hands out (next_cursor), for the formats the document names them by:
# without these Schemathesis would invent tokens of the right alphabet that decode to nothing.
schemathesis.openapi.format(
    cursor_format("instances"),
    st.builds(
        encode_cursor,
        st.just("instances"),
        st.from_regex(INSTANCE_ID_RE, fullmatch=True),
        st.none() | st.datetimes(timezones=st.just(UTC)).map(iso_utc),
    ),
)
schemathesis.openapi.format(
    cursor_format("rejected"),
    st.builds(encode_cursor, st.just("rejected"), st.integers(0, 2**63 - 1)),
)

# Requests sent and answers seen, for the summary the last test prints (pytest -s shows it).
TALLY: Counter[str] = Counter()

#: GET /v1/changes long-polls up to ``wait`` seconds (≤ 30) when no change is newer than
#: ``after``; the fuzzer's waits are cut to this so that a case costs a moment, not half a minute.
#: A cut wait is still a valid request, so the checks are unchanged.
SHORTEST_WAIT = 0.2


def short_waits(case: schemathesis.Case) -> schemathesis.Case:
    wait = (case.query or {}).get("wait")
    if isinstance(wait, int | float) and not isinstance(wait, bool) and wait > SHORTEST_WAIT:
        case.query["wait"] = SHORTEST_WAIT
    return case


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    db = f"sqlite:///{Path(tmp_path_factory.mktemp('schemathesis')) / 'ledger.db'}"
    engine = make_engine(db)
    ensure_schema(engine)
    seed(engine)  # real instances, entries and numbers for the 200 paths
    engine.dispose()
    with private_redis_db() as broker:
        settings = {"QUOTA_LEDGER_API_TOKENS": API_TOKENS, "QUOTA_LEDGER_BROKER_URL": broker}
        with serve_process(db, settings) as server:
            yield server


@pytest.fixture(scope="module")
def api_schema(served: ServeProcess) -> Any:
    config = schemathesis.Config()
    config.update(seed=SEED, max_failures=None)
    project = config.projects.default
    # One token with both scopes (read for queries, ingest for POST /v1/events); the
    # ignored_auth check sends each request again without it and with a wrong one.
    project.update(
        base_url=served.base_url,
        headers={"Authorization": f"Bearer {BOTH_TOKEN}"},
        workers=1,
        request_timeout=30,
    )
    return schemathesis.openapi.from_url(f"{served.base_url}/openapi.json", config=config)


def test_every_operation_conforms(api_schema: Any) -> None:
    """Schema-valid requests (positive) and schema-violating ones (negative) for each operation.

    Built from ``APIOperation.as_strategy`` rather than ``schemathesis.pytest.from_fixture``,
    whose subtests reach into pytest internals that pytest 9 no longer has."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode).map(short_waits)

            @hypothesis.seed(SEED)
            @hypothesis_settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=strategy)
            def run(case: schemathesis.Case) -> None:
                response = case.call_and_validate()
                TALLY["cases"] += 1
                TALLY[case.operation.label] += 1
                TALLY[f"status {response.status_code}"] += 1

            try:
                run()
            except hypothesis.errors.Unsatisfiable:
                # No schema-violating request exists: no parameters (/healthz), or only a
                # free-form string in the path. Positive cases still ran.
                assert mode is GenerationMode.NEGATIVE, operation.label
                TALLY["operations without negative cases"] += 1


def test_stateful_walk_conforms(api_schema: Any) -> None:
    machine = api_schema.as_state_machine()

    class Walk(machine):  # type: ignore[misc, valid-type]
        def before_call(self, case: schemathesis.Case) -> None:
            super().before_call(case)
            short_waits(case)

        def after_call(self, response: Any, case: schemathesis.Case) -> None:
            super().after_call(response, case)
            TALLY["stateful calls"] += 1
            TALLY[f"status {response.status_code}"] += 1

    run_state_machine_as_test(
        Walk,
        settings=hypothesis_settings(
            max_examples=STATEFUL_EXAMPLES,
            stateful_step_count=STATEFUL_STEPS,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    operations = sorted(key for key in TALLY if key.split(" ", 1)[0] in {"GET", "POST"})
    print(
        f"\nschemathesis: {len(operations)} operations, {TALLY['cases']} cases, "
        f"{TALLY['stateful calls']} stateful calls; statuses "
        + ", ".join(f"{k.split()[1]}×{v}" for k, v in sorted(TALLY.items()) if k[:6] == "status")
    )
    assert not [key for key in TALLY if key.startswith("status 5")], TALLY
