"""Odd line endings and over-long lines, sent over SMTP to a real relay and a strict aiosmtpd upstream.

The upstream keeps aiosmtpd's default line length limit (1,001 octets with the CRLF and a stuffed dot), as
strict providers do: a copy with a line over 998 octets would be refused there with 500.
"""

from __future__ import annotations

import smtplib

from tests.conftest import Upstream

SENDER = "s@example.org"


def send_raw(relay, recipients: list[str], data: bytes) -> tuple[int, bytes]:
    """DATA exactly as given: smtplib's data() would turn every bare CR and LF into CRLF first."""
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo()
        client.mail(SENDER)
        for recipient in recipients:
            assert client.rcpt(recipient)[0] == 250
        assert client.docmd("DATA")[0] == 354
        client.send(data + b".\r\n")
        return client.getreply()


def test_cr_cr_lf_header_lines_stay_header_fields_and_the_copies_are_split(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream)
    data = b"From: s@example.org\r\r\nTo: a@x.example, b@y.example\r\r\nSubject: t\r\r\n\r\r\nhello\r\r\n"
    code, text = send_raw(relay, ["a@x.example", "b@y.example"], data)
    assert code == 250, text
    assert sorted(m.rcpt_tos for m in upstream.messages) == [["a@x.example"], ["b@y.example"]]
    for received in upstream.messages:
        [own] = received.rcpt_tos
        other = b"b@y.example" if own == "a@x.example" else b"a@x.example"
        assert other not in received.data
        headers, _, body = received.data.partition(b"\r\n\r\n")
        assert b"\r\nSubject: t\r\n" in headers + b"\r\n"
        assert b"\r\nTo: " + own.encode() in headers
        assert body == b"hello\r\n"
