"""What the console's activity page keeps of each message: sender, subject, recipients and the decision.

Pure: built from the envelope and the received bytes, with the standard library's header parsing; the
spool keeps it, the console shows it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.parser import BytesHeaderParser

_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
# Refused messages have this decision; stored ones have their policy action's name.
REFUSED = "refused"
# A subject longer than this is cut: it is only shown in a list.
SUBJECT_LIMIT = 300


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """What the console shows of a message: its envelope sender, subject, recipients and the policy's decision."""

    sender: str
    subject: str
    recipients: tuple[str, ...]
    decision: str  # a policy action (split, bcc, pass, ...) or "refused"
    reason: str


def local_time(timestamp: float) -> str:
    """A time as the console and the CLI show it: the machine's local time, to the second."""
    return datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def copies_word(count: int) -> str:
    return f"{count} cop{'y' if count == 1 else 'ies'}"


def header_section(data: bytes) -> bytes:
    """The received bytes up to the blank line that ends the header (CRLF or bare LF line endings)."""
    found = _BLANK_LINE.search(data)
    return data if found is None else data[: found.start() + 1]


def subject_of(data: bytes) -> str:
    """The message's Subject as a person reads it (RFC 2047 words decoded), or "" when there is none."""
    try:
        subject = BytesHeaderParser(policy=policy.default).parsebytes(header_section(data)).get("subject")
        text = "" if subject is None else " ".join(str(subject).split())
    except Exception:  # the email package raises many kinds of errors on broken headers; a subject is only shown
        text = ""
    return text[:SUBJECT_LIMIT]


def message_record(mail_from: str, recipients: Sequence[str], data: bytes, decision: str, reason: str) -> MessageRecord:
    return MessageRecord(mail_from, subject_of(data), tuple(recipients), decision, reason)
