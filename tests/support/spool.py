"""Helpers for the spool tests: waiting for mail to arrive, and privacy-relay as a real process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from email import message_from_bytes
from email.policy import default
from pathlib import Path

from aiosmtpd.smtp import SMTP

from tests.conftest import LOOPBACK, LoopThread, Received, RecordingHandler


def wait_until(condition: Callable[[], bool], limit: float = 20) -> bool:
    """Poll until condition holds; the limit only keeps a broken test from hanging."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def free_port() -> int:
    """A loopback port nothing listens on right now (for an upstream that is down, then starts)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
    return port


# Retries in seconds rather than minutes, so the fault tests finish quickly.
FAST_RETRIES = {"RELAY_DELIVERY_MIN_BACKOFF": "0.05", "RELAY_DELIVERY_MAX_BACKOFF": "0.3"}


class RelayProcess:
    """`python -m relay serve` with RELAY_* settings; its JSON log lines are collected as they come."""

    def __init__(self, tmp_path: Path, settings: dict[str, str], arguments: tuple[str, ...] = ()) -> None:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        environ.update(
            {
                "RELAY_LISTEN_PORT": "0",
                "RELAY_CONSOLE_PORT": "0",
                "RELAY_OUTBOX": str(tmp_path / "outbox"),
                "RELAY_SPOOL_PATH": str(tmp_path / "spool"),
                "RELAY_LOGGING_FORMAT": "json",
                "RELAY_LOGGING_SHOW_ADDRESSES": "true",
            }
        )
        environ.update(settings)
        self.environ = environ
        self.events: list[dict[str, object]] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", *arguments],
            env=environ,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        assert wait_until(lambda: self.event("relay.started") is not None or self.process.poll() is not None)
        started = self.event("relay.started")
        assert started is not None, f"the relay did not start: {self.events}"
        self.port = int(str(started["listen"]).rsplit(":", 1)[1])

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.events.append({"event": "unparsed", "line": line.decode(errors="replace")})

    def event(self, name: str) -> dict[str, object] | None:
        return next((e for e in self.events if e.get("event") == name), None)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.kill()
        self._reader.join(5)


class UpstreamOnPort:
    """A recording upstream on a port chosen beforehand, so it can be down first and come up later."""

    def __init__(self, loops: LoopThread, handler: RecordingHandler, port: int) -> None:
        self._loops = loops
        self.handler = handler
        self.port = port
        self._server: asyncio.Server | None = None

    def start(self) -> None:
        async def start() -> asyncio.Server:
            return await asyncio.get_running_loop().create_server(
                lambda: SMTP(self.handler, enable_SMTPUTF8=True, hostname="upstream.test"), LOOPBACK, self.port
            )

        self._server = self._loops.run(start())

    def stop(self) -> None:
        async def stop(server: asyncio.Server) -> None:
            server.close()

        if self._server is not None:
            self._loops.run(stop(self._server))
            self._server = None


def copy_keys(messages: list[Received]) -> list[tuple[str, str]]:
    """(Subject, recipient) of every copy received, repeats included."""
    keys = []
    for received in messages:
        subject = message_from_bytes(received.data, policy=default)["Subject"]
        keys.extend((str(subject), recipient) for recipient in received.rcpt_tos)
    return keys


def send_split_messages(port: int, count: int, recipients_each: int, tag: str) -> list[tuple[str, str]]:
    """Send count messages, each To: several people (so each is split); the copies the relay accepted."""
    accepted = []
    with smtplib.SMTP(LOOPBACK, port) as client:
        for number in range(count):
            recipients = [f"r{n}.{number}@{tag}{n}.test" for n in range(recipients_each)]
            subject = f"{tag} message {number}"
            headers = f"From: sender@origin.test\r\nTo: {', '.join(recipients)}\r\nSubject: {subject}\r\n"
            message = f"{headers}\r\nBody {number}.\r\n".encode()
            refused = client.sendmail("sender@origin.test", recipients, message)
            assert refused == {}
            accepted.extend((subject, recipient) for recipient in recipients)
    return accepted
