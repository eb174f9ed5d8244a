"""The office relay as deployed: `privacy-relay serve` in its own process, swaks as a desk's mail
program with STARTTLS and AUTH, and `privacy-relay user add` creating the account it logs in with."""

from __future__ import annotations

import signal
import smtplib
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from tests.conftest import RelayCertificate, Upstream
from tests.e2e.conftest import CONSOLE_SCRIPT
from tests.support.spool import wait_until

PASSWORD = "a desk's long password"
MESSAGE = b"From: kay@office.test\r\nTo: ann@one.test, bob@two.test\r\nSubject: e2e\r\n\r\nHello.\r\n"


def swaks_office(swaks_path: str, port: int, tmp_path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    message = tmp_path / "message.eml"
    message.write_bytes(MESSAGE.removesuffix(b"\r\n"))
    command = [swaks_path, "--server", f"127.0.0.1:{port}", "--helo", "desk.test", "--from", "kay@office.test"]
    command += ["--to", "ann@one.test,bob@two.test", "--data", f"@{message}", "--timeout", "20", *options]
    return subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def test_a_desk_logs_in_over_starttls_and_sends(
    serve_relay, swaks_path: str, upstream: Upstream, relay_certificate: RelayCertificate, tmp_path: Path
) -> None:
    users = tmp_path / "users.yaml"
    added = subprocess.run(
        [CONSOLE_SCRIPT, "user", "add", "kay", "--address", "kay@office.test"],
        input=PASSWORD,
        capture_output=True,
        text=True,
        env={"PATH": "", "RELAY_LISTEN_USERS_FILE": str(users)},
        cwd=tmp_path,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    relay = serve_relay(
        RELAY_UPSTREAM_HOST=upstream.host,
        RELAY_UPSTREAM_PORT=str(upstream.port),
        RELAY_UPSTREAM_TLS="none",
        **relay_certificate.listen_settings(),
        RELAY_LISTEN_AUTH="required",
        RELAY_LISTEN_USERS_FILE=str(users),
    )
    without_login = swaks_office(swaks_path, relay.port, tmp_path, "--tls")
    assert "530 5.7.0 Authentication required" in without_login.stdout
    wrong = swaks_office(
        swaks_path, relay.port, tmp_path, "--tls", "--auth", "LOGIN", "--auth-user", "kay", "--auth-password", "nope"
    )
    assert "535 5.7.8" in wrong.stdout
    sent = swaks_office(
        swaks_path, relay.port, tmp_path, "--tls", "--auth", "PLAIN", "--auth-user", "kay", "--auth-password", PASSWORD
    )
    assert sent.returncode == 0, sent.stdout
    assert sorted(r for m in upstream.messages for r in m.rcpt_tos) == ["ann@one.test", "bob@two.test"]
    assert all(b"with ESMTPSA id" in m.data for m in upstream.messages)
    assert PASSWORD not in relay.log_path.read_text()


def first_line(port: int, source: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as client:
        return client.recv(200)


def test_refused_clients_are_told_why_and_a_hang_up_frees_its_slot(serve_relay) -> None:
    # In its own process the relay runs on uvloop (when installed), which did two things asyncio does
    # not: its transports are not asyncio's classes (a refusal failed before a word was written), and
    # a client that hung up at once kept its connection slot until command_timeout (300 s).
    relay = serve_relay(RELAY_LISTEN_ALLOWED_NETWORKS="127.0.0.1/32", RELAY_LISTEN_MAX_CONNECTIONS_PER_IP="1")
    assert first_line(relay.port, "127.0.0.2").startswith(b"554 5.7.1 ")
    for _ in range(3):  # connect and hang up at once, as port scanners and health checks do
        socket.create_connection(("127.0.0.1", relay.port), timeout=10).close()
    assert wait_until(lambda: first_line(relay.port, "127.0.0.1").startswith(b"220 "), limit=10)
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as holding:
        assert holding.recv(200).startswith(b"220 ")
        assert first_line(relay.port, "127.0.0.1").startswith(b"421 4.7.0 ")


def unknown_ca_failures(relay) -> list[dict[str, object]]:
    """Handshakes refused by a client that does not trust the relay's CA (not the fixture's own probe of the port)."""
    return [
        event
        for event in relay.log_events()
        if event.get("event") == "tls.handshake_failed" and "UNKNOWN_CA" in str(event["reason"])
    ]


@pytest.mark.parametrize(
    ("tls", "workers"), [("starttls", "1"), ("implicit", "1"), ("starttls", "2"), ("implicit", "2")]
)
def test_a_desk_without_the_office_ca_leaves_one_log_event_and_no_traceback(
    serve_relay, relay_certificate: RelayCertificate, tls: str, workers: str
) -> None:
    relay = serve_relay(**relay_certificate.listen_settings(tls), RELAY_LISTEN_WORKERS=workers)
    desk_without_ca = ssl.create_default_context()
    with pytest.raises(ssl.SSLCertVerificationError):
        if tls == "implicit":
            smtplib.SMTP_SSL("127.0.0.1", relay.port, context=desk_without_ca, timeout=10)
        else:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
                client.starttls(context=desk_without_ca)
    assert wait_until(lambda: unknown_ca_failures(relay), limit=10)
    relay.process.send_signal(signal.SIGTERM)
    assert relay.process.wait(30) == 0
    assert [(event["client"], event["tls"]) for event in unknown_ca_failures(relay)] == [("127.0.0.1", tls)]
    log = relay.log_path.read_text()
    assert "Traceback" not in log
    assert all(line.startswith("{") for line in log.splitlines()), log
