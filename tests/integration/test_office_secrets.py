"""Passwords never reach a log, an SMTP reply, or the output of `check` and `preview`."""

from __future__ import annotations

import io
import logging
import os
import smtplib
import subprocess
import sys
from base64 import b64encode
from pathlib import Path

import pytest
import structlog

from relay.config.models import LoggingConfig
from relay.logs import configure_logging
from tests.conftest import USER_PASSWORD, Upstream

WRONG_PASSWORD = "a wrong but secret guess"


def forms(secret: str) -> list[bytes]:
    """The secret as typed and as it travels in AUTH PLAIN and LOGIN."""
    raw = secret.encode()
    return [raw, b64encode(raw), b64encode(b"\0kay\0" + raw), b64encode(b"kay\0kay\0" + raw)]


def test_auth_leaves_no_password_in_logs_or_replies(start_relay, upstream: Upstream, write_users) -> None:
    stream = io.StringIO()
    configure_logging(LoggingConfig(level="debug", format="json", show_addresses=True), stream=stream)
    replies: list[bytes] = []
    try:
        relay = start_relay(
            upstream,
            RELAY_LISTEN_AUTH="required",
            RELAY_LISTEN_USERS_FILE=str(write_users(kay=["kay@office.test"])),
            RELAY_LISTEN_MAX_AUTH_FAILURES="2",
        )
        attempts = [("kay", USER_PASSWORD, "PLAIN"), ("kay", USER_PASSWORD, "LOGIN"), ("kay", WRONG_PASSWORD, "PLAIN")]
        # A password typed into the user name field, as people do.
        attempts += [(WRONG_PASSWORD, USER_PASSWORD, "LOGIN"), ("kay", WRONG_PASSWORD, "LOGIN")]
        for name, password, mechanism in attempts:
            with smtplib.SMTP(relay.host, relay.port) as client:
                client.ehlo("desk")
                client.user, client.password = name, password
                method = client.auth_plain if mechanism == "PLAIN" else client.auth_login
                try:
                    replies.append(client.auth(mechanism, method)[1])
                except smtplib.SMTPAuthenticationError as refused:
                    replies.append(refused.smtp_error)
    finally:
        structlog.reset_defaults()
        logging.getLogger("mail.log").setLevel(logging.NOTSET)
    log = stream.getvalue().encode()
    assert b'"auth.succeeded"' in log and b'"auth.failed"' in log and b'"auth.locked_out"' in log
    assert [reply[:5] for reply in replies] == [b"2.7.0", b"2.7.0", b"5.7.8", b"5.7.8", b"4.7.0"]
    for secret in (USER_PASSWORD, WRONG_PASSWORD):
        for form in forms(secret):
            assert form not in log
            assert not any(form in reply for reply in replies)


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # the test upstream's choice
def test_check_and_preview_do_not_print_the_upstream_password(make_upstream, tmp_path: Path) -> None:
    upstream = make_upstream(credentials=("relay@office.test", "the upstream secret"))
    message = tmp_path / "message.eml"
    message.write_bytes(b"From: kay@office.test\r\nTo: a@one.test, b@two.test\r\nSubject: x\r\n\r\nHi.\r\n")
    outputs = []
    for password in ("the upstream secret", "a wrong upstream secret"):
        environment = {
            **os.environ,
            "RELAY_UPSTREAM_HOST": upstream.host,
            "RELAY_UPSTREAM_PORT": str(upstream.port),
            "RELAY_UPSTREAM_TLS": "none",
            "RELAY_UPSTREAM_USERNAME": "relay@office.test",
            "RELAY_UPSTREAM_PASSWORD": password,
        }
        for command in (["check"], ["preview", str(message)]):
            result = subprocess.run(
                [sys.executable, "-m", "relay", *command],
                capture_output=True,
                text=True,
                cwd=tmp_path,
                env=environment,
                timeout=60,
            )
            output = result.stdout + result.stderr
            assert password not in output
            outputs.append(output)
    assert "auth: OK" in outputs[0]
    assert "auth: FAILED" in outputs[2]
