"""The admin API and the ops page: find, inspect and settle payouts that need a human.

:func:`admin_router` is a router of its own, included beside the app-facing routes (never
through them), and empty unless ``RP_ADMIN_TOKEN`` is set. Its paths, under ``prefix``
(``/admin``):

================================================  ==============================================
route                                             what it does
================================================  ==============================================
``GET /payouts``                                  list (filters as ``payouts list``), keyset pages
``GET /payouts/{id}``                             record, timeline, outbox entry
``POST /payouts/{id}/resolve``                    ``{status, note, operator}``: settle by hand
``POST /payouts/{id}/redeliver``                  ``{operator}``: push the outcome again
``GET /stats``                                    counts by status, the alert figures
``GET /ops``, ``GET /ops/payouts/{id}``           the ops page (HTML, works without JavaScript)
================================================  ==============================================

The JSON routes take ``Authorization: Bearer <RP_ADMIN_TOKEN>`` (compared in constant time); a
token in the query string is refused (400), since query strings end up in access logs. The ops
page signs in once with the token and then carries a session cookie (HttpOnly, SameSite=Strict,
an HMAC keyed by the token: rotating the token ends every session) and a CSRF token in each
form; docs/operations.md explains the scheme. Errors of the JSON routes are problem+json; every
write is audited (resolve: an audit entry naming the operator; redeliver: a log line).
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at runtime.
import base64
import binascii
import hashlib
import hmac
import html
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from string import Template
from typing import Annotated, Any, Final, Literal
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._client import PayoutClient
from .._errors import InvalidRequest, PayoutAlreadyFinal, PayoutError, UnknownPayout
from .._model import OutboxEntry, Payout, PayoutStatus
from .._ops import (
    OUTBOX_FAILING_AFTER,
    ago,
    format_duration,
    outbox_state,
    outbox_view,
    parse_duration,
    payout_view,
    snapshot_view,
    stuck,
    timeline,
)
from ..settings import ServiceSettings
from ..storage import PayoutQuery
from ._route import ProblemRoute
from .deps import read_capped
from .problems import ProblemRaised
from .schemas import Problem

__all__ = [
    "AdminAudit",
    "AdminOutbox",
    "AdminPage",
    "AdminPayout",
    "AdminPayoutDetail",
    "AdminRedeliver",
    "AdminRedelivered",
    "AdminResolve",
    "AdminStats",
    "admin_router",
]

log = logging.getLogger("resilient_payout.admin")

GetClient = Callable[[], PayoutClient]

_BODY_LIMIT: Final = 16 * 1024
_SESSION_COOKIE: Final = "rp_ops_session"
_SESSION_SECONDS: Final = 8 * 3600
_QUERY_CREDENTIALS: Final = frozenset(
    {"token", "access_token", "admin_token", "api_key", "apikey", "key", "auth", "bearer"}
)
_FINAL: Final = tuple(s.value for s in PayoutStatus if s.is_final)
_SECURITY_HEADERS: Final = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # No script at all; the one stylesheet is inline.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
}
_UNAUTHORIZED: Final[dict[int | str, dict[str, Any]]] = {
    401: {"model": Problem, "description": "Missing or wrong admin token"},
    400: {"model": Problem, "description": "A credential in the query string"},
}

FinalStatus = Literal["completed", "declined", "failed"]


# -- the JSON bodies ---------------------------------------------------------------------------


class AdminAudit(BaseModel):
    """One line of a payout's audit trail, with its time relative to now."""

    model_config = ConfigDict(populate_by_name=True)

    at: float
    cause: str
    event: str
    from_status: str = Field(alias="from")
    to_status: str = Field(alias="to")
    detail: str | None = None
    conflict: bool = False
    ago: str | None = None
    after_creation: str | None = None


class AdminPayout(BaseModel):
    """A payout as operators see it (everything stored)."""

    id: str
    status: PayoutStatus
    created_at: float
    updated_at: float
    version: int
    attempt: int
    posts: int
    checks: int
    partner_ref: str | None = None
    partner_status: str | None = None
    reason: str | None = None
    resolved_by: str | None = None
    next_check_at: float | None = None
    conflict: bool = Field(description="the audit trail records a conflicting report")
    request: dict[str, Any]
    audit: list[AdminAudit]


class AdminOutbox(BaseModel):
    """The payout's push to the app."""

    state: Literal["queued", "failing", "dead", "delivered"]
    status: PayoutStatus
    created_at: float
    next_attempt_at: float
    attempts: int = Field(description="failed delivery rounds since written or re-queued")
    delivered_at: float | None = None
    last_error: str | None = None
    dead_at: float | None = None


class AdminPage(BaseModel):
    """One page of payouts, oldest first; ``next_cursor`` fetches the next (null: the last)."""

    items: list[AdminPayout]
    next_cursor: str | None


class AdminPayoutDetail(BaseModel):
    """A payout, its timeline and its outbox entry (null: not final yet)."""

    payout: AdminPayout
    timeline: list[AdminAudit]
    outbox: AdminOutbox | None


class AdminResolve(BaseModel):
    """Settle an open payout by hand."""

    model_config = ConfigDict(extra="forbid")

    status: FinalStatus
    note: str = Field(min_length=1, max_length=2000, description="why (recorded)")
    operator: str = Field(min_length=1, max_length=100, description="who (recorded)")


class AdminRedeliver(BaseModel):
    """Push a payout's outcome to the app again."""

    model_config = ConfigDict(extra="forbid")

    operator: str = Field(min_length=1, max_length=100, description="who (logged)")


class AdminRedelivered(BaseModel):
    payout_id: str
    requeued: bool


class AdminStats(BaseModel):
    """Counts by status and the figures alerts are made of (docs/operations.md)."""

    counts: dict[str, int]
    oldest_open_age: float | None
    open_past_window: int
    conflicts: int
    outbox_failing: int
    outbox_dead: int


def _payout(payout: Payout) -> AdminPayout:
    return AdminPayout.model_validate(payout_view(payout))


def _outbox(entry: OutboxEntry | None) -> AdminOutbox | None:
    view = outbox_view(entry)
    return None if view is None else AdminOutbox.model_validate(view)


# -- authentication ----------------------------------------------------------------------------


class _Auth:
    """The admin token, bearer checks, ops sessions and CSRF tokens (all keyed by the token)."""

    def __init__(self, token: str, cookie_path: str) -> None:
        self._token = token.encode()
        self.cookie_path = cookie_path

    def _mac(self, purpose: str, text: str) -> str:
        return hmac.new(self._token, f"{purpose}|{text}".encode(), hashlib.sha256).hexdigest()

    def token_ok(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self._token)

    def refuse_query_credentials(self, request: Request) -> None:
        """400 for a credential in the query string (it would be logged by any proxy)."""
        for name, value in request.query_params.multi_items():
            if name.lower() in _QUERY_CREDENTIALS or (value and self.token_ok(value)):
                raise ProblemRaised(
                    400,
                    "credentials-in-query",
                    "Credentials in the query string",
                    "send the admin token in the Authorization header (Bearer), never in the "
                    "URL: URLs end up in logs",
                )

    def bearer_ok(self, request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.token_ok(given.strip())

    def new_session(self, operator: str, now: float) -> str:
        name = base64.urlsafe_b64encode(operator.encode()).decode().rstrip("=")
        expires = str(int(now + _SESSION_SECONDS))
        return f"{name}.{expires}.{self._mac('session', name + '.' + expires)}"

    def session_operator(self, cookie: str | None, now: float) -> str | None:
        """The operator a valid, unexpired session cookie names, else None."""
        if not cookie or cookie.count(".") != 2:
            return None
        name, expires, mac = cookie.split(".")
        if not hmac.compare_digest(mac, self._mac("session", name + "." + expires)):
            return None
        try:
            if int(expires) < now:
                return None
            return base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()
        except (ValueError, binascii.Error, UnicodeError):
            return None

    def csrf(self, cookie: str) -> str:
        return self._mac("csrf", cookie)

    def csrf_ok(self, cookie: str, given: str) -> bool:
        return hmac.compare_digest(self.csrf(cookie), given)


def _unauthorized() -> StarletteHTTPException:
    return StarletteHTTPException(
        401,
        "missing or wrong admin token (Authorization: Bearer <RP_ADMIN_TOKEN>)",
        headers={"WWW-Authenticate": 'Bearer realm="admin"'},
    )


# -- the router --------------------------------------------------------------------------------


def admin_router(
    get_client: GetClient, settings: ServiceSettings, *, prefix: str = "/admin"
) -> APIRouter:
    """The admin API and ops page under ``prefix``; ``get_client()`` is the running client (or
    raises :class:`~resilient_payout.ClientNotRunning`, a 503). Without ``settings.admin_token``
    the router has no routes at all."""
    router = APIRouter(prefix=prefix, tags=["admin"])
    if settings.admin_token is None:
        return router
    auth = _Auth(settings.admin_token.get_secret_value(), prefix + "/ops")
    late_after = settings.policy().late_arrival_window
    router.include_router(_api_router(get_client, auth, late_after))
    router.include_router(_ops_router(get_client, auth, late_after, prefix))
    return router


def _api_router(get_client: GetClient, auth: _Auth, late_after: float) -> APIRouter:
    async def authorized(request: Request) -> None:
        auth.refuse_query_credentials(request)
        if not auth.bearer_ok(request):
            raise _unauthorized()

    api = APIRouter(route_class=ProblemRoute, dependencies=[Depends(authorized)])

    @api.get(
        "/payouts",
        response_model=AdminPage,
        operation_id="adminListPayouts",
        summary="Payouts by filter, oldest first (keyset pages)",
        responses=_responses(422, 503),
    )
    async def list_payouts(
        status: Annotated[list[PayoutStatus] | None, Query(description="repeatable")] = None,
        older_than: Annotated[
            str | None, Query(description="created more than this long ago: 90, 10m, 2h, 30d")
        ] = None,
        newer_than: Annotated[str | None, Query(description="created less than this ago")] = None,
        unchanged_for: Annotated[str | None, Query(description="last changed before")] = None,
        created_before: Annotated[float | None, Query(description="epoch seconds")] = None,
        created_after: Annotated[float | None, Query()] = None,
        updated_before: Annotated[float | None, Query()] = None,
        updated_after: Annotated[float | None, Query()] = None,
        conflicts: Annotated[bool, Query(description="only payouts with a conflict")] = False,
        undelivered: Annotated[bool, Query(description="only unacknowledged pushes")] = False,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, Query()] = None,
    ) -> AdminPage:
        client = get_client()
        now = client.clock.now()
        query = PayoutQuery(
            statuses=frozenset(status) if status else None,
            created_before=_ago_bound(now, older_than, created_before, "older_than"),
            created_after=_ago_bound(now, newer_than, created_after, "newer_than"),
            updated_before=_ago_bound(now, unchanged_for, updated_before, "unchanged_for"),
            updated_after=updated_after,
            conflicts_only=conflicts,
            undelivered_only=undelivered,
            limit=limit,
            cursor=cursor,
        )
        page = await client.storage.list_payouts(query)
        return AdminPage(items=[_payout(p) for p in page.items], next_cursor=page.next_cursor)

    @api.get(
        "/payouts/{payout_id}",
        response_model=AdminPayoutDetail,
        operation_id="adminGetPayout",
        summary="A payout: record, timeline, outbox entry",
        responses=_responses(404, 503),
    )
    async def get_payout(payout_id: Annotated[str, Path(max_length=200)]) -> AdminPayoutDetail:
        client = get_client()
        payout = await client.get(payout_id)
        entry = await client.storage.get_outbox(payout_id)
        lines = [AdminAudit.model_validate(x) for x in timeline(payout, client.clock.now())]
        return AdminPayoutDetail(payout=_payout(payout), timeline=lines, outbox=_outbox(entry))

    @api.post(
        "/payouts/{payout_id}/resolve",
        response_model=AdminPayout,
        operation_id="adminResolvePayout",
        summary="Settle an open payout by hand (audited with the operator's name)",
        responses=_responses(404, 409, 413, 422, 503),
        openapi_extra=_body_doc(AdminResolve),
    )
    async def resolve(
        request: Request, payout_id: Annotated[str, Path(max_length=200)]
    ) -> AdminPayout:
        body = _parse_json(AdminResolve, await read_capped(request, _BODY_LIMIT))
        client = get_client()
        payout = await client.resolve(
            payout_id, PayoutStatus(body.status), body.note, operator=body.operator
        )
        log.warning("admin: payout %s resolved %s by %s", payout_id, body.status, body.operator)
        return _payout(payout)

    @api.post(
        "/payouts/{payout_id}/redeliver",
        response_model=AdminRedelivered,
        operation_id="adminRedeliverPayout",
        summary="Push a payout's outcome to the app again (a fresh delivery schedule)",
        responses=_responses(404, 409, 413, 422, 503),
        openapi_extra=_body_doc(AdminRedeliver),
    )
    async def redeliver(
        request: Request, payout_id: Annotated[str, Path(max_length=200)]
    ) -> AdminRedelivered:
        body = _parse_json(AdminRedeliver, await read_capped(request, _BODY_LIMIT))
        await _redeliver(get_client(), payout_id, body.operator.strip(), "admin API")
        return AdminRedelivered(payout_id=payout_id, requeued=True)

    @api.get(
        "/stats",
        response_model=AdminStats,
        operation_id="adminStats",
        summary="Counts by status and the alert figures",
        responses=_responses(503),
    )
    async def stats() -> AdminStats:
        return AdminStats.model_validate(await _stats(get_client(), late_after))

    return api


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        404: "Unknown payout",
        409: "Final already (resolve), or nothing to push (redeliver)",
        413: "Body too large",
        422: "Invalid request",
        503: "Storage unavailable or service not running",
    }
    out: dict[int | str, dict[str, Any]] = {**_UNAUTHORIZED}
    for code in codes:
        out[code] = {"model": Problem, "description": descriptions[code]}
    return out


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """The request body in OpenAPI (read by hand, after authentication, capped), inline: a
    body FastAPI does not parse registers no component."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _parse_json(model: type[Any], raw: bytes) -> Any:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        for e in errors:
            e.pop("input", None)  # never echoed
            e.pop("ctx", None)
        raise RequestValidationError(errors) from None


def _ago_bound(now: float, duration: str | None, absolute: float | None, name: str) -> float | None:
    if duration is None:
        return absolute
    if absolute is not None:
        raise InvalidRequest(f"{name} and its absolute form exclude each other")
    try:
        return now - parse_duration(duration)
    except ValueError as exc:
        raise InvalidRequest(f"{name}: {exc}") from None


async def _redeliver(client: PayoutClient, payout_id: str, operator: str, via: str) -> None:
    """Re-queue the payout's push (delivered or not) and wake the outbox loop."""
    if not operator:
        raise InvalidRequest("operator must name who re-queues the push")
    await client.get(payout_id)  # UnknownPayout (404) before anything else
    if not await client.storage.requeue_outbox(payout_id, next_attempt_at=client.clock.now()):
        raise ProblemRaised(
            409, "nothing-to-push", "Nothing to push", f"payout {payout_id!r} is not final yet"
        )
    # The record of who did it: the payout's own audit trail changes only through decide.
    log.warning("admin: payout %s push re-queued by %s (%s)", payout_id, operator, via)
    if client.outbox is not None:
        client.outbox.wake()


async def _stats(client: PayoutClient, late_after: float) -> dict[str, Any]:
    counts = await client.storage.count_by_status()
    snap = await client.storage.ops_snapshot(
        client.clock.now(), late_after=late_after, failing_after=OUTBOX_FAILING_AFTER
    )
    return snapshot_view(snap, counts)


# -- the ops page ------------------------------------------------------------------------------

_PAGE: Final = Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title · resilient-payout ops</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f4f6f9; }
header { background: #1d2330; color: #fff; padding: .6rem 1.2rem; display: flex; gap: 1rem;
         align-items: center; }
header a { color: #fff; text-decoration: none; font-weight: 600; }
header .who { margin-left: auto; opacity: .8; }
header form { margin: 0; }
main { padding: 1rem 1.2rem; max-width: 1200px; }
h1 { font-size: 1.3rem; margin: .2rem 0 1rem; } h2 { font-size: 1.05rem; margin: 1.4rem 0 .5rem; }
table { border-collapse: collapse; background: #fff; width: 100%; margin-bottom: .5rem; }
th, td { text-align: left; padding: .35rem .6rem; border-bottom: 1px solid #e3e7ee;
         vertical-align: top; }
th { background: #eef1f6; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.cards { display: flex; flex-wrap: wrap; gap: .6rem; margin-bottom: .6rem; }
.card { background: #fff; border: 1px solid #e3e7ee; border-radius: 6px; padding: .5rem .8rem;
        min-width: 7.5rem; }
.card b { display: block; font-size: 1.3rem; }
.card.alert { border-color: #d9534f; background: #fdf0ef; }
.badge { display: inline-block; padding: 0 .45rem; border-radius: 9px; font-size: .8rem;
         background: #e3e7ee; }
.badge.unknown, .badge.failing, .badge.dead, .badge.conflict { background: #f8d7d5;
         color: #8a1f1a; }
.badge.completed, .badge.delivered { background: #d7f0dc; color: #1c5e2a; }
.badge.declined, .badge.failed { background: #fde9c8; color: #7a4b00; }
.empty { color: #6b7380; font-style: italic; }
.msg { padding: .6rem .8rem; border-radius: 6px; margin-bottom: 1rem; }
.msg.ok { background: #d7f0dc; } .msg.error { background: #f8d7d5; }
form.box { background: #fff; border: 1px solid #e3e7ee; border-radius: 6px; padding: .8rem;
           max-width: 36rem; }
label { display: block; margin: .4rem 0 .2rem; font-weight: 600; }
input[type=text], input[type=password], select, textarea { width: 100%; box-sizing: border-box;
           padding: .35rem; font: inherit; }
button { margin-top: .6rem; padding: .4rem 1rem; font: inherit; cursor: pointer; }
code { font-size: .85rem; }
</style></head>
<body><header><a href="$home">resilient-payout ops</a>$who</header>
<main>$body</main></body></html>
""")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _badge(text: str) -> str:
    return f'<span class="badge {_e(text)}">{_e(text)}</span>'


def _table(headers: list[str], rows: list[list[str]], empty: str) -> str:
    """Rows of already escaped HTML cells."""
    if not rows:
        return f'<p class="empty">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class _Pages:
    """The ops page's HTML, every value escaped."""

    def __init__(self, prefix: str) -> None:
        self.ops = prefix + "/ops"

    def link(self, payout_id: str) -> str:
        return (
            f'<a href="{_e(self.ops)}/payouts/{_e(quote(payout_id, safe=""))}">{_e(payout_id)}</a>'
        )

    def page(
        self,
        title: str,
        body: str,
        *,
        operator: str | None = None,
        csrf: str = "",
        status: int = 200,
    ) -> HTMLResponse:
        who = ""
        if operator is not None:
            who = (
                f'<span class="who">signed in as {_e(operator)}</span>'
                f'<form method="post" action="{_e(self.ops)}/logout">'
                f'<input type="hidden" name="csrf" value="{_e(csrf)}">'
                '<button type="submit">Sign out</button></form>'
            )
        text = _PAGE.substitute(title=_e(title), home=_e(self.ops), who=who, body=body)
        return HTMLResponse(text, status_code=status, headers=_SECURITY_HEADERS)

    def login(self, message: str = "", status: int = 200) -> HTMLResponse:
        error = f'<p class="msg error">{_e(message)}</p>' if message else ""
        body = (
            f"<h1>Sign in</h1>{error}"
            f'<form class="box" method="post" action="{_e(self.ops)}/login">'
            '<label for="operator">Your name (recorded with what you do)</label>'
            '<input type="text" id="operator" name="operator" required maxlength="100"'
            ' autocomplete="username">'
            '<label for="token">Admin token (RP_ADMIN_TOKEN)</label>'
            '<input type="password" id="token" name="token" required'
            ' autocomplete="current-password">'
            '<button type="submit">Sign in</button></form>'
        )
        return self.page("Sign in", body, status=status)

    def dashboard(
        self, stats: Mapping[str, Any], lists: Any, now: float, operator: str, csrf: str
    ) -> HTMLResponse:
        counts = "".join(
            f'<div class="card"><span>{_badge(status)}</span><b>{_e(n)}</b></div>'
            for status, n in stats["counts"].items()
        )
        age = stats["oldest_open_age"]
        figures = [
            ("oldest open payout", "-" if age is None else format_duration(age), False),
            ("open past the late-arrival window", stats["open_past_window"], None),
            ("payouts with a conflict", stats["conflicts"], None),
            (
                f"pushes failing > {format_duration(OUTBOX_FAILING_AFTER)}",
                stats["outbox_failing"],
                None,
            ),
            ("pushes dead-lettered", stats["outbox_dead"], None),
        ]
        cards = "".join(
            f'<div class="card{" alert" if isinstance(v, int) and v else ""}">'
            f"<span>{_e(label)}</span><b>{_e(v)}</b></div>"
            for label, v, _ in figures
        )
        unknown = [
            [self.link(p.id), _e(ago(p.created_at, now)), _e(ago(p.updated_at, now)),
             _e(p.attempt), _e(p.partner_ref or "-")]
            for p in lists.unknown
        ]  # fmt: skip
        conflicts = [
            [self.link(p.id), _badge(p.status.value), _e(_last_conflict(p)),
             _e(ago(p.updated_at, now))]
            for p in lists.conflicts
        ]  # fmt: skip
        failing = [
            [self.link(p.id), _badge(outbox_state(e)), _badge(e.status.value), _e(e.attempts),
             _e(ago(e.created_at, now)), _e(e.last_error or "-")]
            for p, e in lists.failing
        ]  # fmt: skip
        body = (
            "<h1>Payouts that need a human</h1>"
            f'<form method="get" action="{_e(self.ops)}/find">'
            '<label for="find">Open a payout by id</label>'
            '<input type="text" id="find" name="id" required maxlength="200">'
            '<button type="submit">Open</button></form>'
            f'<h2>By status</h2><div class="cards">{counts}</div>'
            f'<h2>Alert figures</h2><div class="cards">{cards}</div>'
            '<h2 id="stuck-unknown">Stuck in unknown (oldest first)</h2>'
            + _table(
                ["payout", "created", "last change", "attempt", "partner ref"],
                unknown,
                "No payout is in unknown.",
            )
            + '<h2 id="conflicts">Conflicting reports</h2>'
            + _table(
                ["payout", "status", "last conflict", "last change"], conflicts, "No conflicts."
            )
            + '<h2 id="failing-pushes">Failing pushes to the app</h2>'
            + _table(
                ["payout", "push", "outcome", "rounds failed", "written", "last error"],
                failing,
                "Every push is acknowledged or on its first round.",
            )
        )
        return self.page("Stuck payouts", body, operator=operator, csrf=csrf)

    def payout(
        self,
        p: Payout,
        entry: OutboxEntry | None,
        now: float,
        operator: str,
        csrf: str,
        *,
        message: str = "",
        error: str = "",
        status: int = 200,
    ) -> HTMLResponse:
        notice = ""
        if message:
            notice = f'<p class="msg ok">{_e(message)}</p>'
        if error:
            notice += f'<p class="msg error">{_e(error)}</p>'
        record = _table(
            ["field", "value"],
            [
                ["status", _badge(p.status.value)],
                ["created", _e(f"{ago(p.created_at, now)} ({_iso(p.created_at)})")],
                ["last change", _e(ago(p.updated_at, now))],
                ["attempt / POSTs / checks", _e(f"{p.attempt} / {p.posts} / {p.checks}")],
                ["partner reference", _e(p.partner_ref or "-")],
                ["partner status", _e(p.partner_status.value if p.partner_status else "-")],
                ["resolved by", _e(p.resolved_by.value if p.resolved_by else "-")],
                ["reason", _e(p.reason or "-")],
                ["request", f"<code>{_e(_compact(p.request))}</code>"],
            ],
            "",
        )
        lines = [
            [
                _e(line["ago"]),
                _e(line["after_creation"]),
                _e(line["cause"]),
                (_badge("conflict") + " " if line["conflict"] else "") + _e(line["event"]),
                _e(f"{line['from']} → {line['to']}"),
                _e(line.get("detail") or ""),
            ]
            for line in timeline(p, now)
        ]
        trail = _table(["when", "since created", "cause", "event", "status", "detail"], lines, "")
        if entry is None:
            push = '<p class="empty">No outcome to push yet (not final).</p>'
        else:
            push = _table(
                ["push", "outcome", "rounds failed", "written", "delivered", "last error"],
                [[
                    _badge(outbox_state(entry)), _badge(entry.status.value), _e(entry.attempts),
                    _e(ago(entry.created_at, now)), _e(ago(entry.delivered_at, now)),
                    _e(entry.last_error or "-"),
                ]],
                "",
            )  # fmt: skip
        action = f"{_e(self.ops)}/payouts/{_e(quote(p.id, safe=''))}"
        forms = ""
        if not p.is_final:
            options = "".join(f'<option value="{s}">{s}</option>' for s in _FINAL)
            forms += (
                f'<h2>Resolve by hand</h2><form class="box" id="resolve" method="post" '
                f'action="{action}/resolve">'
                f'<input type="hidden" name="csrf" value="{_e(csrf)}">'
                f'<label for="status">Final status</label><select id="status" name="status" '
                f'required><option value="">choose…</option>{options}</select>'
                '<label for="note">Note: why (recorded in the audit trail)</label>'
                '<textarea id="note" name="note" rows="3" required maxlength="2000"></textarea>'
                f"<p>Recorded as operator <b>{_e(operator)}</b>; the outcome is pushed to the "
                'app.</p><button type="submit">Resolve</button></form>'
            )
        if entry is not None:
            forms += (
                f'<h2>Push again</h2><form class="box" id="redeliver" method="post" '
                f'action="{action}/redeliver">'
                f'<input type="hidden" name="csrf" value="{_e(csrf)}">'
                "<p>Re-queue the push of this outcome (a fresh delivery schedule).</p>"
                '<button type="submit">Push again</button></form>'
            )
        body = (
            f"<h1>Payout <code>{_e(p.id)}</code></h1>{notice}"
            f'<h2>Record</h2>{record}<h2 id="timeline">Timeline</h2>{trail}'
            f"<h2>Push to the app</h2>{push}{forms}"
        )
        return self.page(f"Payout {p.id}", body, operator=operator, csrf=csrf, status=status)

    def problem(
        self, title: str, message: str, operator: str, csrf: str, status: int
    ) -> HTMLResponse:
        body = f'<h1>{_e(title)}</h1><p class="msg error">{_e(message)}</p>'
        body += f'<p><a href="{_e(self.ops)}">Back to the stuck payouts</a></p>'
        return self.page(title, body, operator=operator, csrf=csrf, status=status)


def _last_conflict(p: Payout) -> str:
    conflicts = [a for a in p.audit if a.conflict]
    return (conflicts[-1].detail or conflicts[-1].event) if conflicts else ""


def _compact(data: Any) -> str:
    import json

    return json.dumps(data, sort_keys=True, separators=(",", ":"))[:500]


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(at))


_DONE: Final = {
    "resolved": "Resolved; the outcome is being pushed to the app.",
    "redelivered": "Push re-queued; the outcome is being pushed to the app.",
}


def _ops_router(get_client: GetClient, auth: _Auth, late_after: float, prefix: str) -> APIRouter:
    pages = _Pages(prefix)
    ops = APIRouter(prefix="/ops", include_in_schema=False, route_class=_html_route(pages))

    def session(request: Request) -> tuple[str, str] | None:
        """(operator, cookie) of a valid session, else None."""
        cookie = request.cookies.get(_SESSION_COOKIE)
        operator = auth.session_operator(cookie, time.time())
        return None if operator is None or cookie is None else (operator, cookie)

    def signed_in(request: Request) -> tuple[str, str]:
        auth.refuse_query_credentials(request)
        found = session(request)
        if found is None:
            raise _SignInRequired
        return found

    async def form(request: Request) -> dict[str, str]:
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/x-www-form-urlencoded":
            raise ProblemRaised(415, "form-expected", "Form expected", "post the page's form")
        raw = await read_capped(request, _BODY_LIMIT)
        try:
            fields = parse_qs(raw.decode(), keep_blank_values=True, max_num_fields=10)
        except (UnicodeDecodeError, ValueError):
            raise ProblemRaised(400, "bad-form", "Bad form", "not a form body") from None
        return {k: v[0] for k, v in fields.items()}

    async def checked_form(request: Request, cookie: str) -> dict[str, str]:
        fields = await form(request)
        if not auth.csrf_ok(cookie, fields.get("csrf", "")):
            raise ProblemRaised(403, "bad-csrf", "Form expired", "reload the page and try again")
        return fields

    def redirect(to: str) -> RedirectResponse:
        return RedirectResponse(to, status_code=303, headers=_SECURITY_HEADERS)

    @ops.get("/login")
    async def login_page() -> Response:
        return pages.login()

    @ops.post("/login")
    async def login(request: Request) -> Response:
        fields = await form(request)
        operator = fields.get("operator", "").strip()
        if not auth.token_ok(fields.get("token", "")):
            log.warning("ops page: a sign-in with a wrong token")  # never the token itself
            return pages.login("Wrong admin token.", status=401)
        if not operator or len(operator) > 100:
            return pages.login("Give your name (up to 100 characters).", status=422)
        response = redirect(pages.ops)
        response.set_cookie(
            _SESSION_COOKIE,
            auth.new_session(operator, time.time()),
            max_age=_SESSION_SECONDS,
            path=auth.cookie_path,
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        log.info("ops page: %s signed in", operator)
        return response

    @ops.post("/logout")
    async def logout(request: Request) -> Response:
        found = session(request)
        if found is not None:
            await checked_form(request, found[1])
        response = redirect(pages.ops + "/login")
        response.delete_cookie(_SESSION_COOKIE, path=auth.cookie_path)
        return response

    @ops.get("")
    async def dashboard(request: Request) -> Response:
        operator, cookie = signed_in(request)
        client = get_client()
        lists = await stuck(client.storage, limit=50)
        stats = await _stats(client, late_after)
        return pages.dashboard(stats, lists, client.clock.now(), operator, auth.csrf(cookie))

    @ops.get("/find")
    async def find(
        request: Request, payout_id: Annotated[str, Query(alias="id", max_length=200)] = ""
    ) -> Response:
        signed_in(request)
        return redirect(f"{pages.ops}/payouts/{quote(payout_id.strip(), safe='')}")

    @ops.get("/payouts/{payout_id}")
    async def payout_page(
        request: Request,
        payout_id: Annotated[str, Path(max_length=200)],
        done: Annotated[str | None, Query()] = None,
    ) -> Response:
        operator, cookie = signed_in(request)
        return await show(payout_id, operator, cookie, message=_DONE.get(done or "", ""))

    async def show(
        payout_id: str, operator: str, cookie: str, *, message: str = "", error: str = "",
        status: int = 200,
    ) -> Response:  # fmt: skip
        client = get_client()
        csrf = auth.csrf(cookie)
        try:
            p = await client.get(payout_id)
        except UnknownPayout as exc:
            return pages.problem("Unknown payout", str(exc), operator, csrf, 404)
        entry = await client.storage.get_outbox(payout_id)
        now = client.clock.now()
        return pages.payout(
            p, entry, now, operator, csrf, message=message, error=error, status=status
        )

    @ops.post("/payouts/{payout_id}/resolve")
    async def resolve(
        request: Request, payout_id: Annotated[str, Path(max_length=200)]
    ) -> Response:
        operator, cookie = signed_in(request)
        fields = await checked_form(request, cookie)
        status = fields.get("status", "")
        if status not in _FINAL:
            error = f"choose a final status ({', '.join(_FINAL)})"
            return await show(payout_id, operator, cookie, error=error, status=422)
        try:
            await get_client().resolve(
                payout_id, PayoutStatus(status), fields.get("note", ""), operator=operator
            )
        except UnknownPayout:
            return await show(payout_id, operator, cookie)  # its 404 page
        except (InvalidRequest, PayoutAlreadyFinal) as exc:
            code = 409 if isinstance(exc, PayoutAlreadyFinal) else 422
            return await show(payout_id, operator, cookie, error=str(exc), status=code)
        log.warning("ops page: payout %s resolved %s by %s", payout_id, status, operator)
        return redirect(f"{pages.ops}/payouts/{quote(payout_id, safe='')}?done=resolved")

    @ops.post("/payouts/{payout_id}/redeliver")
    async def redeliver(
        request: Request, payout_id: Annotated[str, Path(max_length=200)]
    ) -> Response:
        operator, cookie = signed_in(request)
        await checked_form(request, cookie)
        try:
            await _redeliver(get_client(), payout_id, operator, "ops page")
        except UnknownPayout:
            return await show(payout_id, operator, cookie)
        except ProblemRaised as exc:
            return await show(payout_id, operator, cookie, error=exc.detail, status=exc.status)
        return redirect(f"{pages.ops}/payouts/{quote(payout_id, safe='')}?done=redelivered")

    return ops


class _SignInRequired(Exception):
    """No valid session: the ops page answers with the sign-in page."""


def _html_route(pages: _Pages) -> type[APIRoute]:
    """The ops routes' class: errors answered as HTML. A missing session is a redirect to the
    sign-in page (401 with it for a POST), a route problem or a library error our error page."""

    class HtmlRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def handle(request: Request) -> Response:
                try:
                    return await handler(request)
                except _SignInRequired:
                    if request.method == "GET":
                        login = pages.ops + "/login"
                        return RedirectResponse(login, status_code=303, headers=_SECURITY_HEADERS)
                    return pages.login("Sign in first (your session ended).", status=401)
                except ProblemRaised as exc:
                    body = f'<h1>{_e(exc.title)}</h1><p class="msg error">{_e(exc.detail)}</p>'
                    return pages.page(exc.title, body, status=exc.status)
                except PayoutError as exc:  # the client not running, storage unavailable
                    body = f'<h1>Unavailable</h1><p class="msg error">{_e(exc)}</p>'
                    return pages.page("Unavailable", body, status=503)

            return handle

    return HtmlRoute
