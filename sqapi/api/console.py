"""The dashboard you act from: its pages, the JSON they poll, sign-in, and the redrive button.

Pages (HTML; ``sqapi/api/templates``, plain JS in ``sqapi/api/static/dashboard.js``)::

    GET  /                          overview: counts, queues, failure rate per plugin, the message list
                                    (?status=&plugin=&since=&until=&q=&limit=&before=&before_uuid=)
    GET  /dashboard/messages/<uuid> one message: status, plugin results, timeline, data/meta links, redrive
                                    (it polls GET /messages/<uuid>)
    GET  /dashboard/state           the overview as JSON (same query string): what the page polls
    POST /dashboard/redrive         redrive a message (uuid) or a filtered selection: first a dry run to
                                    confirm, then (confirm=yes) the redrive itself
    GET  /login, POST /login        sign in with the API token (kept in a signed session cookie)
    POST /logout                    sign out

Every POST carries the session's CSRF token (``sqapi.api.session``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, current_app, g, redirect, render_template, request, url_for

from sqapi.api import dashboard, responding, session
from sqapi.api.queues import QueueWatch
from sqapi.core.status import MESSAGE_STATUSES
from sqapi.errors import ConnectorError, SqapiError

log = logging.getLogger(__name__)

console = Blueprint("console", __name__)

REFRESH_SECONDS = 5              # how often the pages poll
FAILURE_RATE_SECONDS = 30.0      # how long the failure rates read are shown before they are read again
REDRIVE_SHOWN = 50               # uuids listed on the confirmation page
MAX_SEARCH_SELECTION = 10_000    # messages a search (q) may select for a redrive
CSP = ("default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def _app() -> Any:
    return current_app


def _page(template: str, status: int = 200, **context: Any) -> Response:
    app = _app()
    context.setdefault("csrf_token", session.current(app.sessions)["csrf"])
    html = render_template(template, signed_in=_signed_in(), token_required=app.sessions.token_required,
                           refresh=REFRESH_SECONDS, statuses=MESSAGE_STATUSES, **context)
    answer = Response(html, status=status, mimetype="text/html")
    answer.headers["Content-Security-Policy"] = CSP
    answer.headers["Cache-Control"] = "no-store"
    answer.headers["X-Frame-Options"] = "DENY"
    answer.headers["Referrer-Policy"] = "same-origin"
    return answer


def _signed_in() -> bool:
    return bool(g.get("session") and g.session.get("auth"))


def _when(moment: Any) -> str:
    """A database time as ``YYYY-MM-DD HH:MM:SS`` (UTC)."""
    if isinstance(moment, datetime):
        return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return str(moment or "")[:19].replace("T", " ")


@console.app_template_filter("when")
def _when_filter(moment: Any) -> str:
    return _when(moment)


# -- overview ---------------------------------------------------------------------------------------
def overview(wanted: dashboard.MessageFilter) -> dict[str, Any]:
    """Everything the overview shows (JSON-ready): what the page renders and what it polls."""
    app = _app()
    database = app.sqapi.database
    state: dict[str, Any] = {"now": datetime.now(UTC).isoformat(timespec="seconds"), "errors": []}
    try:
        counts = dashboard.counts_by_status(database)
        rows, cursor = dashboard.find_messages(database, wanted)
        starts, rates, source = _failure_rates(app)
    except ConnectorError as exc:
        state["errors"].append(f"status database unavailable: {exc}")
        counts, rows, cursor, starts, rates = {}, [], None, [], []
        source = None  # not known: the database is down (not "no history")
    state.update(counts=counts, total=sum(counts.values()))
    state["messages"] = [{**row, "created_at": _when(row["created_at"]), "updated_at": _when(row["updated_at"]),
                          "page": url_for("console.message_page", uuid=row["uuid"])} for row in rows]
    state["next"] = f"{url_for('console.index')}?{urlencode({**wanted.selection(), **cursor, 'limit': wanted.limit})}" \
        if cursor else None
    state["failure_rate"] = {"hours": [start.strftime("%H:00") for start in starts], "source": source,
                             "plugins": [{**asdict(rate), "rates": rate.rates} for rate in rates]}
    watch = app.extensions.setdefault("sqapi.queue_watch", QueueWatch())
    depths, broker_error = watch.read(dict(app.sqapi.config.get("msg_broker") or {}))
    if broker_error:
        state["errors"].append(f"message broker: {broker_error}")
    state["queues"] = [asdict(depth) for depth in depths]
    return state


def _failure_rates(app: Any) -> tuple[list[datetime], list[dashboard.FailureRate], str]:
    """:func:`dashboard.failure_rates`, read again at most every :data:`FAILURE_RATE_SECONDS`: it scans a day of
    events, and hourly figures need no refresh at every poll of every open page."""
    cached = app.extensions.get("sqapi.failure_rates")
    if cached is not None and time.monotonic() - cached[0] < FAILURE_RATE_SECONDS:
        return cached[1]
    value = dashboard.failure_rates(app.sqapi.database)
    app.extensions["sqapi.failure_rates"] = (time.monotonic(), value)
    return value


def _filter_or_400() -> dashboard.MessageFilter | Response:
    try:
        return dashboard.MessageFilter.from_args(request.args)
    except ValueError as exc:
        return responding.invalid_request(str(exc))


@console.route("/", methods=["GET"])
def index() -> Response:
    wanted = _filter_or_400()
    if isinstance(wanted, Response):
        return wanted
    app = _app()
    state = overview(wanted)
    buckets: list[dashboard.MinuteBucket] = []
    latency: list[dashboard.PluginLatency] = []
    try:
        buckets = dashboard.throughput(app.sqapi.database)
        latency = dashboard.plugin_latency(app.sqapi.database, [p.name for p in app.sqapi.plugins.active])
    except ConnectorError:
        pass  # already said in state["errors"]
    from sqapi.api.app import plugin_list  # the same list GET /plugins answers

    known_plugins = sorted({p.name for p in app.sqapi.plugins.active} |
                           {rate["plugin"] for rate in state["failure_rate"]["plugins"]})
    return _page("dashboard.html", state=state, wanted=wanted, selection=wanted.selection(),
                 buckets=buckets, peak=max([b.total for b in buckets] + [1]), latency=latency,
                 plugins=plugin_list(), known_plugins=known_plugins, health=app.health.check(),
                 first_page=f"{url_for('console.index')}?{urlencode(wanted.selection())}" if wanted.before else None)


@console.route("/dashboard/state", methods=["GET"])
def state() -> Response:
    wanted = _filter_or_400()
    if isinstance(wanted, Response):
        return wanted
    answer = responding.ok(overview(wanted))
    answer.headers["Cache-Control"] = "no-store"
    return answer


# -- one message ------------------------------------------------------------------------------------
def message_document(uuid: str) -> dict[str, Any] | None:
    """Exactly what ``GET /messages/<uuid>`` answers: the row (``trace_id`` too, when it has one), its plugin rows
    and ``history``, every event of ``message_events``, oldest first."""
    answer = _app().view_functions["core.message"](uuid=uuid)
    return answer.get_json() if answer.status_code == 200 else None


@console.route("/dashboard/messages/<uuid>", methods=["GET"])
def message_page(uuid: str) -> Response:
    document = message_document(uuid)
    if document is None:
        return _page("message.html", status=404, uuid=uuid, message=None)
    return _page("message.html", uuid=uuid, message=document, redriven=request.args.get("redriven"),
                 data_url=url_for("core.message_data", uuid=uuid),
                 metadata_url=url_for("core.message_metadata", uuid=uuid),
                 json_url=url_for("core.message", uuid=uuid))


# -- redrive ----------------------------------------------------------------------------------------
def _selection_from(form: Any) -> tuple[Any, dict[str, str]]:
    """The redrive ``Selection`` a form describes, and the form's fields to carry to the confirmation."""
    from sqapi.redrive import Selection, SelectionError
    from sqapi.times import parse_moment

    fields = {name: (form.get(name) or "").strip() for name in
              ("uuid", "status", "plugin", "since", "until", "q", "reason")}
    fields = {name: value for name, value in fields.items() if value}
    if not fields:
        raise SelectionError("nothing selected: give a uuid or at least one filter")
    if any("\x00" in value for value in fields.values()):
        raise SelectionError("a field holds a NUL character")
    try:
        wanted = dashboard.MessageFilter.from_args(fields)
    except ValueError as exc:
        raise SelectionError(str(exc)) from None
    uuids: tuple[str, ...] = ()
    if "uuid" in fields:
        uuids = (fields["uuid"],)
    elif wanted.q:  # a search is not a redrive criterion: select the uuids it finds
        wanted.limit = MAX_SEARCH_SELECTION
        rows, more = dashboard.find_messages(_app().sqapi.database, wanted)
        if more:
            raise SelectionError(f"the search finds more than {MAX_SEARCH_SELECTION} messages: narrow it down")
        uuids = tuple(str(row["uuid"]) for row in rows)
        if not uuids:
            raise SelectionError("the search finds no message")

    def moment(value: str | None) -> datetime | None:
        return parse_moment(value) if value else None

    selection = Selection(uuids=uuids, status=wanted.status, plugin=wanted.plugin, since=moment(wanted.since),
                          until=moment(wanted.until), reason=fields.get("reason"))
    return selection, fields


def redrive_differences(fields: dict[str, str]) -> list[str]:
    """Where a redrive of these form fields selects otherwise than the list they came from shows -- said on the
    confirmation page.  The rest is the same: status, since/until (both ends included), the search's uuids."""
    if "uuid" in fields:
        return []
    said = []
    if "status" not in fields:
        said.append("The list shows messages of every status; a redrive takes "
                    + ("those the search finds that are not DONE nor being processed now"
                       if "q" in fields else "its FAILED ones only")
                    + ": a DONE message has nothing left to run, one being processed is running. "
                      "Choose a status to redrive messages of another.")
    if "plugin" in fields:
        said.append(f"The list shows every message plugin {fields['plugin']} has a result for; a redrive takes "
                    f"those whose {fields['plugin']} did not finish (its result is not DONE): re-running it is "
                    "what the redrive is for.")
    if "reason" in fields:
        said.append("Only the messages whose reason contains the text given are taken (the list does not filter "
                    "by reason).")
    return said


@console.route("/dashboard/redrive", methods=["POST"])
def redrive() -> Response:
    from sqapi.redrive import SelectionError, describe_selection
    from sqapi.redrive import redrive as run_redrive

    app = _app()
    confirmed = request.form.get("confirm") == "yes"
    fields: dict[str, str] = {}
    try:
        selection, fields = _selection_from(request.form)
        report = run_redrive(app.sqapi.config, selection, dry_run=not confirmed)
    except SelectionError as exc:
        return _page("redrive.html", status=400, error=str(exc), fields=fields, report=None, confirmed=False)
    except SqapiError as exc:
        log.warning("redrive from the dashboard failed: %s", exc)
        return _page("redrive.html", status=503, error=f"the redrive could not run: {exc}", fields=fields,
                     report=None, confirmed=confirmed)
    if confirmed:
        log.info("dashboard redrive of %s: %d re-published (%d from the dead letters)",
                 fields, report.republished, report.from_dead)
        if "uuid" in fields:
            target = url_for("console.message_page", uuid=fields["uuid"], redriven=str(report.republished))
            return redirect(target, 303)  # type: ignore[return-value]
    return _page("redrive.html", fields=fields, report=report, confirmed=confirmed,
                 shown=report.selected[:REDRIVE_SHOWN], described=describe_selection(selection),
                 differences=redrive_differences(fields))


# -- signing in -------------------------------------------------------------------------------------
@console.route("/login", methods=["GET"])
def login_form() -> Response:
    return _page("login.html", next=session.safe_next(request.args.get("next")), error=None)


@console.route("/login", methods=["POST"])
def login() -> Response:
    app = _app()
    target = session.safe_next(request.form.get("next"))
    if not app.sessions.token_required:
        return redirect(target, 303)  # type: ignore[return-value]
    if not app.sessions.token_ok(request.form.get("token") or ""):
        log.warning("dashboard sign-in refused from %s: wrong token", request.remote_addr)
        return _page("login.html", status=401, next=target, error="That is not the API token.")
    session.replace(app.sessions.new(authenticated=True))  # a fresh session (and CSRF token) on sign-in
    return redirect(target, 303)  # type: ignore[return-value]


@console.route("/logout", methods=["POST"])
def logout() -> Response:
    session.replace(None)
    return redirect(url_for("console.login_form"), 303)  # type: ignore[return-value]
