"""The relay's side of the upstream: TLS, AUTH, reused connections, and what the client hears when
the upstream refuses or is away. Every test sets RELAY_DELIVERY_MODE=direct: the client's reply is
the upstream's verdict only while the client waits for delivery.
"""

from __future__ import annotations

import smtplib
import socket
from pathlib import Path

import pytest

from tests.conftest import LOOPBACK, Upstream

SENDER = "coach@coaching.test"
RECIPIENTS = ["ann@one.test", "bob@two.test", "cy@three.test"]
MESSAGE = (
    b"From: coach@coaching.test\r\nTo: ann@one.test, bob@two.test, cy@three.test\r\nSubject: Plans\r\n\r\nHello.\r\n"
)
CREDENTIALS = ("relay-user", "correct horse battery staple")


def send(relay) -> dict:
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        return client.sendmail(SENDER, RECIPIENTS, MESSAGE)


def refused_reply(relay) -> tuple[int, str]:
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(relay)
    return refused.value.smtp_code, refused.value.smtp_error.decode()


def ca_file(upstream: Upstream, tmp_path: Path) -> str:
    assert upstream.ca is not None
    path = tmp_path / "upstream-ca.pem"
    upstream.ca.cert_pem.write_to_path(str(path))
    return str(path)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
    return port


def test_starttls_and_auth_with_a_private_ca(start_relay, make_upstream, tmp_path: Path) -> None:
    upstream = make_upstream(tls="starttls", credentials=CREDENTIALS)
    relay = start_relay(
        upstream,
        RELAY_DELIVERY_MODE="direct",
        RELAY_UPSTREAM_TLS="starttls",
        RELAY_UPSTREAM_CA_FILE=ca_file(upstream, tmp_path),
        RELAY_UPSTREAM_USERNAME=CREDENTIALS[0],
        RELAY_UPSTREAM_PASSWORD=CREDENTIALS[1],
    )

    assert send(relay) == {}

    assert sorted(r for m in upstream.messages for r in m.rcpt_tos) == RECIPIENTS


def test_implicit_tls(start_relay, make_upstream, tmp_path: Path) -> None:
    upstream = make_upstream(tls="implicit")
    relay = start_relay(
        upstream,
        RELAY_DELIVERY_MODE="direct",
        RELAY_UPSTREAM_TLS="implicit",
        RELAY_UPSTREAM_CA_FILE=ca_file(upstream, tmp_path),
    )

    assert send(relay) == {}

    assert len(upstream.messages) == 3


def test_password_file_is_used_for_auth(start_relay, make_upstream, tmp_path: Path) -> None:
    upstream = make_upstream(tls="starttls", credentials=CREDENTIALS)
    password_file = tmp_path / "upstream-password"
    password_file.write_text(CREDENTIALS[1] + "\n")
    relay = start_relay(
        upstream,
        RELAY_DELIVERY_MODE="direct",
        RELAY_UPSTREAM_TLS="starttls",
        RELAY_UPSTREAM_CA_FILE=ca_file(upstream, tmp_path),
        RELAY_UPSTREAM_USERNAME=CREDENTIALS[0],
        RELAY_UPSTREAM_PASSWORD_FILE=str(password_file),
    )

    assert send(relay) == {}

    assert len(upstream.messages) == 3


def test_wrong_upstream_password_is_reported_to_the_client(start_relay, make_upstream, tmp_path: Path) -> None:
    upstream = make_upstream(tls="starttls", credentials=CREDENTIALS)
    relay = start_relay(
        upstream,
        RELAY_DELIVERY_MODE="direct",
        RELAY_UPSTREAM_TLS="starttls",
        RELAY_UPSTREAM_CA_FILE=ca_file(upstream, tmp_path),
        RELAY_UPSTREAM_USERNAME=CREDENTIALS[0],
        RELAY_UPSTREAM_PASSWORD="not the password",
    )

    code, text = refused_reply(relay)

    assert code == 535
    assert text.startswith("5.7.8 ")
    assert "refused the relay's login" in text
    assert "check upstream.username and the password" in text
    for recipient in RECIPIENTS:
        assert recipient in text
    assert upstream.messages == []


def test_untrusted_upstream_certificate_is_refused(start_relay, make_upstream) -> None:
    upstream = make_upstream(tls="starttls")
    # No ca_file: the system trust store does not know the test CA.
    relay = start_relay(upstream, RELAY_DELIVERY_MODE="direct", RELAY_UPSTREAM_TLS="starttls")

    code, text = refused_reply(relay)

    assert code == 451
    assert text.startswith("4.7.5 TLS with upstream ")
    assert "certificate verify failed" in text
    assert upstream.messages == []


def test_upstream_refusing_one_recipient_of_a_split_names_that_recipient(start_relay, upstream: Upstream) -> None:
    upstream.handler.rcpt_replies["bob@two.test"] = "550 5.1.1 No such user here"
    relay = start_relay(upstream, RELAY_DELIVERY_MODE="direct")

    code, text = refused_reply(relay)

    assert code == 550
    assert text.startswith("5.1.1 No such user here")
    assert "not delivered to: bob@two.test" in text
    assert "2 other recipient(s) already received it" in text
    assert sorted(r for m in upstream.messages for r in m.rcpt_tos) == ["ann@one.test", "cy@three.test"]


def test_upstream_refusing_everyone_names_every_recipient(start_relay, upstream: Upstream) -> None:
    upstream.handler.mail_reply = "554 5.7.1 Sender address rejected"
    relay = start_relay(upstream, RELAY_DELIVERY_MODE="direct")

    code, text = refused_reply(relay)

    assert code == 554
    assert text.startswith("5.7.1 Sender address rejected")
    assert "not delivered to: ann@one.test, bob@two.test, cy@three.test" in text
    assert "already received" not in text
    assert upstream.messages == []


def test_temporary_upstream_failure_stays_temporary(start_relay, upstream: Upstream) -> None:
    upstream.handler.data_reply = "452 4.3.1 Insufficient system storage"
    relay = start_relay(upstream, RELAY_DELIVERY_MODE="direct")

    code, text = refused_reply(relay)

    assert code == 452
    assert text.startswith("4.3.1 Insufficient system storage")
    assert "not delivered to: ann@one.test, bob@two.test, cy@three.test" in text


def test_upstream_down_gives_451(start_relay) -> None:
    relay = start_relay(
        RELAY_DELIVERY_MODE="direct",
        RELAY_UPSTREAM_HOST=LOOPBACK,
        RELAY_UPSTREAM_PORT=str(closed_port()),
        RELAY_UPSTREAM_TLS="none",
    )

    code, text = refused_reply(relay)

    assert code == 451
    assert text.startswith("4.4.1 cannot reach upstream 127.0.0.1:")
    assert "try again later" in text


def test_upstream_connections_are_reused_across_messages(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_DELIVERY_MODE="direct", RELAY_UPSTREAM_MAX_CONNECTIONS="2")

    for _ in range(3):
        assert send(relay) == {}

    assert len(upstream.messages) == 9
    assert upstream.handler.connections == 2


def test_8bit_and_smtputf8_mail_keeps_its_mail_parameters(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_DELIVERY_MODE="direct")
    message = "From: coach@coaching.test\r\nTo: jörg@münchen.test, ann@one.test\r\nSubject: Grüße\r\n\r\nGrüße\r\n"
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        refused = client.sendmail(
            "coach@coaching.test",
            ["jörg@münchen.test", "ann@one.test"],
            message.encode(),
            mail_options=["SMTPUTF8", "BODY=8BITMIME"],
        )

    assert refused == {}
    assert sorted(r for m in upstream.messages for r in m.rcpt_tos) == ["ann@one.test", "jörg@münchen.test"]
    for received in upstream.messages:
        assert "SMTPUTF8" in received.mail_options
        assert "BODY=8BITMIME" in received.mail_options
        assert received.data.endswith("\r\n\r\nGrüße\r\n".encode())


def test_upstream_421_becomes_451_and_the_client_session_stays_open(start_relay, upstream: Upstream) -> None:
    upstream.handler.mail_reply = "421 4.7.0 Try again later, closing connection"
    relay = start_relay(upstream, RELAY_DELIVERY_MODE="direct")
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail(SENDER, RECIPIENTS, MESSAGE)
        # 421 would tell the client that the relay is closing the session (RFC 5321 3.8); it is not.
        assert refused.value.smtp_code == 451
        assert refused.value.smtp_error.decode().startswith("4.7.0 Try again later, closing connection")
        assert client.noop()[0] == 250
