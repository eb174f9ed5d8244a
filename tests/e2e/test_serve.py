"""`privacy-relay serve` as a subprocess, swaks as the mail client, a recording aiosmtpd upstream."""

from __future__ import annotations

import os
import socket
from email import message_from_bytes
from email.policy import default
from pathlib import Path

import pytest

from tests.conftest import LOOPBACK, Upstream

pytestmark = pytest.mark.e2e

SENDER = "coach@coaching.test"
BODY = b"See you on Saturday.\r\n"
INVITATION = (
    b"From: Coach <coach@coaching.test>\r\n"
    b"To: Ann <ann@one.test>, bob@two.test, Cy <cy@three.test>\r\n"
    b"Cc: dee@four.test, Eve <eve@five.test>\r\n"
    b"Bcc: fay@six.test\r\n"
    b"Subject: Workshop\r\n"
    b"Message-ID: <workshop-1@coaching.test>\r\n"
    b"\r\n" + BODY
)
EVERYONE = ["ann@one.test", "bob@two.test", "cy@three.test", "dee@four.test", "eve@five.test", "fay@six.test"]
CREDENTIALS = ("relay-user", "correct horse battery staple")


def upstream_settings(upstream: Upstream, tls: str = "none") -> dict[str, str]:
    return {
        "RELAY_UPSTREAM_HOST": upstream.host,
        "RELAY_UPSTREAM_PORT": str(upstream.port),
        "RELAY_UPSTREAM_TLS": tls,
    }


def assert_private_copies(messages: list[bytes], recipients_by_copy: list[list[str]]) -> None:
    assert sorted(r for copy in recipients_by_copy for r in copy) == sorted(EVERYONE)
    for data, recipients in zip(messages, recipients_by_copy, strict=True):
        assert len(recipients) == 1
        message = message_from_bytes(data, policy=default)
        assert [a.addr_spec for a in message["To"].addresses] == recipients
        assert message["Cc"] is None
        assert message["Bcc"] is None
        headers = data.partition(b"\r\n\r\n")[0]
        assert not any(other.encode() in headers for other in set(EVERYONE) - set(recipients))
        assert data.endswith(b"\r\n\r\n" + BODY)


def test_to_cc_and_bcc_are_split_into_private_copies(serve_relay, swaks, upstream: Upstream) -> None:
    relay = serve_relay(**upstream_settings(upstream))

    result = swaks(relay, SENDER, EVERYONE, INVITATION)

    assert result.returncode == 0, result.stdout
    assert "<-  250 2.0.0 OK: relayed as 6 copies" in result.stdout
    assert_private_copies([m.data for m in upstream.messages], [m.rcpt_tos for m in upstream.messages])
    events = [event["event"] for event in relay.log_events()]
    assert "message.accepted" in events
    assert "message.relayed" in events


def test_bcc_action_sends_one_undisclosed_copy(serve_relay, swaks, upstream: Upstream) -> None:
    relay = serve_relay(RELAY_POLICY_ACTION="bcc", **upstream_settings(upstream))

    result = swaks(relay, SENDER, EVERYONE, INVITATION)

    assert result.returncode == 0, result.stdout
    assert len(upstream.messages) == 1
    received = upstream.messages[0]
    assert sorted(received.rcpt_tos) == sorted(EVERYONE)
    assert b"\r\nTo: undisclosed-recipients:;\r\n" in received.data
    assert b"\r\nCc:" not in received.data
    assert b"\r\nBcc:" not in received.data


def test_reject_action_shows_the_client_the_550_text(serve_relay, swaks, upstream: Upstream) -> None:
    relay = serve_relay(RELAY_POLICY_ACTION="reject", **upstream_settings(upstream))

    result = swaks(relay, SENDER, EVERYONE, INVITATION)

    assert result.returncode == 26  # swaks: the server did not accept the message after DATA
    assert "<** 550 5.7.1 Not sent: this message would show 5 recipients' addresses to each other" in result.stdout
    assert "Put the recipients in Bcc instead" in result.stdout
    assert upstream.messages == []


def test_starttls_and_auth_to_the_upstream(serve_relay, swaks, make_upstream, tmp_path: Path) -> None:
    upstream = make_upstream(tls="starttls", credentials=CREDENTIALS)
    upstream.ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    relay = serve_relay(
        RELAY_UPSTREAM_CA_FILE=str(tmp_path / "ca.pem"),
        RELAY_UPSTREAM_USERNAME=CREDENTIALS[0],
        RELAY_UPSTREAM_PASSWORD=CREDENTIALS[1],
        **upstream_settings(upstream, tls="starttls"),
    )

    result = swaks(relay, SENDER, EVERYONE, INVITATION)

    assert result.returncode == 0, result.stdout
    assert_private_copies([m.data for m in upstream.messages], [m.rcpt_tos for m in upstream.messages])
    assert CREDENTIALS[1] not in relay.log_path.read_text()


def test_upstream_5xx_reaches_the_client_with_the_refused_recipient(serve_relay, swaks, upstream: Upstream) -> None:
    upstream.handler.rcpt_replies["bob@two.test"] = "550 5.1.1 No such user here"
    relay = serve_relay(**upstream_settings(upstream))

    result = swaks(relay, SENDER, EVERYONE, INVITATION)

    assert result.returncode == 26
    assert "<** 550 5.1.1 No such user here (not delivered to: bob@two.test;" in result.stdout
    assert len(upstream.messages) == 5


def test_upstream_down_gives_the_client_451(serve_relay, swaks) -> None:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        closed_port = probe.getsockname()[1]
    relay = serve_relay(RELAY_UPSTREAM_HOST=LOOPBACK, RELAY_UPSTREAM_PORT=str(closed_port), RELAY_UPSTREAM_TLS="none")

    result = swaks(relay, SENDER, EVERYONE, INVITATION)

    assert result.returncode == 26
    assert f"<** 451 4.4.1 cannot reach upstream 127.0.0.1:{closed_port}" in result.stdout


def test_quick_start_without_upstream_writes_copies_to_the_outbox(serve_relay, swaks, tmp_path: Path) -> None:
    workdir = tmp_path / "quick-start"
    workdir.mkdir()
    # The quick start runs on the defaults, so delivery goes through the spool (hybrid mode).
    relay = serve_relay(cwd=workdir, RELAY_DELIVERY_MODE="hybrid")

    result = swaks(relay, SENDER, EVERYONE, INVITATION)

    assert result.returncode == 0, result.stdout
    assert (workdir / "spool" / "spool.db").is_file()
    outbox = workdir / "outbox"
    names = sorted(os.listdir(outbox))
    assert len(names) == 6
    assert all(name.endswith(".eml") and not name.startswith(".") for name in names)
    copies = [(outbox / name).read_bytes() for name in names]
    shown = [[a.addr_spec for a in message_from_bytes(c, policy=default)["To"].addresses] for c in copies]
    assert_private_copies(copies, shown)
    started = next(e for e in relay.log_events() if e["event"] == "relay.started")
    assert started["destination"] == f"outbox folder {outbox.resolve()}"
