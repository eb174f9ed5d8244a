"""Broken and hostile input: always a clear RelayError or a safe result, never a crash or a hang."""

from __future__ import annotations

import pytest

from relay.core.addresses import mentioned_addresses, parse_address_list
from relay.core.message import parse_message
from relay.core.policy import Action
from relay.core.replies import RelayError
from tests.support.mailkit import SENDER, addresses_in, copy_for, message, run

ANN, BOB = "ann@one.test", "bob@two.test"


def refusal(data: bytes, rcpts: list[str] | None = None) -> RelayError:
    with pytest.raises(RelayError) as refused:
        run(data, rcpts or [ANN, BOB])
    return refused.value


def test_a_line_without_colon_above_recipient_fields_is_refused() -> None:
    reply = refusal(message(f"From: {SENDER}", "this line has no colon", f"To: {ANN}, {BOB}"))
    assert (reply.code, reply.enhanced) == (550, "5.6.0")
    assert "no colon" in reply.text


def test_a_line_without_colon_and_no_blank_line_starts_the_body() -> None:
    data = f"From: {SENDER}\r\nTo: {ANN}, {BOB}\r\nThis is already the body.\r\n".encode()
    prepared = run(data, [ANN, BOB])
    copy = copy_for(prepared, ANN)
    assert copy.headers.endswith(b"\r\n\r\n")
    assert copy.body == b"This is already the body.\r\n"
    assert BOB.encode() not in copy.headers


@pytest.mark.parametrize(("bad", "words"), [(b"Subject: a\x00b", "NUL"), (b"Subject: a\rb", "carriage return")])
def test_nul_and_bare_cr_in_headers_are_refused(bad: bytes, words: str) -> None:
    reply = refusal(message(f"From: {SENDER}", bad, f"To: {ANN}, {BOB}"))
    assert (reply.code, reply.enhanced) == (550, "5.6.0")
    assert words in reply.text


def test_a_folded_first_line_is_refused() -> None:
    assert refusal(message(" folded: first", f"To: {ANN}")).code == 550


def test_8bit_headers_without_smtputf8_pass_as_they_came() -> None:
    data = message(f"From: {SENDER}", b"To: J\xf6rg <ann@one.test>, bob@two.test", b"Subject: Gr\xfc\xdfe")
    prepared = run(data, [ANN, BOB])
    ann_copy = copy_for(prepared, ANN)
    # A Latin-1 display name cannot be re-encoded without guessing its charset: the address stands alone.
    assert b"To: ann@one.test\r\n" in ann_copy.headers
    assert b"Subject: Gr\xfc\xdfe\r\n" in ann_copy.headers
    assert BOB.encode() not in ann_copy.headers


@pytest.mark.parametrize("eol", [b"\n", b"\r\r\n", b"\r\r\r\n"], ids=["LF", "CR CR LF", "CR CR CR LF"])
def test_lf_and_cr_cr_lf_line_endings_are_read_as_line_ends_and_sent_as_crlf(eol: bytes) -> None:
    data = message(f"From: {SENDER}", f"To: {ANN}, {BOB}", "Subject: t", body=b"line" + eol, eol=eol)
    prepared = run(data, [ANN, BOB])
    copy = copy_for(prepared, ANN)
    assert addresses_in(copy, "To") == [ANN]
    assert b"\r\nSubject: t\r\n" in copy.headers
    assert copy.body == b"line\r\n"
    assert b"\r\r" not in copy.headers + copy.body


def test_mixed_lf_and_crlf_header_lines_are_all_header_fields() -> None:
    data = f"From: {SENDER}\nTo: {ANN},\r\n {BOB}\nSubject: t\r\n\nbody\r\n".encode()
    copy = copy_for(run(data, [ANN, BOB]), ANN)
    assert addresses_in(copy, "To") == [ANN]
    assert BOB.encode() not in copy.headers + copy.body


@pytest.mark.parametrize(
    "data",
    [
        f"From: {SENDER}\rTo: {ANN}, {BOB}\r\rbody\r\n".encode(),  # CR-only line endings
        f"From: {SENDER}\r\n\rTo: {ANN}, {BOB}\r\n\r\nbody\r\n".encode(),  # a lone CR as the blank line
    ],
    ids=["CR only", "lone CR blank line"],
)
def test_a_lone_cr_in_the_header_section_is_refused_not_read_as_a_line_end(data: bytes) -> None:
    reply = refusal(data)
    assert (reply.code, reply.enhanced) == (550, "5.6.0")
    assert "bare carriage return" in reply.text


def test_a_lone_cr_in_the_body_becomes_crlf() -> None:
    copy = copy_for(run(message(f"From: {SENDER}", f"To: {ANN}, {BOB}", body=b"a\rb\r\n"), [ANN, BOB]), ANN)
    assert copy.body == b"a\r\nb\r\n"


def test_a_header_section_over_1_mb_is_refused() -> None:
    huge = "X-Filler: " + "x" * 1_100_000
    reply = refusal(message(f"From: {SENDER}", huge, f"To: {ANN}, {BOB}"))
    assert (reply.code, reply.enhanced) == (552, "5.3.4")


def test_a_message_of_headers_only_is_handled() -> None:
    prepared = run(f"From: {SENDER}\r\nTo: {ANN}, {BOB}\r\n".encode(), [ANN, BOB])
    assert prepared.decision.action is Action.SPLIT
    assert all(copy.body == b"" for copy in prepared.copies)


@pytest.mark.parametrize(
    "value",
    [
        '"' * 50_000,
        "(" * 50_000,
        "\\" * 50_000,
        '"\\"' * 20_000,
        "<" * 50_000,
        "@" * 50_000,
        "a@" * 25_000,
        "=?utf-8?q?" * 10_000,
        "[" * 50_000,
        ":" * 50_000,
        "a@b" + ":" * 50_000,
        "x. " * 30_000 + "@b",
    ],
)
def test_pathological_address_fields_finish(value: str) -> None:
    # The standard library parser raises RecursionError on the nested comments and takes minutes on the quotes.
    parse_address_list(value)
    mentioned_addresses(value)
    try:
        run(message(f"From: {SENDER}", f"To: {ANN}, {BOB}", f"Cc: {value}"), [ANN, BOB])
    except RelayError as refusal:
        assert (refusal.code, refusal.enhanced) == (554, "5.6.0")  # a line over 998 octets with no space in it


def test_a_thousand_recipients_split_into_a_thousand_private_copies() -> None:
    recipients = [f"r{i}@d{i % 37}.test" for i in range(1000)]
    to_field = ",\r\n ".join(recipients)
    prepared = run(message(f"From: {SENDER}", f"To: {to_field}", f"Reply-To: {to_field}"), recipients)
    assert len(prepared.copies) == 1000
    last = copy_for(prepared, recipients[-1])
    assert addresses_in(last, "To") == [recipients[-1]]
    assert addresses_in(last, "Reply-To") == [recipients[-1]]


def test_parse_message_keeps_every_byte_of_the_fields() -> None:
    data = b"From: a@b.test\r\nTo: x@y.test,\r\n\tz@w.test\r\n\r\nbody"
    parsed = parse_message(data)
    assert b"".join(f.raw for f in parsed.fields) + b"\r\n" + parsed.body == data
