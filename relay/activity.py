"""What the console's activity page keeps of each message: sender, subject, recipients and the decision.

Pure: built from the envelope and the received bytes, with the standard library's header parsing; the
spool keeps it, the console shows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.parser import BytesHeaderParser

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


def subject_of(data: bytes) -> str:
    """The message's Subject as a person reads it (RFC 2047 words decoded), or "" when there is none."""
    end = data.find(b"\r\n\r\n")
    header_section = data if end < 0 else data[: end + 2]
    try:
        subject = BytesHeaderParser(policy=policy.default).parsebytes(header_section).get("subject")
        text = "" if subject is None else " ".join(str(subject).split())
    except Exception:  # the email package raises many kinds of errors on broken headers; a subject is only shown
        text = ""
    return text[:SUBJECT_LIMIT]


def message_record(mail_from: str, recipients: Sequence[str], data: bytes, decision: str, reason: str) -> MessageRecord:
    return MessageRecord(mail_from, subject_of(data), tuple(recipients), decision, reason)
