"""The JSON endpoints: ``/v1/…`` (behind tokens), ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY
from prometheus_client.exposition import choose_encoder
from sqlalchemy import text
from sqlmodel import Session

from events import Event, EventRejection, iso_utc
from events.models import ProductType
from ledger.changefeed import current_position
from ledger.clock import utcnow
from ledger.db import error_line
from ledger.queries import (
    instance_history,
    iter_instances,
    parked_events,
    rejected_events,
    service_number_info,
    show_instance,
)
from ledger.results import ApplyResult
from ledger.rules import EligibilityStatus
from worker import metrics
from worker.api import broker, schemas
from worker.api.deps import (
    INSTANCE_ID_RE,
    SERVICE_NUMBER_RE,
    ApiState,
    api_state,
    db_session,
    metrics_guard,
    parse_time_param,
    require_scope,
)
from worker.api.errors import ApiError, ApiJSONResponse, clip, error_body, quoted
from worker.api.ingest import BodyError, UnsupportedMediaType, body_format, parse_body
from worker.api.ingest_limits import over_event_limit, oversize_rejection
from worker.api.metrics import INGESTED
from worker.api.pagination import MAX_CURSOR_CHARS, decode_cursor, encode_cursor
from worker.ingest import BrokerUnavailable, enqueue_to, ingest

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
ENQUEUE_BATCH = 500
# Invalid events listed in a POST /v1/events answer; ``invalid_count`` has the total and every
# one of them is in the dead-letter store (GET /v1/rejected).
MAX_INVALID_LISTED = 100
# Longer than events.publish's own retry policy (about 20 s), so that it decides: a request never
# gives up while its publish may still go through.
ENQUEUE_TIMEOUT_S = 30.0
CHECK_TIMEOUT_S = 5.0

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": schemas.Error, "description": "Missing or invalid bearer token"},
    403: {"model": schemas.Error, "description": "The token lacks the scope"},
    422: {"model": schemas.Error, "description": "Invalid parameter"},
    503: {"model": schemas.Error, "description": "Database unreachable"},
}


def _responses(model: type, *extra: int, **more: Any) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {200: {"model": model}}
    out.update(_ERRORS)
    for status in extra:
        out[status] = {"model": schemas.Error}
    out.update(more)
    return out


read = [Depends(require_scope("read"))]
api = APIRouter(prefix="/v1")
ops = APIRouter()

# What the OpenAPI document says of an instant in a query: an RFC 3339 date-time, which
# parse_time_param accepts (it also takes a few ISO 8601 spellings more). The pattern keeps out
# years 0001 and 9999, where an offset can push the instant out of what a datetime holds in UTC
# (refused with 422), so that every schema-valid value is answered. The server still checks the
# value itself, so a bad one gets its own message ("at: …") rather than pydantic's.
_INSTANT_SCHEMA: dict[str, Any] = {
    "format": "date-time",
    "pattern": r"^(000[2-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-8][0-9]{3}|9[0-8][0-9]{2}|99[0-8][0-9]"
    r"|999[0-8])-",
    "maxLength": 64,
}


# A cursor is an opaque token (worker/api/pagination.py): its alphabet and length are all a
# pattern can say, and only a next_cursor of the same list is accepted. The "format" names which
# list's token it is, for clients and fuzzers (tests/api/test_schemathesis.py gives Schemathesis
# a generator for each), which would otherwise invent strings the server refuses with 422.
def cursor_format(kind: str) -> str:
    return f"quota-ledger-{kind}-cursor"


def _cursor_query(kind: str) -> Any:
    return Query(
        None,
        description="next_cursor of the previous page of this list, exactly as received.",
        json_schema_extra={
            "format": cursor_format(kind),
            "pattern": "^[A-Za-z0-9_-]+$",
            "minLength": 1,
            "maxLength": MAX_CURSOR_CHARS,
        },
    )


def _instant_query(description: str) -> Any:
    return Query(
        None,
        description=description + " (RFC 3339, e.g. 2026-09-01T00:00:00Z).",
        examples=["2026-09-01T00:00:00Z"],
        json_schema_extra=_INSTANT_SCHEMA,
    )


AtQuery = _instant_query("Evaluate eligibility at this instant; default now")
LimitQuery = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="Page size (1–1000).")


def decode_cursor_error() -> ApiError:
    return ApiError(422, "invalid_cursor", "cursor: not a cursor of this list")


def _not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


# --- queries -------------------------------------------------------------------------------------


@api.get(
    "/instances/{instance_id}",
    dependencies=read,
    response_model=None,
    responses=_responses(schemas.InstanceView, 404),
    summary="One instance (like `quota-ledger show ID --at T --json`)",
)
def get_instance(
    instance_id: str,
    at: str | None = AtQuery,
    state: ApiState = Depends(api_state),
    session: Session = Depends(db_session),
) -> Response:
    when = parse_time_param(at, "at") or utcnow()
    view = None
    if INSTANCE_ID_RE.fullmatch(instance_id):
        view = show_instance(session, instance_id=instance_id, at=when, policy=state.policy)
    if view is None:
        raise _not_found(f"the ledger has no entry for instance {quoted(instance_id)}")
    return ApiJSONResponse(view)


@api.get(
    "/instances/{instance_id}/entries",
    dependencies=read,
    response_model=None,
    responses=_responses(list[schemas.Entry]),
    summary="The instance's ledger entries, oldest first (like `history ID --json`)",
)
def get_entries(instance_id: str, session: Session = Depends(db_session)) -> Response:
    entries: list[dict[str, Any]] = []
    if INSTANCE_ID_RE.fullmatch(instance_id):
        entries = instance_history(session, instance_id=instance_id)
    return ApiJSONResponse(entries)


@api.get(
    "/instances",
    dependencies=read,
    response_model=None,
    responses=_responses(schemas.InstancePage),
    summary="Instances, filtered and paginated (rows of `instances --json`)",
)
def list_instances(
    eligibility: EligibilityStatus | None = Query(
        None, description="Only this eligibility at `at`."
    ),
    product: ProductType | None = Query(None, description="Only this product type."),
    expiring_before: str | None = _instant_query(
        "Only instances whose subscription ends before this instant"
    ),
    at: str | None = AtQuery,
    limit: int = LimitQuery,
    cursor: str | None = _cursor_query("instances"),
    state: ApiState = Depends(api_state),
    session: Session = Depends(db_session),
) -> Response:
    before = parse_time_param(expiring_before, "expiring_before")
    after: str | None = None
    when = parse_time_param(at, "at")
    if cursor is not None:
        position = decode_cursor("instances", cursor)
        after = position["a"]
        if not isinstance(after, str) or not INSTANCE_ID_RE.fullmatch(after):
            raise decode_cursor_error()
        if when is None and isinstance(position.get("t"), str):
            when = parse_time_param(position["t"], "cursor")
    when = when or utcnow()
    rows = list(
        iter_instances(
            session,
            policy=state.policy,
            at=when,
            eligibility=eligibility,
            product=product,
            expiring_before=before,
            after=after,
            limit=limit + 1,
        )
    )
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor("instances", rows[-1]["instance_id"], iso_utc(when))
    return ApiJSONResponse({"items": rows, "next_cursor": next_cursor})


@api.get(
    "/service-numbers/{number}",
    dependencies=read,
    response_model=None,
    responses=_responses(schemas.ServiceNumberInfo, 404),
    summary="One service number (like `service-number SN --json`)",
)
def get_service_number(number: str, session: Session = Depends(db_session)) -> Response:
    info = None
    if SERVICE_NUMBER_RE.fullmatch(number):
        info = service_number_info(session, number=number)
    if info is None:
        raise _not_found(f"no service number {quoted(number)} was ever issued")
    return ApiJSONResponse(info)


@api.get(
    "/rejected",
    dependencies=read,
    response_model=None,
    responses=_responses(schemas.RejectedPage),
    summary="The dead-letter store, oldest first, paginated (rows of `rejected --json`)",
)
def list_rejected(
    limit: int = LimitQuery,
    cursor: str | None = _cursor_query("rejected"),
    session: Session = Depends(db_session),
) -> Response:
    after_id: int | None = None
    if cursor is not None:
        after = decode_cursor("rejected", cursor)["a"]
        if isinstance(after, bool) or not isinstance(after, int) or not 0 <= after < 2**63:
            raise decode_cursor_error()
        after_id = after
    rows = rejected_events(session, after_id=after_id, limit=limit + 1)
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor("rejected", rows[-1]["id"])
    return ApiJSONResponse({"items": rows, "next_cursor": next_cursor})


@api.get(
    "/parked",
    dependencies=read,
    response_model=None,
    responses=_responses(list[schemas.ParkedEvent]),
    summary="Events parked behind a gap in publish numbers, oldest first (`parked --json`)",
)
def list_parked(
    instance: str | None = Query(None, description="Only this instance's parked events."),
    limit: int = LimitQuery,
    session: Session = Depends(db_session),
) -> Response:
    return ApiJSONResponse(parked_events(session, instance_id=instance, limit=limit))


# --- ingest --------------------------------------------------------------------------------------

# What the ingest accepts as a whole (worker/api/ingest.py): a JSON array, or a lone object
# (one event), or JSONL text with a line that is not blank. Whether each element is an event is
# decided one by one: one that is not is dead-lettered and listed in the 202 answer, never a
# refusal of the request, so the elements are any JSON value here.
_JSONL_BODY: dict[str, Any] = {
    "schema": {"type": "string", "pattern": r"\S", "description": "One event per line"}
}
_EVENTS_BODY = {
    "requestBody": {
        "required": True,
        "description": "Events as a JSON array (application/json; a lone object is one event) "
        "or one per line (application/x-ndjson, application/jsonl, text/plain); other or "
        "missing types are sniffed from the first character. At most 5 MiB; each event at "
        "most 64 KiB. An element that is not a valid event (SPEC §5) is dead-lettered and "
        "listed in the answer's `invalid`.",
        "content": {
            "application/json": {
                "schema": {
                    "type": ["array", "object"],
                    "items": {"description": "An event (SPEC §5)"},
                }
            },
            "application/x-ndjson": _JSONL_BODY,
            "application/jsonl": _JSONL_BODY,
            "text/plain": _JSONL_BODY,
        },
    }
}


async def _blocking(func: Any, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
    call = partial(func, *args, **kwargs)
    if timeout is None:
        return await anyio.to_thread.run_sync(call)
    with anyio.fail_after(timeout):
        return await anyio.to_thread.run_sync(call, abandon_on_cancel=True)


def _first_line(exc: BaseException) -> str:
    return clip(error_line(exc), 200)


def _broker_unavailable() -> Response:
    # The cause (host, port, driver error) goes to the log, never to the client.
    return ApiJSONResponse(
        error_body(
            "broker_unavailable",
            "could not enqueue the events: the broker is unreachable; no event of this request "
            "was dead-lettered: retry the whole request (re-sent events are duplicates, which "
            "the ledger answers idempotently)",
        ),
        503,
        headers={"Retry-After": "5"},
    )


@api.post(
    "/events",
    status_code=202,
    dependencies=[Depends(require_scope("ingest"))],
    response_model=None,
    responses={
        202: {"model": schemas.IngestResult, "description": "Validated; valid events enqueued"},
        400: {"model": schemas.Error, "description": "The body is not a JSON array nor JSONL"},
        401: _ERRORS[401],
        403: _ERRORS[403],
        413: {
            "model": schemas.Error,
            "description": "Body over 5 MiB, or more events than the limit per request "
            "(too_many_events: refused whole, kept as one dead letter)",
        },
        415: {"model": schemas.Error, "description": "Unsupported Content-Type"},
        503: {"model": schemas.Error, "description": "Broker or database unreachable"},
    },
    openapi_extra=_EVENTS_BODY,
    summary="Validate events, enqueue the valid ones, dead-letter the invalid ones",
)
async def post_events(request: Request, state: ApiState = Depends(api_state)) -> Response:
    body = await request.body()  # the body-limit middleware stops it at 5 MiB
    if not body.strip():
        raise ApiError(400, "empty_body", "the body is empty: send events as JSON or JSONL")
    try:
        fmt = body_format(request.headers.get("content-type"), body)
    except UnsupportedMediaType as exc:
        raise ApiError(415, "unsupported_media_type", str(exc)) from None
    limit = state.settings.api_max_events_per_request
    if await _blocking(over_event_limit, body, fmt, limit):
        await _dead_letter(state, [oversize_rejection(body, limit)])
        raise ApiError(
            413,
            "too_many_events",
            f"the request holds more than {limit} events (the limit per request); it was "
            "refused whole (nothing enqueued, kept as one dead letter): split it",
        )
    try:
        items = await _blocking(parse_body, body, fmt)
    except BodyError as exc:
        raise ApiError(400, exc.code, str(exc)) from None

    def enqueue(events: Sequence[Event]) -> None:
        # Called by ingest in its worker thread: the broker checks run on the event loop,
        # where a broker that stops answering can be given up on after ENQUEUE_TIMEOUT_S.
        anyio.from_thread.run(_enqueue, state, events)

    try:
        done = await _blocking(
            ingest,
            [item.parsed for item in items],
            enqueue=enqueue,
            dead_letter=partial(_store_rejections, state),
        )
    except BrokerUnavailable:
        return _broker_unavailable()

    rejected = [item for item in items if isinstance(item.parsed, EventRejection)]
    invalid = [
        {
            "index": item.index,
            "code": item.parsed.code,
            "error": item.parsed.error,
            "event_id": item.parsed.event_id,
        }
        for item in rejected[:MAX_INVALID_LISTED]
        if isinstance(item.parsed, EventRejection)
    ]
    return ApiJSONResponse(
        {"accepted": len(done.queued), "invalid": invalid, "invalid_count": len(rejected)}, 202
    )


async def _enqueue(state: ApiState, events: Sequence[Event]) -> None:
    """The HTTP ingest's enqueue step (``worker.ingest``): a quick PING first, so that an
    unreachable broker is a 503 in about 2 s instead of after the publisher's whole retry
    policy; then the publisher's sequenced enqueue, given up on after ENQUEUE_TIMEOUT_S."""
    url = state.settings.broker_url
    problem = await _run_check(broker.check_broker, url)
    if problem != "ok":
        log.warning("broker unreachable, events not enqueued: %s", problem)
        raise BrokerUnavailable(problem)
    try:
        await _blocking(
            enqueue_to(url, batch_size=ENQUEUE_BATCH), events, timeout=ENQUEUE_TIMEOUT_S
        )
    except Exception as exc:
        log.warning("enqueue failed: %s", _first_line(exc), exc_info=exc)
        raise BrokerUnavailable(_first_line(exc)) from exc
    for event in events:
        INGESTED.labels(type=event.type).inc()


def _store_rejections(state: ApiState, rejections: Sequence[EventRejection]) -> list[ApplyResult]:
    """Store rejections through ``Ledger.apply`` (the path ``apply`` uses) and count them."""
    state.ensure_schema()
    results = state.ledger.apply(rejections)
    for result in results:
        metrics.EVENTS.labels(type="unknown", outcome=result.outcome).inc()
        if result.outcome == "invalid" and result.reasons:
            metrics.DEAD_LETTERS.labels(code=result.reasons[0]).inc()
    return results


async def _dead_letter(state: ApiState, rejections: list[EventRejection]) -> None:
    await _blocking(_store_rejections, state, rejections)


# --- operations ----------------------------------------------------------------------------------


@ops.get("/healthz", response_model=None, responses={200: {"model": schemas.Health}})
async def healthz() -> Response:
    """The process is alive (no dependency is checked)."""
    return ApiJSONResponse({"status": "ok"})


def _check_database(state: ApiState) -> None:
    with state.engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    state.ensure_schema()


async def _run_check(func: Any, *args: Any) -> str:
    try:
        await _blocking(func, *args, timeout=CHECK_TIMEOUT_S)
    except TimeoutError:
        return f"error: no answer within {CHECK_TIMEOUT_S:g} s"
    except Exception as exc:
        return f"error: {_first_line(exc)}"
    return "ok"


@ops.get(
    "/readyz",
    response_model=None,
    responses={
        200: {"model": schemas.Readiness},
        503: {"model": schemas.Readiness, "description": "A dependency is unreachable"},
    },
)
async def readyz(state: ApiState = Depends(api_state)) -> Response:
    """The database (schema at head) and the broker both answer; 503 naming the one that
    does not (``"error"``; why is logged, not shown: this route needs no token)."""
    checks: dict[str, str] = {}

    async def run(name: str, func: Any, *args: Any) -> None:
        checks[name] = await _run_check(func, *args)

    async with anyio.create_task_group() as group:
        group.start_soon(run, "database", _check_database, state)
        group.start_soon(run, "broker", broker.check_broker, state.settings.broker_url)
    failed = [name for name in ("database", "broker") if checks[name] != "ok"]
    for name in failed:  # the cause (host, port, driver error) is for the log only
        log.warning("readiness: %s %s", name, checks[name])
    public = {name: "error" if name in failed else "ok" for name in ("database", "broker")}
    if not failed:
        return ApiJSONResponse({"status": "ready", "checks": public})
    return ApiJSONResponse(
        {
            "status": "unavailable",
            "checks": public,
            "error": "not_ready",
            "message": f"unreachable: {', '.join(failed)}",
        },
        503,
    )


@ops.get(
    "/metrics",
    dependencies=[Depends(metrics_guard)],
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"},
        401: _ERRORS[401],
        403: _ERRORS[403],
    },
    # The token is optional until one with the metrics scope is configured: an empty
    # requirement (added to the bearer one FastAPI derives from metrics_guard) says so.
    openapi_extra={"security": [{}]},
)
async def prometheus_metrics(request: Request, state: ApiState = Depends(api_state)) -> Response:
    """Prometheus metrics of this process; the events queue depth is measured on each scrape.
    Open unless a token with the ``metrics`` scope is configured; then it needs one."""
    started = time.monotonic()
    try:
        depth = await _blocking(
            broker.queue_depth, state.settings.broker_url, state.queue, timeout=CHECK_TIMEOUT_S
        )
    except Exception as exc:  # an unreachable broker must not break the scrape
        log.info("queue depth unavailable: %s", _first_line(exc))
    else:
        if depth is not None:
            metrics.QUEUE_DEPTH.labels(queue=state.queue).set(depth)
    log.debug("queue depth measured in %.3f s", time.monotonic() - started)
    try:  # one primary-key read of the feed's counter row
        metrics.FEED_POSITION.set(await _blocking(current_position, state.engine))
    except Exception as exc:  # an unreachable database must not break the scrape either
        log.info("feed position unavailable: %s", _first_line(exc))
    # Content negotiation: OpenMetrics when the scraper asks for it, else the text format.
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(REGISTRY), headers={"Content-Type": content_type})
