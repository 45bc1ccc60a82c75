"""Who may use the API: a bearer token for programs, a signed session cookie for people, CSRF for actions.

With ``api.token`` set, every route but ``/health``, ``/login`` and the static files needs either

* ``Authorization: Bearer <token>`` (programs; as before), or
* the session cookie that ``POST /login`` sets after it was given the token in a form.

The cookie never holds the token: it holds a session (``auth`` and a random CSRF token), signed
with a key derived from the token (HMAC-SHA256), so changing the token ends every session and
several API processes with the same token accept each other's cookies.  It is ``HttpOnly``,
``SameSite=Strict``, ``Secure`` when the request came over https (always with ``api.secure_cookie:
true``), and older than
:data:`SESSION_HOURS` it is refused.

Requests that change something (POST, PUT, PATCH, DELETE) made with the cookie must carry the
session's CSRF token, in the header ``X-CSRF-Token`` or (in a url-encoded form) the field ``csrf_token``; so must
the dashboard's own actions and the login form, token or not.  Requests authenticated by the
bearer header are exempt: a browser never sends that header on its own.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from typing import Any
from urllib.parse import quote, urlsplit

from flask import Flask, Response, g, redirect, request
from itsdangerous import BadSignature, URLSafeTimedSerializer
from werkzeug.exceptions import MethodNotAllowed

from sqapi.api import responding

COOKIE = "sqapi_session"
CSRF_FIELD, CSRF_HEADER = "csrf_token", "X-CSRF-Token"
SESSION_HOURS = 12
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: endpoints anyone may reach, token or not
OPEN_ENDPOINTS = frozenset({"core.health", "static", "console.login", "console.login_form"})
#: endpoints that always need the session's CSRF token unless the bearer header authenticated the request
CSRF_ENDPOINTS = frozenset({"console.login", "console.logout", "console.redrive"})


class Sessions:
    """Issues and reads the signed session cookie."""

    def __init__(self, token: str) -> None:
        self.token = token.encode()
        key = hmac.new(self.token, b"sqapi dashboard session", hashlib.sha256).digest() if token \
            else os.urandom(32)  # no token: sessions only carry CSRF tokens, this process's own
        self._serializer = URLSafeTimedSerializer(key, salt="sqapi-session")

    @property
    def token_required(self) -> bool:
        return bool(self.token)

    def bearer_ok(self, header: str) -> bool:
        scheme, _, given = header.partition(" ")
        return bool(self.token) and scheme.lower() == "bearer" \
            and hmac.compare_digest(given.strip().encode(), self.token)

    def token_ok(self, given: str) -> bool:
        return bool(self.token) and hmac.compare_digest(given.encode(), self.token)

    def new(self, authenticated: bool) -> dict[str, Any]:
        return {"auth": authenticated, "csrf": secrets.token_urlsafe(32)}

    def dump(self, session: dict[str, Any]) -> str:
        return self._serializer.dumps(session)

    def load(self, cookie: str | None) -> dict[str, Any] | None:
        """The session a cookie holds; ``None`` when absent, tampered with, signed by another key or too old."""
        if not cookie:
            return None
        try:
            session = self._serializer.loads(cookie, max_age=SESSION_HOURS * 3600)
        except BadSignature:
            return None
        if not isinstance(session, dict) or not isinstance(session.get("csrf"), str):
            return None
        return session


def install(app: Flask, token: str, secure_cookie: bool | str = "auto") -> Sessions:
    """Check every request (token, cookie, CSRF) and write the session cookie when it changed.

    ``secure_cookie`` (``api.secure_cookie``): ``auto`` marks the cookie ``Secure`` when the request came over
    https; ``True`` always (behind a proxy that ends TLS, the request reaching sqapi is plain http)."""
    sessions = Sessions(token)

    def secure() -> bool:
        return request.is_secure if secure_cookie == "auto" else bool(secure_cookie)

    @app.before_request
    def authenticate() -> Response | None:
        g.bearer = sessions.bearer_ok(request.headers.get("Authorization", ""))
        g.session = sessions.load(request.cookies.get(COOKIE))
        g.session_changed = False
        if request.method == "OPTIONS" or isinstance(request.routing_exception, MethodNotAllowed):
            return None  # a method the route does not take is a 405, token or not
        signed_in = g.bearer or (g.session is not None and g.session.get("auth") is True)
        if sessions.token_required and not signed_in and request.endpoint not in OPEN_ENDPOINTS:
            return _unauthorized()
        if request.method in UNSAFE_METHODS and not g.bearer and \
                (request.endpoint in CSRF_ENDPOINTS or (g.session is not None and g.session.get("auth"))):
            expected = (g.session or {}).get("csrf", "")
            given = request.headers.get(CSRF_HEADER) or ""
            if not given and request.mimetype == "application/x-www-form-urlencoded":  # the dashboard's forms
                given = request.form.get(CSRF_FIELD) or ""  # (an upload's body is left for its view to stream)
            if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
                return responding.respond({"error": "forbidden", "details": "the CSRF token is missing or wrong: "
                                           "reload the page and try again"}, 403)
        return None

    @app.after_request
    def write_cookie(answer: Response) -> Response:
        if getattr(g, "session_changed", False):
            if g.session is None:
                answer.delete_cookie(COOKIE, path="/", httponly=True, samesite="Strict", secure=secure())
            else:
                answer.set_cookie(COOKIE, sessions.dump(g.session), path="/", httponly=True, samesite="Strict",
                                  secure=secure())
        return answer

    return sessions


def current(sessions: Sessions) -> dict[str, Any]:
    """This request's session, started (anonymous, with a CSRF token) when it has none."""
    if g.get("session") is None:
        g.session = sessions.new(authenticated=False)
        g.session_changed = True
    return g.session


def replace(session: dict[str, Any] | None) -> None:
    """Make ``session`` this browser's session (``None``: end it) when the response goes out."""
    g.session = session
    g.session_changed = True


def _wants_html() -> bool:
    best = request.accept_mimetypes.best_match(["application/json", "text/html"])
    return request.method == "GET" and best == "text/html"


def _unauthorized() -> Response:
    if _wants_html():  # a person at a browser: the login form, then back here
        target = request.full_path.rstrip("?")
        return redirect(f"/login?next={quote(target, safe='')}", 303)  # type: ignore[return-value]
    answer = responding.respond({"error": "unauthorized",
                                 "details": "send the API token as 'Authorization: Bearer <token>' "
                                            "(or sign in at /login)"}, 401)
    answer.headers["WWW-Authenticate"] = 'Bearer realm="sqapi"'
    return answer


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path on this site only (never another host), else ``/``.

    Browsers drop tabs and newlines from a URL (``/\t/evil.example`` is ``//evil.example``, another host) and
    a newline cannot go in a header at all: a target holding any control character is refused, as is one
    whose parse names a scheme or a host."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in target):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target
