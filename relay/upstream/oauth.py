"""OAuth2 for upstream logins (XOAUTH2): the token file, refreshing access tokens, and the two login flows.

The HTTP side of OAuth2 is authlib's (httpx2 client); this module decides when to refresh and where tokens live.
Nothing here logs or words an error with a token or a client secret in it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay.config.models import OAuth2Config
from relay.files import async_change_lock, write_atomically

if TYPE_CHECKING:
    from authlib.integrations.base_client.errors import OAuthError
    from authlib.integrations.httpx_client import AsyncOAuth2Client

# An access token is renewed this many seconds before it expires, so no login races its expiry.
REFRESH_MARGIN = 300
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
MICROSOFT_SCOPE = "https://outlook.office.com/SMTP.Send offline_access"
GOOGLE_SCOPE = "https://mail.google.com/"


class OAuth2Error(Exception):
    """An OAuth2 problem, worded for the person running the relay; never holds a token."""


@dataclass(frozen=True, slots=True)
class Endpoints:
    token: str
    device_authorization: str
    authorization: str
    scope: str


def endpoints_for(config: OAuth2Config) -> Endpoints:
    """The provider's public endpoints, each replaced by its config key when that is set."""
    if config.provider == "google":
        defaults = Endpoints(
            "https://oauth2.googleapis.com/token",
            "https://oauth2.googleapis.com/device/code",
            "https://accounts.google.com/o/oauth2/v2/auth",
            GOOGLE_SCOPE,
        )
    else:
        base = f"https://login.microsoftonline.com/{urllib.parse.quote(config.tenant)}/oauth2/v2.0"
        defaults = Endpoints(f"{base}/token", f"{base}/devicecode", f"{base}/authorize", MICROSOFT_SCOPE)
    return Endpoints(
        config.token_endpoint or defaults.token,
        config.device_authorization_endpoint or defaults.device_authorization,
        config.authorization_endpoint or defaults.authorization,
        defaults.scope,
    )


@dataclass(frozen=True, slots=True)
class StoredToken:
    refresh_token: str
    access_token: str | None = None
    expires_at: float = 0.0

    def fresh(self, now: float) -> bool:
        return self.access_token is not None and now < self.expires_at - REFRESH_MARGIN


def load_token(path: Path, login_hint: str) -> StoredToken:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OAuth2Error(f"{path} does not exist yet: run `{login_hint}` once to sign in") from None
    except OSError as exc:
        raise OAuth2Error(f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise OAuth2Error(f"{path} is not a token file written by privacy-relay: run `{login_hint}`") from None
    if not isinstance(data, dict) or not isinstance(data.get("refresh_token"), str):
        raise OAuth2Error(f"{path} holds no refresh token: run `{login_hint}`")
    access = data.get("access_token")
    expires_at = data.get("expires_at")
    return StoredToken(
        data["refresh_token"],
        access if isinstance(access, str) else None,
        float(expires_at) if isinstance(expires_at, int | float) else 0.0,
    )


def save_token(path: Path, token: StoredToken) -> None:
    """Write atomically with mode 0600: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    content = json.dumps(
        {"refresh_token": token.refresh_token, "access_token": token.access_token, "expires_at": token.expires_at}
    )
    write_atomically(path, (content.encode("utf-8"),))


def _client(config: OAuth2Config, **options: Any) -> AsyncOAuth2Client:
    # authlib and httpx2 are imported here and in the functions that catch their errors, not at the top:
    # they take about 20 MB and 0.2 s to load, which a relay without OAuth2 upstreams need not pay.
    from authlib.integrations.httpx_client import AsyncOAuth2Client

    secret = config.client_secret.get_secret_value() if config.client_secret else None
    return AsyncOAuth2Client(
        client_id=config.client_id,
        client_secret=secret,
        # A public client (Microsoft device code) proves nothing but its id; Google's sends its secret.
        token_endpoint_auth_method="client_secret_post" if secret else "none",
        scope=endpoints_for(config).scope,
        **options,
    )


def _stored(response: Mapping[str, Any], previous_refresh_token: str | None, now: float) -> StoredToken:
    access = response.get("access_token")
    if not isinstance(access, str):
        raise OAuth2Error("the token endpoint answered without an access token")
    # Microsoft sends a new refresh token with each refresh (the old one keeps working for a while).
    refresh = response.get("refresh_token") or previous_refresh_token
    if not isinstance(refresh, str):
        raise OAuth2Error("the provider sent no refresh token; the app must be allowed offline access")
    expires_in = response.get("expires_in")
    expires_at = now + float(expires_in) if isinstance(expires_in, int | float | str) else now + 3600
    return StoredToken(refresh, access, expires_at)


def _refused(exc: OAuthError, login_hint: str) -> OAuth2Error:
    detail = f"{exc.error}: {exc.description}" if exc.description else str(exc.error)
    if exc.error == "invalid_grant":
        return OAuth2Error(
            f"the provider refused the stored refresh token ({detail}); it was revoked, expired or belongs "
            f"to another app. Sign in again with `{login_hint}`"
        )
    return OAuth2Error(f"the provider's token endpoint refused the request ({detail})")


class AccessTokens:
    """Access tokens for one upstream: the stored one while it is fresh, else a refreshed one saved back."""

    def __init__(self, config: OAuth2Config, login_hint: str, clock: Callable[[], float] = time.time) -> None:
        assert config.token_file is not None
        self._config = config
        self._path = config.token_file
        self._login_hint = login_hint
        self._clock = clock
        self._lock = asyncio.Lock()
        # Workers share the token file: one refreshes while the others wait, then use what it saved.
        self._file_lock = async_change_lock(self._path)

    async def current(self) -> str:
        return await self._access_token(rejected=None)

    async def refreshed(self, rejected: str) -> str:
        """A new access token after the upstream refused `rejected`, unless another login already renewed it."""
        return await self._access_token(rejected)

    async def _access_token(self, rejected: str | None) -> str:
        async with self._lock:
            usable = self._usable(load_token(self._path, self._login_hint), rejected)
            if usable is not None:
                return usable
            async with self._file_lock:
                # Another worker may have refreshed it while this one waited for the lock.
                token = load_token(self._path, self._login_hint)
                usable = self._usable(token, rejected)
                return usable if usable is not None else await self._refresh(token)

    def _usable(self, token: StoredToken, rejected: str | None) -> str | None:
        """The stored access token, if it is fresh and not the one the upstream just refused."""
        if token.access_token not in (None, rejected) and token.fresh(self._clock()):
            return token.access_token
        return None

    async def _refresh(self, token: StoredToken) -> str:
        import httpx2
        from authlib.integrations.base_client.errors import OAuthError

        now = self._clock()
        try:
            async with _client(self._config) as client:
                response = await client.refresh_token(
                    endpoints_for(self._config).token, refresh_token=token.refresh_token
                )
        except OAuthError as exc:
            raise _refused(exc, self._login_hint) from None
        except (httpx2.HTTPError, ValueError) as exc:
            raise OAuth2Error(f"cannot get an access token from the provider ({type(exc).__name__}: {exc})") from None
        new = _stored(response, token.refresh_token, now)
        save_token(self._path, new)
        assert new.access_token is not None
        return new.access_token


async def device_code_login(config: OAuth2Config, show: Callable[[str], None]) -> StoredToken:
    """Microsoft's device-code flow (RFC 8628): the user signs in on any browser with a short code."""
    import httpx2
    from authlib.integrations.base_client.errors import OAuthError

    endpoints = endpoints_for(config)
    async with _client(config) as client:
        try:
            answer = await client.request(
                "POST",
                endpoints.device_authorization,
                data={"client_id": config.client_id, "scope": endpoints.scope},
                withhold_token=True,  # there is no token yet: this request starts the sign-in
            )
            grant = answer.json()
        except (httpx2.HTTPError, ValueError) as exc:
            raise OAuth2Error(f"cannot start the sign-in ({type(exc).__name__}: {exc})") from None
        if not isinstance(grant, dict) or "device_code" not in grant:
            error = grant.get("error_description") or grant.get("error") if isinstance(grant, dict) else None
            raise OAuth2Error(f"the provider did not start the sign-in ({error or answer.status_code})")
        show(
            grant.get("message")
            or f"To sign in, open {grant.get('verification_uri')} and enter the code {grant.get('user_code')}"
        )
        interval = float(grant.get("interval", 5))
        while True:
            now = time.time()
            try:
                response = await client.fetch_token(
                    endpoints.token, grant_type=DEVICE_CODE_GRANT, device_code=grant["device_code"]
                )
            except OAuthError as exc:
                if exc.error == "authorization_pending":
                    await asyncio.sleep(interval)
                    continue
                if exc.error == "slow_down":
                    interval += 5
                    await asyncio.sleep(interval)
                    continue
                raise _refused(exc, "privacy-relay auth login") from None
            except httpx2.HTTPError as exc:
                raise OAuth2Error(f"cannot reach the token endpoint ({type(exc).__name__}: {exc})") from None
            return _stored(response, None, now)


class _RedirectCatcher(BaseHTTPRequestHandler):
    """Receives the browser's redirect back to the loopback address with ?code=...&state=..."""

    server: _RedirectServer

    def do_GET(self) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        if "code" not in query and "error" not in query:
            self.send_error(404)
            return
        self.server.redirect_query = {key: values[0] for key, values in query.items()}
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.end_headers()
        self.wfile.write(b"privacy-relay: signed in. You can close this window.\n")

    def log_message(self, format: str, *args: Any) -> None:
        return None  # the query holds the authorization code: not for the terminal


class _RedirectServer(HTTPServer):
    redirect_query: dict[str, str] | None = None
    # handle_request() returns after this many idle seconds, so Ctrl-C is not stuck behind a blocked thread.
    timeout = 1.0


async def installed_app_login(config: OAuth2Config, open_url: Callable[[str], None]) -> StoredToken:
    """Google's installed-app flow: the browser signs in and comes back to a loopback address (with PKCE)."""
    import httpx2
    from authlib.integrations.base_client.errors import OAuthError

    endpoints = endpoints_for(config)
    with _RedirectServer(("127.0.0.1", 0), _RedirectCatcher) as catcher:
        redirect_uri = f"http://127.0.0.1:{catcher.server_address[1]}/"
        verifier = secrets.token_urlsafe(48)
        async with _client(config, redirect_uri=redirect_uri, code_challenge_method="S256") as client:
            url, state = client.create_authorization_url(
                endpoints.authorization,
                code_verifier=verifier,
                # offline + consent: Google only returns a refresh token on a consented offline grant.
                access_type="offline",
                prompt="consent",
            )
            open_url(url)
            while catcher.redirect_query is None:
                await asyncio.to_thread(catcher.handle_request)
            query = catcher.redirect_query
            if "error" in query:
                raise OAuth2Error(f"the sign-in was not completed ({query['error']})")
            if query.get("state") != state:
                raise OAuth2Error("the sign-in answer did not belong to this login (state mismatch); try again")
            now = time.time()
            try:
                response = await client.fetch_token(
                    endpoints.token, code=query["code"], grant_type="authorization_code", code_verifier=verifier
                )
            except OAuthError as exc:
                raise _refused(exc, "privacy-relay auth login") from None
            except httpx2.HTTPError as exc:
                raise OAuth2Error(f"cannot reach the token endpoint ({type(exc).__name__}: {exc})") from None
    return _stored(response, None, now)
