"""The web stack's app factory: sessions, logins, CSRF, security headers and templates for any service on it.

:func:`create_web_app` wraps a service's routes (the portal's today, the
operator panel's later) with what every page needs:

* a session in a signed cookie (HttpOnly, SameSite=Lax, Secure when served
  over HTTPS) that holds only the user's name and the CSRF token; the user
  and their role are looked up again on every request, so a removed user is
  out at once;
* ``Authorization: Bearer`` API tokens for scripts (no cookie, so no CSRF);
* a CSRF token in every form, checked on every POST made with a session;
* ``/login`` and ``/logout``, failed logins slowed (:mod:`web.auth`);
* headers that keep a page from being framed elsewhere or running script
  from anywhere but the service itself;
* limits on what a request may carry: a query string over 4 KiB is a 414, a
  form over 64 KiB a 413, before anything reads or stores it.

Routes find who is asking in ``request.state.principal`` and call
:func:`require` with the role they need.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import attrs
import jinja2
import trio
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from web.auth import AuthStore, LoginRefused, Principal, Role
from web.bodies import drain_refused_body

__all__ = ["WebSettings", "create_web_app", "csrf_form", "require", "render"]

MAX_QUERY = 4096
MAX_FORM = 64 * 1024
#: A failed login answers no sooner than this, whatever the reason.
FAILED_LOGIN_DELAY_S = 1.0
SESSION_COOKIE = "sequencer_session"

#: Only the service's own scripts, styles and images; never framed by another site.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'self'; base-uri 'none'; form-action 'self'; object-src 'none'")


@attrs.frozen
class WebSettings:
    """How a service on the stack is served."""

    title: str
    #: who logs in; None serves every request as a read-only viewer (a bench portal on loopback)
    auth: AuthStore | None
    cookie_secret: bytes
    #: template packages, searched first to last, before the stack's own
    template_packages: Sequence[str] = ()
    #: packages whose ``static/`` folder is served at /static, searched first to last
    static_packages: Sequence[str] = ()
    https_only: bool = False
    #: what a page may link to in the navigation bar: (label, path, role needed)
    navigation: Sequence[tuple[str, str, Role]] = ()
    #: paths whose request body may be larger than a form's: path -> most bytes (the build registry's uploads)
    large_bodies: Mapping[str, int] = attrs.field(factory=dict)


def create_web_app(settings: WebSettings, routes: Sequence[BaseRoute], *, state: dict[str, Any] | None = None,
                   lifespan: Any = None) -> Starlette:
    """A starlette app serving ``routes`` behind logins, sessions, CSRF checks and security headers."""
    env = _environment(settings.template_packages)
    extra: list[BaseRoute] = [Route("/login", _login, methods=["GET", "POST"]),
                              Route("/logout", _logout, methods=["POST"])]
    if settings.static_packages:
        extra.append(Mount("/static", app=StaticFiles(packages=[(p, "static") for p in settings.static_packages]),
                           name="static"))
    app = Starlette(
        routes=[*extra, *routes],
        middleware=[
            Middleware(_Limits, large_bodies=dict(settings.large_bodies)),
            Middleware(SessionMiddleware, secret_key=settings.cookie_secret.hex(), session_cookie=SESSION_COOKIE,
                       max_age=12 * 3600, same_site="lax", https_only=settings.https_only),
            Middleware(_Identify),
        ],
        exception_handlers={HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.web = settings
    app.state.templates = env
    for key, value in (state or {}).items():
        setattr(app.state, key, value)
    return app


def _environment(packages: Sequence[str]) -> jinja2.Environment:
    loaders = [jinja2.PackageLoader(p, "templates") for p in (*packages, "web")]
    env = jinja2.Environment(loader=jinja2.ChoiceLoader(loaders), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["urlq"] = lambda value: quote(str(value), safe="")
    return env


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A page: ``template`` with the request, who asks, the CSRF token and the navigation in its context."""
    settings: WebSettings = request.app.state.web
    principal: Principal | None = request.state.principal
    nav = [(label, path) for label, path, role in settings.navigation if principal is not None and principal.may(role)]
    html = request.app.state.templates.get_template(template).render(
        request=request, principal=principal, csrf=csrf_token(request), title=settings.title, navigation=nav,
        bench=settings.auth is None, **context,
    )
    return HTMLResponse(html, status_code=status_code)


# -- who is asking -------------------------------------------------------------


def require(request: Request, role: Role) -> Principal:
    """Who asks, if they may act as ``role``: else 401 (nobody logged in) or 403 (a lower role)."""
    principal: Principal | None = request.state.principal
    if principal is None:
        raise HTTPException(401, "log in first")
    if not principal.may(role):
        raise HTTPException(403, f"this needs the {role.label} role; {principal.name} is {principal.role.label}")
    return principal


class _Identify:
    """Sets ``request.state.principal`` from a bearer token or the session's user, or None."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        settings: WebSettings = request.app.state.web
        principal: Principal | None = None
        auth = settings.auth
        header = request.headers.get("authorization", "")
        if auth is None:
            principal = Principal("bench", Role.VIEWER, "bench")
        elif header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                principal = await trio.to_thread.run_sync(auth.principal_for_token, token.strip())
            if principal is None:
                response = JSONResponse({"error": "unknown or malformed API token"}, status_code=401,
                                        headers={"WWW-Authenticate": 'Bearer realm="sequencer"'})
                await response(scope, receive, send)
                return
        else:
            name = scope["session"].get("user")
            if isinstance(name, str):
                principal = await trio.to_thread.run_sync(auth.user, name)
                if principal is None:
                    scope["session"].clear()  # the user was removed
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


# -- CSRF ------------------------------------------------------------------------


def csrf_token(request: Request) -> str:
    """The session's CSRF token, made when first needed (a bearer-token request has none)."""
    session = request.scope.get("session")
    if session is None:
        return ""
    token = session.get("csrf")
    if not isinstance(token, str):
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


async def csrf_form(request: Request) -> FormData:
    """The POSTed form, once its CSRF token is the session's (403 otherwise; a bearer-token request needs none)."""
    form = await request.form(max_files=0, max_fields=64, max_part_size=MAX_FORM)
    principal: Principal | None = request.state.principal
    if principal is not None and principal.via == "token":
        return form
    sent = form.get("csrf")
    expected = request.scope.get("session", {}).get("csrf")
    if not isinstance(sent, str) or not isinstance(expected, str) or not hmac.compare_digest(sent, expected):
        raise HTTPException(403, "the form's CSRF token is missing or stale: reload the page and submit again")
    return form


# -- login -------------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this service, never another site."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    parts = urlsplit(target)
    return "/" if parts.scheme or parts.netloc else target


async def _login(request: Request) -> Response:
    settings: WebSettings = request.app.state.web
    next_path = _safe_next(request.query_params.get("next"))
    if settings.auth is None:
        return RedirectResponse("/", status_code=303)
    if request.method == "GET":
        return render(request, "login.html", next_path=next_path, error=None)
    form = await csrf_form(request)
    name, password = str(form.get("name") or ""), str(form.get("password") or "")
    client = request.client.host if request.client else "?"
    try:
        principal = await trio.to_thread.run_sync(settings.auth.login, name, password, client)
    except LoginRefused as exc:
        await trio.sleep(FAILED_LOGIN_DELAY_S)
        response = render(request, "login.html", status_code=429, next_path=next_path, error=str(exc))
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    if principal is None:
        await trio.sleep(FAILED_LOGIN_DELAY_S)
        return render(request, "login.html", status_code=401, next_path=next_path,
                      error="wrong name or password")
    request.session.clear()
    request.session["user"] = principal.name
    request.session["csrf"] = secrets.token_urlsafe(32)  # a new token with the new session
    return RedirectResponse(_safe_next(str(form.get("next") or next_path)), status_code=303)


async def _logout(request: Request) -> Response:
    await csrf_form(request)
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


# -- errors and limits -----------------------------------------------------------------


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    wants_json = request.url.path.startswith("/api/") or "application/json" in request.headers.get("accept", "")
    if wants_json:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)
    if exc.status_code == 401 and request.method == "GET":
        return RedirectResponse(f"/login?next={quote(request.url.path, safe='/')}", status_code=303)
    if getattr(request.state, "principal", "unset") == "unset":
        request.state.principal = None
    return render(request, "error.html", status_code=exc.status_code, status=exc.status_code, message=exc.detail)


class _Limits:
    """Refuses an oversized query string or body before any route sees it, and adds the security headers."""

    def __init__(self, app: ASGIApp, large_bodies: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.large_bodies = large_bodies or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if len(scope.get("query_string", b"")) > MAX_QUERY:
            await PlainTextResponse("query string too long", status_code=414)(scope, receive, send)
            return
        limit = self.large_bodies.get(scope.get("path", ""), MAX_FORM)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            if length.isdigit():  # so the client reads the 413 (web/bodies.py)
                await drain_refused_body(receive, declared=int(length))
            await PlainTextResponse("request body too large", status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Any:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                if message.get("more_body", False):
                    await drain_refused_body(receive, declared=None, read=received)
                raise HTTPException(413, "request body too large")
            return message

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                names = {k.lower() for k, _ in headers}
                for name, value in ((b"content-security-policy", CSP), (b"x-content-type-options", "nosniff"),
                                    (b"referrer-policy", "same-origin"), (b"x-frame-options", "SAMEORIGIN")):
                    if name not in names:
                        headers.append((name, value.encode()))
            await send(message)

        await self.app(scope, limited_receive, with_headers)

