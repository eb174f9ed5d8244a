"""wire_form: the DATA form of a message part, made once per message and shared by its copies."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from relay.upstream.transaction import wire_form

_LINE_ENDINGS = re.compile(rb"(?:\r\n|\n|\r(?!\n))")


def aiosmtplib_form(data: bytes) -> bytes:
    """What aiosmtplib's sendmail sends for a whole message (its normalise and dot-stuff steps)."""
    data = _LINE_ENDINGS.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return re.sub(rb"(?m)^\.", b"..", data)


def test_a_body_already_in_wire_form_is_the_same_object() -> None:
    body = b"hello\r\nworld\r\n" * 100
    assert wire_form(body) is body


def test_leading_dots_are_doubled_and_bare_line_endings_become_crlf() -> None:
    assert wire_form(b".a\n..b\rc.\r\n.") == b"..a\r\n...b\r\nc.\r\n..\r\n"


def test_an_empty_part_stays_empty() -> None:
    assert wire_form(b"") == b""


line_noise = st.lists(st.sampled_from([b".", b"\r", b"\n", b"a", b"\r\n"]), max_size=60).map(b"".join)


@given(st.binary(max_size=300), line_noise)
def test_headers_then_body_match_aiosmtplib_on_the_whole_message(noise: bytes, shaped: bytes) -> None:
    headers = b"Subject: x\r\n\r\n"
    assert wire_form(headers) + wire_form(noise + shaped) == aiosmtplib_form(headers + noise + shaped)
