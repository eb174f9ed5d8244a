"""Helpers for the privacy tests: build a message, run the real pipeline, read a copy's headers back."""

from __future__ import annotations

from collections.abc import Sequence
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from email.utils import getaddresses
from typing import Any

from relay.config.models import PolicyConfig
from relay.core.message import parse_message
from relay.core.pipeline import Prepared, prepare
from relay.core.policy import Envelope
from relay.core.rewrite import OutgoingCopy, TraceInfo

TRACE = TraceInfo("client.test", "[127.0.0.1]", "relay.test", "ESMTP", "QUEUEID", "Wed, 25 Nov 2026 05:00:00 +0000")
SENDER = "coach@coaching.test"
BODY = b"Hello,\r\nsee you on Saturday.\r\n"


def message(*header_lines: str | bytes, body: bytes = BODY, eol: bytes = b"\r\n") -> bytes:
    lines = [line if isinstance(line, bytes) else line.encode() for line in header_lines]
    return eol.join(lines) + eol + eol + body


def run(data: bytes, rcpts: Sequence[str], mail_from: str = SENDER, smtputf8: bool = False, **policy: Any) -> Prepared:
    envelope = Envelope(mail_from, tuple(rcpts), smtputf8)
    return prepare(envelope, parse_message(data), PolicyConfig(**policy).settings(), TRACE, "<generated@relay.test>")


def parsed(copy: OutgoingCopy) -> EmailMessage:
    result = message_from_bytes(copy.headers + copy.body, policy=default)
    assert isinstance(result, EmailMessage)
    return result


def addresses_in(copy: OutgoingCopy, name: str) -> list[str]:
    """Lower-case addr-specs of every `name` field of the copy, read by the standard library."""
    values = [str(value) for value in parsed(copy).get_all(name) or []]
    return [address.lower() for _, address in getaddresses(values) if address]


def copy_for(prepared: Prepared, recipient: str) -> OutgoingCopy:
    matching = [c for c in prepared.copies if recipient in c.recipients]
    assert len(matching) == 1, f"{recipient} is in {len(matching)} copies"
    return matching[0]
