"""The ops web page at ``/ui/``: server-rendered (Jinja2), readable without JavaScript.

It shows exactly what the API returns — the dicts of ``ledger.views`` — laid out for people:
the eligibility badge with every reason in Chinese and English and its remediation, the slots as
bars, the service numbers, the filings and the ledger timeline.

Access needs a token with the ``read`` scope and no other, entered once at ``/ui/login``; the
browser then holds a random server-side session id (``worker.api.sessions``, never the token) in
an ``HttpOnly``, ``SameSite=Strict`` cookie scoped to ``/ui`` (``Secure`` when served over
HTTPS). Signing out revokes the session on the server. The sign-in and sign-out forms refuse
cross-site posts and sign-in attempts are rate-limited per client address (docs/security.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import jinja2
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlmodel import Session

from ledger.clock import utcnow
from ledger.queries import (
    instance_history,
    iter_instances,
    load_state,
    parked_events,
    service_number_info,
    show_instance,
)
from ledger.reasons import REASONS, explain
from worker.api.auth import bearer_token
from worker.api.deps import (
    INSTANCE_ID_RE,
    SERVICE_NUMBER_RE,
    ApiState,
    api_state,
    db_session,
    parse_time_param,
)
from worker.api.errors import ApiError, quoted

PACKAGE_DIR = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = PACKAGE_DIR / "templates"
STATIC_DIR = PACKAGE_DIR / "static"

COOKIE_NAME = "quota_ledger_session"
COOKIE_PATH = "/ui"
# The sign-in and sign-out forms send a token and a path: anything longer is refused before it
# is read (BodyLimitMiddleware's per-path limit).
MAX_LOGIN_BODY = 8 * 1024
SMALL_FORM_PATHS = (COOKIE_PATH + "/login", COOKIE_PATH + "/logout")
_DEFAULT_PORTS = {"http": 80, "https": 443}

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not "no-referrer": under it browsers send "Origin: null" with the page's own form posts,
    # which the same-origin check could not tell from a sandboxed attacker.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

ELIGIBILITY_LABELS = {
    "eligible": ("Eligible", "符合备案条件"),
    "ineligible": ("Ineligible", "不符合备案条件"),
    "unknown": ("Unknown", "未知实例"),
    "not_needed": ("Not needed", "无需备案服务号"),
    "not_required": ("Not required", "无需备案"),
}
STATUS_LABELS = {
    "active": ("Active", "运行中"),
    "expired": ("Expired", "已到期"),
    "released": ("Released", "已释放"),
    "unknown": ("Unknown", "未知"),
}
BILLING_LABELS = {
    "subscription": "Subscription · 包年包月",
    "pay_as_you_go": "Pay-as-you-go · 按量付费",
}

router = APIRouter(prefix="/ui", include_in_schema=False)

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
templates = Jinja2Templates(env=_env)


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC_DIR)


# --- template helpers ----------------------------------------------------------------------------


def _fmt_time(value: str | None) -> str:
    if not value:
        return "—"
    return value.replace("T", " ").removesuffix("Z") + " UTC"


def _short(value: str | None, length: int = 12) -> str:
    return (value or "")[:length]


_env.filters["time"] = _fmt_time
_env.filters["short"] = _short


def _bar(segments: list[tuple[str, int]], cap: int) -> list[dict[str, Any]]:
    """SVG rectangles (x and width in percent) for a stacked slot bar; no inline styles, so the
    page works under a strict Content-Security-Policy."""
    total = max(cap, sum(value for _, value in segments), 1)
    x = 0.0
    out = []
    for name, value in segments:
        width = 100.0 * value / total
        if value > 0:
            out.append({"cls": name, "x": round(x, 3), "width": round(width, 3), "value": value})
        x += width
    return out


# --- auth ----------------------------------------------------------------------------------------


class LoginRequired(Exception):
    def __init__(self, next_path: str) -> None:
        super().__init__("login required")
        self.next_path = next_path


def ui_path(request: Request, path: str = "/") -> str:
    return f"{request.scope.get('root_path', '')}{COOKIE_PATH}{path}"


def is_ui_request(request: Request) -> bool:
    path = request.url.path
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return (path == COOKIE_PATH or path.startswith(COOKIE_PATH + "/")) and not path.startswith(
        COOKIE_PATH + "/static/"
    )


def _signed_in(request: Request) -> bool:
    """A bearer token with the read scope (tools), or a live session cookie (people)."""
    state = api_state(request)
    token = bearer_token(request.headers.get("authorization"))
    if token is not None:
        scopes = state.auth.scopes(token)
        if scopes is not None and "read" not in scopes:
            raise ApiError(403, "forbidden", "this token lacks the 'read' scope")
        return scopes is not None
    return state.sessions.valid(request.cookies.get(COOKIE_NAME))


def require_read(request: Request) -> None:
    if not _signed_in(request):
        target = request.url.path
        if request.url.query:
            target += "?" + request.url.query
        raise LoginRequired(target)


def _origin_key(scheme: str, netloc: str) -> tuple[str, str, int | None]:
    parts = urlsplit(f"{scheme}://{netloc}")
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:
        port = -1
    return scheme.lower(), (parts.hostname or "").lower(), port


def require_same_origin(request: Request) -> None:
    """Refuse a form post made from another site (forced sign-in or sign-out).

    The same rule as Go's ``net/http.CrossOriginProtection``: browsers that send
    ``Sec-Fetch-Site`` (which no page can forge) are judged by it alone; older ones by
    ``Origin``, which must be this server (scheme and ``Host``). A client that sends neither
    (curl, a script) is not a browser being abused and may post.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        if site.lower() in ("same-origin", "none"):
            return
        raise ApiError(403, "cross_origin", "This form only accepts posts from this page.")
    origin = request.headers.get("origin")
    if origin is None:
        return
    scheme, _, netloc = origin.partition("://")
    own = _origin_key(request.url.scheme, request.headers.get("host", ""))
    if origin == "null" or _origin_key(scheme, netloc) != own:
        raise ApiError(403, "cross_origin", "This form only accepts posts from this page.")


def _safe_next(request: Request, value: str | None) -> str:
    """Only a path of this page may be a post-login target (no open redirect)."""
    home = ui_path(request, "/")
    if not value or not value.startswith(ui_path(request, "/")):
        return home
    if "\\" in value or "//" in value or any(ord(c) < 0x21 for c in value):
        return home
    return value


async def login_required_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginRequired)
    target = ui_path(request, "/login") + "?" + urlencode({"next": exc.next_path})
    return RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})


# --- rendering -----------------------------------------------------------------------------------


def _page(
    request: Request,
    name: str,
    context: dict[str, Any],
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    base = {
        "ui": ui_path(request, ""),
        "authenticated": context.pop("authenticated", True),
        "static": lambda path: ui_path(request, "/static/" + path),
    }
    response = templates.TemplateResponse(
        request, name, {**base, **context}, status_code=status_code
    )
    response.headers.update(SECURITY_HEADERS)
    if headers:
        response.headers.update(
            {k: v for k, v in headers.items() if k.lower() != "www-authenticate"}
        )
    return response


def error_page(
    request: Request, status_code: int, message: str, headers: dict[str, str] | None = None
) -> Response:
    titles = {
        400: "Bad request",
        403: "Forbidden",
        404: "Not found",
        405: "Method not allowed",
        413: "Request too large",
        422: "Invalid request",
        503: "Service unavailable",
    }
    try:
        authenticated = status_code != 403 and _signed_in(request)
    except ApiError:  # a bearer token without the read scope
        authenticated = False
    return _page(
        request,
        "error.html",
        {
            "status_code": status_code,
            "title": titles.get(status_code, "Error"),
            "message": message,
            "authenticated": authenticated,
        },
        status_code,
        headers,
    )


# --- routes --------------------------------------------------------------------------------------


@router.get("/login")
def login_form(request: Request, next: str | None = Query(None)) -> Response:
    return _page(
        request,
        "login.html",
        {"next": _safe_next(request, next), "error": None, "authenticated": False},
    )


@router.get("")
def ui_root(request: Request) -> Response:
    # Relative on purpose: a Location built from the Host header could point anywhere.
    return RedirectResponse(ui_path(request, "/"), status_code=307)


@router.post("/login", dependencies=[Depends(require_same_origin)])
async def login(request: Request) -> Response:
    state = api_state(request)
    client = request.client.host if request.client else "unknown"
    retry_after = state.login_limiter.hit(client)
    if retry_after is not None:
        return _page(
            request,
            "login.html",
            {
                "next": ui_path(request, "/"),
                "error": "Too many sign-in attempts from this address; try again in a minute.",
                "authenticated": False,
            },
            status_code=429,
            headers={"Retry-After": str(max(int(retry_after + 0.999), 1))},
        )
    body = await request.body()  # at most MAX_LOGIN_BODY: BodyLimitMiddleware
    try:
        fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
    except ValueError:  # more fields than any login form sends
        fields = {}
    token = (fields.get("token") or [""])[0].strip()
    next_path = _safe_next(request, (fields.get("next") or [None])[0])
    scopes = state.auth.scopes(token)
    # Read-only tokens only: a token that can also ingest (or scrape metrics) is not to be
    # typed into a browser, whose session would then stand for more than reading this page.
    if scopes != frozenset({"read"}):
        if scopes is None:
            error = "Unknown token. Use a token with the read scope from QUOTA_LEDGER_API_TOKENS."
        elif "read" in scopes:
            error = "This token has more than the read scope; sign in with a read-only token."
        else:
            error = "This token does not have the read scope."
        return _page(
            request,
            "login.html",
            {"next": next_path, "error": error, "authenticated": False},
            status_code=403 if scopes is not None else 401,
        )
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(
        COOKIE_NAME,
        state.sessions.create(),
        max_age=int(state.sessions.lifetime_s),
        path=ui_path(request, ""),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout", dependencies=[Depends(require_same_origin)])
def logout(request: Request) -> Response:
    api_state(request).sessions.revoke(request.cookies.get(COOKIE_NAME))
    response = RedirectResponse(ui_path(request, "/login"), status_code=303)
    response.delete_cookie(COOKIE_NAME, path=ui_path(request, ""), httponly=True, samesite="strict")
    return response


#: Instances due for renewal listed on the ops page (the CLI's ``instances --renewal-due``).
RENEWAL_DUE_SHOWN = 50


@router.get("/", dependencies=[Depends(require_read)])
def index(request: Request, session: Session = Depends(db_session)) -> Response:
    due = list(
        iter_instances(
            session,
            policy=api_state(request).policy,
            at=utcnow(),
            renewal_due=True,
            limit=RENEWAL_DUE_SHOWN,
        )
    )
    return _page(request, "index.html", {"message": None, "renewal_due": due})


@router.get("/lookup", dependencies=[Depends(require_read)])
def lookup(
    request: Request,
    q: str = Query("", max_length=300),
    kind: str = Query("auto"),
    session: Session = Depends(db_session),
) -> Response:
    value = q.strip()
    if not value:
        return RedirectResponse(ui_path(request, "/"), status_code=303)
    # An explicit kind goes to its page (which says "not found" itself); "auto" (the search
    # box) tries an instance first, then a service number.
    if (
        kind in ("auto", "instance")
        and INSTANCE_ID_RE.fullmatch(value)
        and (kind == "instance" or load_state(session, instance_id=value) is not None)
    ):
        return RedirectResponse(
            ui_path(request, f"/instances/{quote(value, safe='')}"), status_code=303
        )
    if (
        kind in ("auto", "service_number")
        and SERVICE_NUMBER_RE.fullmatch(value)
        and (kind == "service_number" or service_number_info(session, number=value) is not None)
    ):
        return RedirectResponse(
            ui_path(request, f"/service-numbers/{quote(value, safe='')}"), status_code=303
        )
    return _page(
        request,
        "index.html",
        {"message": f"Nothing in the ledger matches {quoted(value)}."},
        status_code=404,
    )


# ``:path``: an id with an encoded slash (``0%2F``) is looked up (and not found) instead of being
# redirected as a trailing slash; no page lives below these two.
@router.get("/instances/{instance_id:path}", dependencies=[Depends(require_read)])
def instance_page(
    request: Request,
    instance_id: str,
    at: str | None = Query(None),
    state: ApiState = Depends(api_state),
    session: Session = Depends(db_session),
) -> Response:
    when = parse_time_param(at, "at")
    view = None
    if INSTANCE_ID_RE.fullmatch(instance_id):
        view = show_instance(
            session, instance_id=instance_id, at=when or utcnow(), policy=state.policy
        )
    if view is None:
        raise ApiError(
            404, "not_found", f"The ledger has no entry for instance {quoted(instance_id)}."
        )
    entries = instance_history(session, instance_id=instance_id)
    parked = parked_events(session, instance_id=instance_id, limit=100) if view["parked"] else []
    product = state.policy.products.get(view["product_type"] or "")
    reason_texts = {
        code: explain(code, product)
        for entry in entries
        for code in entry["reasons"]
        if _known_reason(code)
    }
    websites, subjects = view["websites"], view["subjects"]
    return _page(
        request,
        "instance.html",
        {
            "view": view,
            "entries": list(reversed(entries)),
            "parked": parked,
            "at": at if when is not None else None,
            "product": product,
            "eligibility_label": ELIGIBILITY_LABELS.get(
                view["eligibility"]["status"], (view["eligibility"]["status"], "")
            ),
            "status_label": STATUS_LABELS.get(view["status"], (view["status"], "")),
            "billing_label": BILLING_LABELS.get(view["billing_method"] or "", "—"),
            "reason_texts": reason_texts,
            "website_bar": _bar(
                [
                    ("used", websites["used"]),
                    ("reserved", websites["reserved"]),
                    ("remaining", websites["remaining"]),
                ],
                websites["cap"],
            ),
            "subject_bar": _bar(
                [("used", subjects["used"]), ("remaining", subjects["remaining"])],
                subjects["cap"],
            ),
        },
    )


def _known_reason(code: str) -> bool:
    return code in REASONS


@router.get("/service-numbers/{number:path}", dependencies=[Depends(require_read)])
def service_number_page(
    request: Request, number: str, session: Session = Depends(db_session)
) -> Response:
    info = None
    if SERVICE_NUMBER_RE.fullmatch(number):
        info = service_number_info(session, number=number)
    if info is None:
        raise ApiError(404, "not_found", f"No service number {quoted(number)} was ever issued.")
    return _page(request, "service_number.html", {"info": info})
