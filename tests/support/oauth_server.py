"""A small OAuth2 provider for tests, on a free loopback port: what Microsoft's and Google's endpoints do for us.

POST /token          grant_type refresh_token, device_code (pending once, then granted) or authorization_code
POST /devicecode     starts a device-code sign-in (RFC 8628)
GET  /authorize      "signs the user in" at once and redirects to redirect_uri with a code (checked with PKCE)
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CLIENT_ID = "test-client-id"


@dataclass
class ProviderState:
    valid_refresh_tokens: set[str] = field(default_factory=lambda: {"refresh-0"})
    expires_in: int = 3600
    # Called with each access token issued, so a test's upstream can accept it.
    on_issue: Callable[[str], None] = lambda token: None
    # Every form posted to /token, to check what the client asked for.
    token_requests: list[dict[str, str]] = field(default_factory=list)
    authorize_queries: list[dict[str, str]] = field(default_factory=list)
    device_code_polls: int = 0
    pending_codes: dict[str, tuple[str, str]] = field(default_factory=dict)  # code -> (challenge, redirect_uri)
    counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def grant(self) -> dict[str, Any]:
        number = next(self.counter)
        access, refresh = f"access-{number}", f"refresh-{number}"
        self.valid_refresh_tokens.add(refresh)
        self.on_issue(access)
        return {"access_token": access, "token_type": "Bearer", "expires_in": self.expires_in, "refresh_token": refresh}


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
        state = self.server.state
        if form.get("client_id") != CLIENT_ID:
            self._answer(401, {"error": "invalid_client"})
        elif self.path == "/devicecode":
            self._answer(
                200,
                {
                    "device_code": "device-1",
                    "user_code": "ABCD-EFGH",
                    "verification_uri": "https://microsoft.example/devicelogin",
                    "interval": 0,
                    "message": "To sign in, open https://microsoft.example/devicelogin and enter ABCD-EFGH.",
                },
            )
        elif self.path == "/token":
            state.token_requests.append(form)
            self._token(form)
        else:
            self._answer(404, {"error": "not_found"})

    def _token(self, form: dict[str, str]) -> None:
        state = self.server.state
        grant_type = form.get("grant_type")
        if grant_type == "refresh_token":
            if form.get("refresh_token") not in state.valid_refresh_tokens:
                self._answer(400, {"error": "invalid_grant", "error_description": "AADSTS70000: token revoked"})
                return
            self._answer(200, state.grant())
        elif grant_type == "urn:ietf:params:oauth:grant-type:device_code" and form.get("device_code") == "device-1":
            state.device_code_polls += 1
            if state.device_code_polls == 1:
                self._answer(400, {"error": "authorization_pending"})
                return
            self._answer(200, state.grant())
        elif grant_type == "authorization_code" and form.get("code") in state.pending_codes:
            challenge, redirect_uri = state.pending_codes.pop(form["code"])
            digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
            if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != challenge:
                self._answer(400, {"error": "invalid_grant", "error_description": "PKCE verifier mismatch"})
            elif form.get("redirect_uri") != redirect_uri:
                self._answer(400, {"error": "invalid_grant", "error_description": "redirect_uri mismatch"})
            else:
                self._answer(200, state.grant())
        else:
            self._answer(400, {"error": "invalid_grant"})

    def do_GET(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(split.query))
        state = self.server.state
        state.authorize_queries.append(query)
        if split.path != "/authorize" or query.get("client_id") != CLIENT_ID:
            self._answer(400, {"error": "invalid_request"})
            return
        code = f"code-{next(state.counter)}"
        state.pending_codes[code] = (query["code_challenge"], query["redirect_uri"])
        location = f"{query['redirect_uri']}?{urllib.parse.urlencode({'code': code, 'state': query['state']})}"
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return None


class _Server(ThreadingHTTPServer):
    state: ProviderState


class TokenEndpoint:
    def __init__(self) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = ProviderState()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def state(self) -> ProviderState:
        return self._server.state

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def settings(self, prefix: str = "RELAY_UPSTREAM_OAUTH2_") -> dict[str, str]:
        """RELAY_* settings that point a relay's OAuth2 at this provider."""
        return {
            f"{prefix}CLIENT_ID": CLIENT_ID,
            f"{prefix}TOKEN_ENDPOINT": f"{self.base}/token",
            f"{prefix}DEVICE_AUTHORIZATION_ENDPOINT": f"{self.base}/devicecode",
            f"{prefix}AUTHORIZATION_ENDPOINT": f"{self.base}/authorize",
        }

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
