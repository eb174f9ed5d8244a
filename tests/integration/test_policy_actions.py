"""Each policy action, end to end: smtplib -> in-process relay -> a recording aiosmtpd upstream."""

from __future__ import annotations

import smtplib
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default

import pytest

from tests.conftest import Upstream

SENDER = "coach@coaching.test"
# Non-ASCII bytes, a leading dot (dot-stuffed on the wire) and a bare trailing space: the body must
# reach the upstream byte for byte.
BODY = "See you on Saturday.\r\n.dot line\r\nGrüße, Café \r\n".encode()
HEADERS = (
    b"From: Coach <coach@coaching.test>\r\n"
    b"To: Ann <ann@one.test>, bob@two.test, Cy <cy@three.test>\r\n"
    b"Cc: dee@four.test, Eve <eve@five.test>\r\n"
    b"Bcc: Fay <fay@six.test>\r\n"
    b"Subject: Workshop\r\n"
    b"Message-ID: <workshop-1@coaching.test>\r\n"
    b"Date: Sat, 21 Nov 2026 10:00:00 +0000\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
)
INVITATION = HEADERS + b"\r\n" + BODY
VISIBLE = ["ann@one.test", "bob@two.test", "cy@three.test", "dee@four.test", "eve@five.test"]
EVERYONE = [*VISIBLE, "fay@six.test"]


def send(relay, message: bytes, recipients: list[str], sender: str = SENDER) -> dict:
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        return client.sendmail(sender, recipients, message, mail_options=["BODY=8BITMIME"])


def parse(data: bytes) -> EmailMessage:
    message = message_from_bytes(data, policy=default)
    assert isinstance(message, EmailMessage)
    return message


def shown(message: EmailMessage, name: str) -> list[str]:
    header = message[name]
    return [] if header is None else [a.addr_spec for a in header.addresses]


def split_header_body(data: bytes) -> tuple[bytes, bytes]:
    headers, separator, body = data.partition(b"\r\n\r\n")
    assert separator
    return headers + b"\r\n", body


def without_received(headers: bytes) -> bytes:
    """The header section minus the relay's own Received field (the first field, folded)."""
    assert headers.startswith(b"Received: ")
    lines = headers.split(b"\r\n")
    index = 1
    while lines[index].startswith((b" ", b"\t")):
        index += 1
    return b"\r\n".join(lines[index:])


def test_split_gives_every_recipient_of_to_cc_and_bcc_a_copy_showing_only_them(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_POLICY_ACTION="split")

    assert send(relay, INVITATION, EVERYONE) == {}

    assert sorted(r for m in upstream.messages for r in m.rcpt_tos) == sorted(EVERYONE)
    for received in upstream.messages:
        assert received.mail_from == SENDER
        assert len(received.rcpt_tos) == 1
        headers, body = split_header_body(received.data)
        assert body == BODY
        message = parse(received.data)
        assert shown(message, "To") == received.rcpt_tos
        assert message["Cc"] is None
        assert message["Bcc"] is None
        assert b"bcc:" not in headers.lower()
        for other in set(EVERYONE) - set(received.rcpt_tos):
            assert other.encode() not in headers
        # Replies thread with the sender's own copy.
        assert message["Message-ID"] == "<workshop-1@coaching.test>"
    ann = next(m for m in upstream.messages if m.rcpt_tos == ["ann@one.test"])
    assert b"\r\nTo: Ann <ann@one.test>\r\n" in ann.data


def test_bcc_action_sends_one_undisclosed_copy(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_POLICY_ACTION="bcc")

    assert send(relay, INVITATION, EVERYONE) == {}

    assert len(upstream.messages) == 1
    received = upstream.messages[0]
    assert sorted(received.rcpt_tos) == sorted(EVERYONE)
    headers, body = split_header_body(received.data)
    assert body == BODY
    assert b"\r\nTo: undisclosed-recipients:;\r\n" in headers
    message = parse(received.data)
    assert message["Cc"] is None
    assert message["Bcc"] is None
    assert not any(address.encode() in headers for address in EVERYONE)


def test_reject_action_refuses_with_550_and_says_how_to_send_instead(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_POLICY_ACTION="reject")

    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(relay, INVITATION, EVERYONE)

    assert refused.value.smtp_code == 550
    text = refused.value.smtp_error.decode()
    assert text.startswith("5.7.1 ")
    assert "5 recipients' addresses" in text
    assert "To and Cc" in text
    assert "Bcc" in text
    assert upstream.messages == []


def test_pass_action_forwards_the_message_as_written(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_POLICY_ACTION="pass")
    message = HEADERS.replace(b"Bcc: Fay <fay@six.test>\r\n", b"") + b"\r\n" + BODY

    assert send(relay, message, VISIBLE) == {}

    assert len(upstream.messages) == 1
    received = upstream.messages[0]
    assert received.rcpt_tos == VISIBLE
    assert without_received(received.data) == message


def test_pass_action_still_removes_bcc(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_POLICY_ACTION="pass")

    assert send(relay, INVITATION, EVERYONE) == {}

    assert len(upstream.messages) == 1
    assert without_received(upstream.messages[0].data) == INVITATION.replace(b"Bcc: Fay <fay@six.test>\r\n", b"")


def test_message_that_exposes_nobody_goes_through_unchanged_minus_bcc(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_POLICY_ACTION="split")
    # The classic safe pattern: the sender in To, everyone else in Bcc.
    message = (
        b"From: Coach <coach@coaching.test>\r\n"
        b"To: Coach <coach@coaching.test>\r\n"
        b"Bcc: ann@one.test, bob@two.test\r\n"
        b"Subject: Newsletter\r\n"
        b"Message-ID: <news-1@coaching.test>\r\n"
        b"Date: Sat, 21 Nov 2026 10:00:00 +0000\r\n"
        b"\r\n" + BODY
    )

    assert send(relay, message, ["ann@one.test", "bob@two.test"]) == {}

    assert len(upstream.messages) == 1
    received = upstream.messages[0]
    assert received.rcpt_tos == ["ann@one.test", "bob@two.test"]
    assert without_received(received.data) == message.replace(b"Bcc: ann@one.test, bob@two.test\r\n", b"")


def test_internal_domains_get_the_message_as_written_and_are_never_hidden(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_POLICY_INTERNAL_DOMAINS="coaching.test, staff.test")
    message = (
        b"From: coach@coaching.test\r\n"
        b"To: ann@one.test, bob@two.test\r\n"
        b"Cc: Kim <kim@coaching.test>, lee@mail.staff.test\r\n"
        b"Subject: Plans\r\n"
        b"\r\n" + BODY
    )
    recipients = ["ann@one.test", "bob@two.test", "kim@coaching.test", "lee@mail.staff.test"]

    assert send(relay, message, recipients) == {}

    by_recipients = {tuple(m.rcpt_tos): parse(m.data) for m in upstream.messages}
    assert sorted(by_recipients) == [("ann@one.test",), ("bob@two.test",), ("kim@coaching.test", "lee@mail.staff.test")]
    colleagues = by_recipients[("kim@coaching.test", "lee@mail.staff.test")]
    assert shown(colleagues, "To") == ["ann@one.test", "bob@two.test"]
    assert shown(colleagues, "Cc") == ["kim@coaching.test", "lee@mail.staff.test"]
    ann = by_recipients[("ann@one.test",)]
    assert shown(ann, "To") == ["ann@one.test"]
    assert ann["Cc"] is None


def test_always_visible_addresses_stay_in_every_copy(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_POLICY_ALWAYS_VISIBLE="assistant@coaching.test")
    message = (
        b"From: coach@coaching.test\r\n"
        b"To: Ann <ann@one.test>, bob@two.test\r\n"
        b"Cc: Assistant <assistant@coaching.test>\r\n"
        b"Subject: Plans\r\n"
        b"\r\n" + BODY
    )

    assert send(relay, message, ["ann@one.test", "bob@two.test", "assistant@coaching.test"]) == {}

    by_recipients = {tuple(m.rcpt_tos): parse(m.data) for m in upstream.messages}
    assert sorted(by_recipients) == [("ann@one.test",), ("assistant@coaching.test",), ("bob@two.test",)]
    for recipient in ("ann@one.test", "bob@two.test"):
        copy = by_recipients[(recipient,)]
        assert shown(copy, "To") == [recipient]
        assert shown(copy, "Cc") == ["assistant@coaching.test"]
    assistant = by_recipients[("assistant@coaching.test",)]
    assert shown(assistant, "To") == ["ann@one.test", "bob@two.test"]
