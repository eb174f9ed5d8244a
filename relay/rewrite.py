"""Building each outgoing copy's header section from a Decision. The body is shared, never copied.

Pure: the caller passes in everything that would need a clock or the network (the Received line's
details, a Message-ID and Date for messages that lack them).
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.addresses import Mailbox, fold_field, format_mailbox, parse_address_list
from relay.message import HeaderField, ParsedMessage, serialize
from relay.policy import CopyPlan, Decision

# Removed from every copy, as Postfix's cleanup does with Bcc: they name hidden recipients.
ALWAYS_REMOVED = frozenset({"bcc", "resent-bcc"})
# Replaced in copies made for protected recipients.
RECIPIENT_FIELDS = frozenset({"to", "cc"})
RESENT_RECIPIENT_FIELDS = frozenset({"resent-to", "resent-cc"})
# Reply-all targets: protected addresses are taken out of them, the rest stays.
REPLY_FIELDS = frozenset({"reply-to", "mail-followup-to", "mail-reply-to"})
# Trace and delivery fields left by clients or earlier hops; dropped when they name a hidden address.
TRACE_FIELDS = frozenset(
    {
        "received",
        "delivered-to",
        "x-original-to",
        "x-envelope-to",
        "envelope-to",
        "apparently-to",
        "x-rcpt-to",
        "x-forwarded-to",
        "x-apparently-to",
        "original-recipient",
        "final-recipient",
    }
)
# A signature over the To and Cc we replace would fail at the receiver; the provider signs anew.
SIGNATURE_FIELDS = frozenset({"dkim-signature"})
UNDISCLOSED = "undisclosed-recipients:;"


@dataclass(frozen=True, slots=True)
class TraceInfo:
    """What the relay's own Received line says, gathered by the listener."""

    helo: str
    peer: str
    hostname: str
    protocol: str  # ESMTP, ESMTPS, UTF8SMTP ...
    queue_id: str
    date: str  # RFC 5322 date-time


@dataclass(frozen=True, slots=True)
class OutgoingCopy:
    recipients: tuple[str, ...]
    kind: str
    headers: bytes
    body: bytes  # the same object for every copy of a message
    hidden: frozenset[str]

    @property
    def size(self) -> int:
        return len(self.headers) + len(self.body)


def _received_field(trace: TraceInfo, recipients: tuple[str, ...], line_ending: bytes) -> bytes:
    eol = line_ending.decode("ascii")
    text = (
        f"Received: from {trace.helo} ({trace.peer}){eol}\tby {trace.hostname} (privacy-relay) "
        f"with {trace.protocol} id {trace.queue_id}"
    )
    # Name the recipient only when the copy has exactly one: a list would expose them.
    if len(recipients) == 1:
        text += f"{eol}\tfor <{recipients[0]}>"
    return f"{text}; {trace.date}{eol}".encode()


def _mentions_hidden(field: HeaderField, hidden: frozenset[str]) -> bool:
    text = field.value.lower()
    return any(key in text for key in hidden)


def _filtered_reply_field(field: HeaderField, hidden: frozenset[str], eol: bytes) -> bytes | None:
    mailboxes = parse_address_list(field.value)
    kept = [m for m in mailboxes if m.key not in hidden]
    if len(kept) == len(mailboxes) and not _mentions_hidden(field, hidden):
        return field.raw
    if not kept:
        return None
    return fold_field(field.name, [format_mailbox(m) for m in kept], eol)


def _safe_shown(mailbox: Mailbox, hidden: frozenset[str]) -> Mailbox:
    """The recipient's own mailbox, without a display name that spells out someone else's address."""
    name = mailbox.display_name.lower()
    if "@" in name and any(key in name for key in hidden):
        return Mailbox("", mailbox.address)
    return mailbox


def _copy_headers(
    message: ParsedMessage,
    decision: Decision,
    plan: CopyPlan,
    added: list[bytes],
) -> bytes:
    eol = message.line_ending
    out: list[bytes] = list(added)
    rewritten = plan.kind != "original"
    to_written = resent_written = False
    for field in message.fields:
        key = field.key
        if key in ALWAYS_REMOVED:
            continue
        if not rewritten:
            out.append(field.raw)
            continue
        if key in RECIPIENT_FIELDS:
            if not to_written:
                out.extend(_recipient_fields(decision, plan, eol))
                to_written = True
        elif key in RESENT_RECIPIENT_FIELDS:
            if not resent_written:
                out.append(fold_field("Resent-To", _visible_items(plan, ()), eol))
                resent_written = True
        elif key in REPLY_FIELDS:
            kept = _filtered_reply_field(field, plan.hidden, eol)
            if kept is not None:
                out.append(kept)
        elif key in TRACE_FIELDS:
            if not _mentions_hidden(field, plan.hidden):
                out.append(field.raw)
        elif key not in SIGNATURE_FIELDS:
            out.append(field.raw)
    if rewritten and not to_written:
        out.extend(_recipient_fields(decision, plan, eol))
    return serialize(out, eol)


def _visible_items(plan: CopyPlan, extra: tuple[Mailbox, ...]) -> list[str]:
    items = [format_mailbox(m) for m in extra]
    if plan.kind == "single" and plan.shown is not None:
        return [format_mailbox(_safe_shown(plan.shown, plan.hidden)), *items]
    return items or [UNDISCLOSED]


def _recipient_fields(decision: Decision, plan: CopyPlan, eol: bytes) -> list[bytes]:
    in_to = tuple(m for name, m in decision.always_visible if name == "to")
    in_cc = tuple(m for name, m in decision.always_visible if name == "cc")
    fields = [fold_field("To", _visible_items(plan, in_to), eol)]
    if in_cc:
        fields.append(fold_field("Cc", [format_mailbox(m) for m in in_cc], eol))
    return fields


def build_copies(
    message: ParsedMessage,
    decision: Decision,
    trace: TraceInfo,
    message_id: str,
) -> list[OutgoingCopy]:
    """One OutgoingCopy per CopyPlan, each with its own header bytes and the shared body."""
    eol = message.line_ending
    missing: list[bytes] = []
    if not message.get_all("message-id"):
        missing.append(b"Message-ID: " + message_id.encode("ascii") + eol)
    if not message.get_all("date"):
        missing.append(b"Date: " + trace.date.encode("ascii") + eol)
    copies = []
    for plan in decision.copies:
        added = [_received_field(trace, plan.recipients, eol), *missing]
        headers = _copy_headers(message, decision, plan, added)
        copies.append(OutgoingCopy(plan.recipients, plan.kind, headers, message.body, plan.hidden))
    return copies
