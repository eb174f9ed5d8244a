"""Odd line endings and over-long lines, sent over SMTP to a real relay and a strict aiosmtpd upstream.

The upstream keeps aiosmtpd's default line length limit (1,001 octets with the CRLF and a stuffed dot), as
strict providers do: a copy with a line over 998 octets would be refused there with 500.
"""

from __future__ import annotations

import smtplib
from email import message_from_bytes
from email.policy import default

import pytest

from tests.conftest import Upstream
from tests.support.spool import wait_until

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


LONG_WORDS = " ".join(f"w{n}" for n in range(1500))  # 7,000 octets, with spaces to fold at
LONG_BODY_LINE = ("Grüße, " * 700).encode()  # one 6,300-octet line of UTF-8 text
LONG_LINE_CASES = {
    "body": b"From: s@example.org\r\nTo: a@x.example, b@y.example\r\nSubject: t\r\n\r\n" + LONG_BODY_LINE + b"\r\n",
    "header": f"From: s@example.org\r\nTo: a@x.example, b@y.example\r\nSubject: {LONG_WORDS}\r\n\r\nhi\r\n".encode(),
    "unfoldable header": b"From: s@example.org\r\nTo: a@x.example, b@y.example\r\nX-Token: "
    + b"x" * 3000
    + b"\r\n\r\nhi\r\n",
    "signed": (
        b"From: s@example.org\r\nTo: a@x.example, b@y.example\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/signed; boundary="b"; protocol="application/pgp-signature"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\n" + LONG_BODY_LINE + b"\r\n--b\r\n"
        b"Content-Type: application/pgp-signature\r\n\r\nsig\r\n--b--\r\n"
    ),
}


@pytest.mark.parametrize("mode", ["direct", "hybrid", "queue"])
@pytest.mark.parametrize("case", LONG_LINE_CASES)
def test_long_lines_are_delivered_within_998_octets_with_their_text_or_refused_before_250(
    start_relay, upstream: Upstream, mode: str, case: str
) -> None:
    relay = start_relay(upstream, RELAY_DELIVERY_MODE=mode)
    code, text = send_raw(relay, ["a@x.example", "b@y.example"], LONG_LINE_CASES[case])
    if case in ("unfoldable header", "signed"):
        assert (code, text[:5]) == (554, b"5.6.0"), text
        assert b"998" in text
        assert upstream.messages == [] and list(relay.outbox.glob("*")) == []
        return
    assert code == 250, text
    wait_until(lambda: len(upstream.messages) == 2)
    for received in upstream.messages:
        assert max(len(line) for line in received.data.split(b"\r\n")) <= 998
        copy = message_from_bytes(received.data, policy=default)
        if case == "body":
            assert copy["Content-Transfer-Encoding"] == "quoted-printable"
            assert copy.get_payload(decode=True) == LONG_BODY_LINE + b"\r\n"
        else:
            assert str(copy["Subject"]) == LONG_WORDS
