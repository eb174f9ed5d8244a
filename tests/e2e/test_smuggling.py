"""SMTP smuggling (SEC Consult, December 2023): only <CRLF>.<CRLF> ends a message, and every copy leaves
with CRLF line endings only, so no upstream, however lax, can be made to read a second message inside one.

A raw socket sends exactly the bytes under test; the upstream must receive exactly the message the
client meant, with the would-be smuggled commands as plain text inside it.
"""

from __future__ import annotations

import socket

import pytest

from tests.conftest import Upstream

SMUGGLED = (
    b"MAIL FROM:<ceo@bank.test>\r\n"
    b"RCPT TO:<victim@one.test>\r\n"
    b"DATA\r\n"
    b"From: ceo@bank.test\r\n"
    b"To: victim@one.test\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"Wire the money.\r\n"
)
# The end-of-data look-alikes that some servers accepted, and their mirror images.
SEQUENCES = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CR": b"\r.\r",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "CRLF.LF": b"\r\n.\n",
    "CR.LF": b"\r.\n",
    "LF.CR": b"\n.\r",
    "LF.LF-bare-lines": b"\n.\n",
}


def converse(host: str, port: int, data: bytes) -> list[bytes]:
    """One transaction with exactly these DATA bytes (ending in CRLF), then QUIT; every reply, in order."""
    assert data.endswith(b"\r\n")
    replies = []
    with socket.create_connection((host, port), timeout=30) as sock:
        stream = sock.makefile("rb")

        def reply() -> bytes:
            line = stream.readline()
            while line[3:4] == b"-":
                line = stream.readline()
            return line

        reply()
        for command in (
            b"EHLO client.test\r\n",
            b"MAIL FROM:<sender@office.test>\r\n",
            b"RCPT TO:<ann@one.test>\r\n",
            b"DATA\r\n",
        ):
            sock.sendall(command)
            replies.append(reply())
        sock.sendall(data + b".\r\nQUIT\r\n")
        while not replies[-1].startswith(b"221 "):
            replies.append(reply())
    return replies


def smuggling_message(name: str, sequence: bytes) -> bytes:
    # The bare-lines variant writes the smuggled commands with bare LFs too, up to the real end.
    smuggled = SMUGGLED.replace(b"\r\n", b"\n")[:-1] + b"\r\n" if name.endswith("bare-lines") else SMUGGLED
    return b"From: sender@office.test\r\nTo: ann@one.test\r\nSubject: real\r\n\r\nHello Ann." + sequence + smuggled


def only_crlf(data: bytes) -> bool:
    return b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b"")


@pytest.mark.parametrize("name", SEQUENCES)
def test_each_sequence_reaches_the_upstream_as_text_inside_one_message(
    start_relay, upstream: Upstream, name: str
) -> None:
    relay = start_relay(upstream)
    replies = converse(relay.host, relay.port, smuggling_message(name, SEQUENCES[name]))
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354", b"250", b"221"]
    [received] = upstream.messages
    assert (received.mail_from, received.rcpt_tos) == ("sender@office.test", ["ann@one.test"])
    assert only_crlf(received.data)
    assert b"Subject: real\r\n" in received.data
    assert b"MAIL FROM:<ceo@bank.test>\r\nRCPT TO:<victim@one.test>\r\n" in received.data
    assert received.data.endswith(b"Wire the money.\r\n")


@pytest.mark.parametrize("name", SEQUENCES)
def test_outbox_copies_have_crlf_line_endings_only(start_relay, name: str) -> None:
    relay = start_relay()
    replies = converse(relay.host, relay.port, smuggling_message(name, SEQUENCES[name]))
    assert replies[4].startswith(b"250 ")
    [copy] = list(relay.outbox.glob("*.eml"))
    assert only_crlf(copy.read_bytes())


@pytest.mark.parametrize("sequence", [b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\n\x00.\n"])
def test_nul_bytes_that_a_lax_upstream_might_drop_are_refused(start_relay, upstream: Upstream, sequence) -> None:
    relay = start_relay(upstream)
    replies = converse(relay.host, relay.port, smuggling_message("NUL", sequence))
    assert replies[4].startswith(b"550 5.6.0 ")
    assert upstream.messages == []


def test_a_real_end_of_data_followed_by_a_second_transaction_is_two_messages(start_relay, upstream: Upstream) -> None:
    # Pipelining after <CRLF>.<CRLF> is legitimate: the client meant two messages, and gets them.
    relay = start_relay(upstream)
    second = SMUGGLED.replace(b"victim@one.test", b"bob@two.test").replace(b"ceo@bank.test", b"sender@office.test")
    replies = converse(relay.host, relay.port, b"Subject: first\r\n\r\nOne.\r\n.\r\n" + second)
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354", b"250", b"250", b"250", b"354", b"250", b"221"]
    assert [(m.mail_from, m.rcpt_tos) for m in upstream.messages] == [
        ("sender@office.test", ["ann@one.test"]),
        ("sender@office.test", ["bob@two.test"]),
    ]
