"""Helpers for the console tests: an HTTP client that sets every header itself, and mail to send."""

from __future__ import annotations

import http.client
import json
import re
import smtplib
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from relay.console import ConsoleThread
from relay.server import RelayServer
from tests.conftest import LOOPBACK


@dataclass
class Answer:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


@dataclass
class ConsoleClient:
    """Talks to the console over loopback: Bearer by default; cookie=... stands for a browser's session."""

    port: int
    token: str
    cookie: str | None = None
    host: str = f"{LOOPBACK}"
    extra_headers: dict[str, str] = field(default_factory=dict)

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        bearer: bool = True,
    ) -> Answer:
        sent = {"Host": f"{self.host}:{self.port}", **self.extra_headers}
        if bearer:
            sent["Authorization"] = f"Bearer {self.token}"
        if self.cookie is not None:
            sent["Cookie"] = self.cookie
        sent.update(headers or {})
        connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            return Answer(response.status, response.headers, response.read())
        finally:
            connection.close()

    def get(self, path: str, **kwargs: Any) -> Answer:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: bytes = b"", **kwargs: Any) -> Answer:
        return self.request("POST", path, body=body, **kwargs)

    def csrf_token(self) -> str:
        """The CSRF token the console's pages put in their forms (for a cookie session)."""
        found = re.search(r'name="csrf" value="([0-9a-f]+)"', self.get("/status", bearer=False).text)
        assert found is not None
        return found.group(1)

    def submit(self, path: str, fields: dict[str, str] | None = None) -> Answer:
        """A form posted as the console's own page does: cookie, same Origin, the CSRF token."""
        body = urlencode({**(fields or {}), "csrf": self.csrf_token()}).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Origin": self.origin}
        return self.post(path, body, bearer=False, headers=headers)


@dataclass
class RunningConsole:
    relay: RelayServer
    relay_port: int
    console: ConsoleThread
    client: ConsoleClient
    token_file: Path


def send(
    port: int, to: list[str], subject: str = "Team news", sender: str = "coach@club.test", body: str = "Hi"
) -> str:
    """Send a message whose To shows every recipient; the relay's reply text."""
    message = f"From: {sender}\r\nTo: {', '.join(to)}\r\nSubject: {subject}\r\n\r\n{body}\r\n"
    with smtplib.SMTP(LOOPBACK, port, timeout=30) as client:
        client.ehlo()
        client.mail(sender)
        for recipient in to:
            client.rcpt(recipient)
        code, reply = client.data(message.encode())
    return f"{code} {reply.decode()}"
