"""Lines over 998 octets: folded or re-encoded with their text kept, or refused with a 554 before 250."""

from __future__ import annotations

import base64
import quopri
from email import message_from_bytes
from email.message import Message
from email.policy import compat32

import pytest

from relay.core.line_length import longest_line
from relay.core.replies import RelayError
from tests.support.mailkit import SENDER, copy_for, message, run

ANN, BOB = "ann@one.test", "bob@two.test"
LONG_TEXT = ("Grüße " * 400).encode() + b"=tail \t"  # 2,800 octets, with '=' and trailing whitespace
FROM_TO = (f"From: {SENDER}", f"To: {ANN}, {BOB}")


def sent(data: bytes) -> Message:
    """Ann's copy as the receiver reads it, after checking that no line in it is over 998 octets."""
    copy = copy_for(run(data, [ANN, BOB]), ANN)
    assert longest_line(copy.headers + copy.body) <= 998
    return message_from_bytes(copy.headers + copy.body, policy=compat32)


def multipart(subtype: str, *parts: bytes) -> bytes:
    body = b"".join(b"--b1\r\n" + part + b"\r\n" for part in parts) + b"--b1--\r\n"
    return message(*FROM_TO, "MIME-Version: 1.0", f'Content-Type: multipart/{subtype}; boundary="b1"', body=body)


def test_a_long_header_line_is_folded_at_whitespace_and_unfolds_to_the_same_value() -> None:
    subject = " ".join(["word"] * 600)
    received = sent(message(*FROM_TO, f"Subject: {subject}"))
    assert received["Subject"].replace("\r\n", "") == subject


def test_a_long_header_line_without_whitespace_is_refused() -> None:
    with pytest.raises(RelayError) as refused:
        run(message(*FROM_TO, "X-Token: " + "x" * 1500), [ANN, BOB])
    assert (refused.value.code, refused.value.enhanced) == (554, "5.6.0")
    assert "X-Token" in refused.value.text and "998" in refused.value.text


def test_a_long_line_in_a_plain_body_is_sent_as_quoted_printable_with_mime_headers() -> None:
    body = b"short\r\n" + LONG_TEXT + b"\r\nend\r\n"
    received = sent(message(*FROM_TO, body=body))
    assert received["MIME-Version"] == "1.0"
    assert received["Content-Transfer-Encoding"] == "quoted-printable"
    assert received.get_payload(decode=True) == body


def test_a_copy_sent_as_written_loses_its_dkim_signature_when_its_body_is_re_encoded() -> None:
    data = message(f"From: {SENDER}", f"To: {ANN}", "DKIM-Signature: v=1; d=coaching.test; b=abc", body=LONG_TEXT)
    [copy] = run(data, [ANN]).copies
    assert copy.kind == "original"
    assert b"DKIM-Signature" not in copy.headers  # it signed the body as it was


def test_only_the_part_with_a_long_line_is_re_encoded_and_all_copies_share_it() -> None:
    short_part = b"Content-Type: text/plain\r\n\r\nshort part\r\n"
    long_part = b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + LONG_TEXT
    data = multipart("alternative", short_part, long_part)
    prepared = run(data, [ANN, BOB])
    assert prepared.copies[0].body is prepared.copies[1].body
    received = sent(data)
    first, second = received.get_payload()
    assert first.get_payload(decode=True) == b"short part\r\n" and "Content-Transfer-Encoding" not in first
    assert second["Content-Transfer-Encoding"] == "quoted-printable"
    assert second.get_payload(decode=True) == LONG_TEXT


def test_long_base64_lines_are_rewrapped_at_76() -> None:
    payload = bytes(range(256)) * 10
    part = b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(payload)
    received = sent(multipart("mixed", b"Content-Type: text/plain\r\n\r\nsee attached", part))
    attachment = received.get_payload()[1]
    assert attachment.get_payload(decode=True) == payload
    assert max(len(line) for line in attachment.get_payload().splitlines()) == 76


def test_a_long_line_in_an_attached_message_is_re_encoded_inside_it() -> None:
    inner = b"From: x@y.test\r\nSubject: fwd\r\n\r\n" + LONG_TEXT + b"\r\n"
    received = sent(
        multipart(
            "mixed", b"Content-Type: text/plain\r\n\r\nforwarded", b"Content-Type: message/rfc822\r\n\r\n" + inner
        )
    )
    [attached] = received.get_payload()[1].get_payload()
    assert attached["Content-Transfer-Encoding"] == "quoted-printable"
    assert quopri.decodestring(attached.get_payload().encode()) == LONG_TEXT + b"\r\n"


@pytest.mark.parametrize(
    "data",
    [
        multipart(
            "signed",
            b"Content-Type: text/plain\r\n\r\n" + LONG_TEXT,
            b"Content-Type: application/pgp-signature\r\n\r\nsig",
        ),
        message(*FROM_TO, "MIME-Version: 1.0", "Content-Transfer-Encoding: binary", body=LONG_TEXT),
    ],
    ids=["signed", "binary"],
)
def test_a_long_line_that_cannot_be_re_encoded_is_refused(data: bytes) -> None:
    with pytest.raises(RelayError) as refused:
        run(data, [ANN, BOB])
    assert (refused.value.code, refused.value.enhanced) == (554, "5.6.0")
    assert "998" in refused.value.text
