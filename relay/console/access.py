"""Who may use the console: the Host allow-list, the token (session cookie or Bearer), CSRF, security headers."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from aiohttp.typedefs import Middleware

SESSION_COOKIE = "privacy_relay_console"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
# No inline script or style anywhere: what a message's subject could smuggle into a page never runs.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
# Reached without the token: probes, and the page's own stylesheet and script.
_OPEN_PATHS = ("/healthz",)
_OPEN_PREFIXES = ("/static/",)
_STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _derived(token: str, purpose: bytes) -> str:
    return hmac.new(token.encode("ascii"), purpose, hashlib.sha256).hexdigest()


def wants_json(request: web.Request) -> bool:
    return request.path.startswith("/api/") or request.path in ("/metrics", "/healthz")


class Access:
    """The console's rules, from its token and the host names it answers to."""

    def __init__(self, token: str, host_names: Iterable[str], metrics_public: bool, token_file: str) -> None:
        self._token = token
        # The cookie holds a value derived from the token, so a stolen cookie is not the token scripts use.
        self.session = _derived(token, b"console session")
        self.csrf_token = _derived(token, b"console csrf")
        self._host_names = frozenset(name.lower().strip("[]") for name in host_names)
        self._metrics_public = metrics_public
        self.token_file = token_file

    def host_allowed(self, host: str) -> bool:
        # Host is name[:port], [v6]:port or [v6].
        name = host.rsplit("]", 1)[0].lstrip("[") if host.startswith("[") else host.rsplit(":", 1)[0]
        return name.lower() in self._host_names

    def is_token(self, candidate: str) -> bool:
        return hmac.compare_digest(candidate.encode(), self._token.encode())

    def authentication(self, request: web.Request) -> str | None:
        """ "bearer", "cookie", or None."""
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.is_token(credential.strip()):
            return "bearer"
        cookie = request.cookies.get(SESSION_COOKIE, "")
        if cookie and hmac.compare_digest(cookie.encode(), self.session.encode()):
            return "cookie"
        return None

    def is_open(self, request: web.Request) -> bool:
        path = request.path
        return path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES) or (path == "/metrics" and self._metrics_public)

    async def csrf_refusal(self, request: web.Request) -> str | None:
        """Why a cookie-authenticated change is refused, or None: it must be same-origin and carry the token."""
        fetch_site = request.headers.get("Sec-Fetch-Site")
        origin = request.headers.get("Origin")
        if fetch_site is not None:
            same_origin = fetch_site == "same-origin"
        else:
            same_origin = origin is not None and origin == f"{request.scheme}://{request.host}"
        if not same_origin:
            return "the request did not come from the console's own page (Origin / Sec-Fetch-Site)"
        sent = request.headers.get(CSRF_HEADER)
        if sent is None and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            value = (await request.post()).get(CSRF_FIELD)
            sent = value if isinstance(value, str) else None
        if sent is None or not hmac.compare_digest(sent.encode(), self.csrf_token.encode()):
            return "the request carries no valid CSRF token; reload the page and try again"
        return None


def refusal(request: web.Request, status: int, text: str, page: str | None = None) -> web.Response:
    """A JSON error for the API, a short page for a person."""
    if wants_json(request):
        return web.json_response({"error": text}, status=status)
    return web.Response(status=status, text=page or text, content_type="text/html")


def _token_page(token_file: str) -> str:
    return (
        "<!doctype html><html lang=en><meta charset=utf-8><title>privacy-relay console</title>"
        "<link rel=stylesheet href=/static/console.css><main class=narrow><h1>privacy-relay console</h1>"
        "<p>This page needs the console's token. Open the link the relay printed when it started "
        "(the log line <code>console.started</code>), or add <code>?token=</code> and the contents of "
        f"<code>{_escape(token_file)}</code> to this address.</p></main></html>"
    )


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def guard(access: Access) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not access.host_allowed(request.host):
            return refusal(request, 403, f"this console does not answer to the host name {request.host!r}")
        if access.is_open(request):
            return await handler(request)
        token = request.query.get("token")
        if token is not None and request.method == "GET" and not wants_json(request):
            if not access.is_token(token):
                return refusal(request, 401, "wrong token", _token_page(access.token_file))
            # The token leaves the address bar (and the history) at once; the cookie stands for it.
            location = request.rel_url.with_query([(k, v) for k, v in request.query.items() if k != "token"])
            response = web.Response(status=303, headers={"Location": str(location)})
            response.set_cookie(
                SESSION_COOKIE, access.session, httponly=True, samesite="Strict", secure=request.secure, path="/"
            )
            return response
        how = access.authentication(request)
        if how is None:
            return refusal(request, 401, "this needs the console's token", _token_page(access.token_file))
        if how == "cookie" and request.method in _STATE_CHANGING:
            reason = await access.csrf_refusal(request)
            if reason is not None:
                return refusal(request, 403, f"refused: {reason}")
        return await handler(request)

    return middleware


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (404, 405, 413) as JSON for the API, like every other API answer."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if not wants_json(request) or exc.status < 400:
            raise
        return web.json_response({"error": exc.reason}, status=exc.status)


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
