"""The SMTP side of the relay: EHLO, pipelining, envelope validation, limits and allowed networks."""

from __future__ import annotations

import smtplib
import socket

import pytest

from tests.conftest import LOOPBACK, Upstream

MESSAGE = b"From: coach@coaching.test\r\nTo: ann@one.test, bob@two.test\r\nSubject: Plans\r\n\r\nHello.\r\n"


def read_reply(stream) -> list[bytes]:
    """The lines of one (possibly multi-line) SMTP reply."""
    lines = []
    while True:
        line = stream.readline()
        assert line.endswith(b"\r\n"), f"connection ended mid-reply: {[*lines, line]!r}"
        lines.append(line)
        if line[3:4] == b" ":
            return lines


def test_ehlo_advertises_size_8bitmime_smtputf8_and_pipelining(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_LISTEN_MAX_MESSAGE_SIZE="100000")
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        code, _ = client.ehlo("client.test")
        assert code == 250
        assert client.esmtp_features["size"] == "100000"
        for extension in ("8bitmime", "smtputf8", "pipelining"):
            assert extension in client.esmtp_features


def test_pipelined_transaction_gets_every_reply_in_order(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_DELIVERY_MODE="direct")
    with socket.create_connection((relay.host, relay.port), timeout=10) as raw, raw.makefile("rb") as replies:
        assert read_reply(replies)[0].startswith(b"220 ")
        raw.sendall(b"EHLO client.test\r\n")
        assert b"250-PIPELINING\r\n" in read_reply(replies)

        raw.sendall(b"MAIL FROM:<coach@coaching.test>\r\nRCPT TO:<ann@one.test>\r\nRCPT TO:<bob@two.test>\r\nDATA\r\n")
        assert [read_reply(replies)[0][:4] for _ in range(4)] == [b"250 ", b"250 ", b"250 ", b"354 "]
        raw.sendall(MESSAGE + b".\r\nQUIT\r\n")
        assert read_reply(replies)[0].startswith(b"250 2.0.0 OK: relayed as 2 copies")
        assert read_reply(replies)[0].startswith(b"221 ")

    assert sorted(r for m in upstream.messages for r in m.rcpt_tos) == ["ann@one.test", "bob@two.test"]


@pytest.mark.parametrize(
    "command",
    [
        "MAIL FROM:<not-an-address>",
        "MAIL FROM:<coach@coaching.test, ann@one.test>",
        "MAIL FROM:<coach@coaching.test>> AUTH=<evil@evil.test>",
        "MAIL FROM:<coach@@coaching.test>",
        "MAIL FROM:coach",
        "MAIL FROM:",
    ],
)
def test_malformed_sender_is_refused(start_relay, upstream: Upstream, command: str) -> None:
    relay = start_relay(upstream)
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.docmd(command)[0] in (501, 553)
        # The session goes on: a well-formed sender is still accepted.
        assert client.docmd("MAIL FROM:<coach@coaching.test>")[0] == 250


@pytest.mark.parametrize(
    "address",
    [
        "<ann@one.test, bob@two.test>",
        "<ann@one.test> <bob@two.test>",
        "<ann@one.test>> AUTH=<evil@evil.test>",
        "<ann@one.test\tbob@two.test>",
        "<ann>",
        "<ann@>",
        "<ann@one..test>",
        "<>",
    ],
)
def test_malformed_recipient_is_refused(start_relay, upstream: Upstream, address: str) -> None:
    relay = start_relay(upstream, RELAY_DELIVERY_MODE="direct")
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.docmd("MAIL FROM:<coach@coaching.test>")[0] == 250
        assert client.docmd(f"RCPT TO:{address}")[0] in (501, 553)
        assert client.docmd("RCPT TO:<ann@one.test>")[0] == 250
        assert client.docmd("DATA")[0] == 354
        client.send(MESSAGE + b".\r\n")
        assert client.getreply()[0] == 250

    # Only the well-formed recipient reached the upstream, nothing of the refused address.
    assert [m.rcpt_tos for m in upstream.messages] == [["ann@one.test"]]


def test_null_sender_is_accepted_and_forwarded(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_DELIVERY_MODE="direct")
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        assert client.sendmail("<>", ["ann@one.test", "bob@two.test"], MESSAGE) == {}

    assert len(upstream.messages) == 2
    assert [m.mail_from for m in upstream.messages] == ["<>", "<>"]


def test_message_declared_too_big_is_refused_at_mail(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_LISTEN_MAX_MESSAGE_SIZE="2048")
    big = MESSAGE + b"x" * 3000 + b"\r\n"
    with (
        smtplib.SMTP(relay.host, relay.port, timeout=10) as client,
        pytest.raises(smtplib.SMTPSenderRefused) as refused,
    ):
        client.sendmail("coach@coaching.test", ["ann@one.test"], big)

    assert refused.value.smtp_code == 552
    assert refused.value.smtp_error.decode() == "5.3.4 Message too big: this relay takes at most 2048 bytes per message"
    assert upstream.messages == []


def test_message_too_big_without_size_declaration_is_refused_after_data(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_LISTEN_MAX_MESSAGE_SIZE="2048")
    big = MESSAGE + b"x" * 3000 + b"\r\n"
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.docmd("MAIL FROM:<coach@coaching.test>")[0] == 250
        assert client.docmd("RCPT TO:<ann@one.test>")[0] == 250
        assert client.docmd("DATA")[0] == 354
        client.send(big + b".\r\n")
        code, text = client.getreply()

    assert code == 552
    assert text.decode() == "5.3.4 Message too big: this relay takes at most 2048 bytes per message"
    assert upstream.messages == []


def test_recipients_over_the_limit_get_452_and_the_rest_is_delivered(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_DELIVERY_MODE="direct", RELAY_LISTEN_MAX_RECIPIENTS="2")
    message = MESSAGE.replace(b"bob@two.test", b"bob@two.test, cy@three.test")
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        refused = client.sendmail("coach@coaching.test", ["ann@one.test", "bob@two.test", "cy@three.test"], message)

    assert list(refused) == ["cy@three.test"]
    code, text = refused["cy@three.test"]
    assert code == 452
    assert text.decode().startswith("4.5.3 Too many recipients: this relay takes at most 2 per message")
    assert sorted(r for m in upstream.messages for r in m.rcpt_tos) == ["ann@one.test", "bob@two.test"]


def test_client_outside_allowed_networks_gets_554_and_is_disconnected(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_DELIVERY_MODE="direct", RELAY_LISTEN_ALLOWED_NETWORKS="127.0.0.1/32")

    with (
        socket.create_connection((relay.host, relay.port), timeout=10, source_address=("127.0.0.2", 0)) as outsider,
        outsider.makefile("rb") as replies,
    ):
        greeting = replies.readline()
        assert greeting.startswith(b"554 5.7.1 ")
        assert b"listen.allowed_networks" in greeting
        assert replies.readline() == b""

    with (
        pytest.raises(smtplib.SMTPConnectError) as refused,
        smtplib.SMTP(relay.host, relay.port, timeout=10, source_address=("127.0.0.2", 0)),
    ):
        pass
    assert refused.value.smtp_code == 554

    with smtplib.SMTP(relay.host, relay.port, timeout=10, source_address=(LOOPBACK, 0)) as insider:
        assert insider.sendmail("coach@coaching.test", ["ann@one.test"], MESSAGE) == {}
    assert len(upstream.messages) == 1
