"""Building each outgoing copy's header section from a Decision. The body is shared, never copied.

Pure: the caller passes in everything that would need a clock or the network (the Received line's
details, a Message-ID and Date for messages that lack them).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping
from dataclasses import dataclass

from relay.core.addresses import Mailbox, fold_field, format_mailbox, mentioned_addresses, parse_address_list
from relay.core.leakcheck import LeakChecker
from relay.core.message import CRLF, HeaderField, ParsedMessage, serialize
from relay.core.policy import REMOVED_FIELDS, CopyKind, CopyPlan, Decision

# Removed from every copy, as Postfix's cleanup does with Bcc: they name hidden recipients.
ALWAYS_REMOVED = frozenset(REMOVED_FIELDS)
# Replaced in copies made for protected recipients.
RECIPIENT_FIELDS = frozenset({"to", "cc"})
RESENT_RECIPIENT_FIELDS = frozenset({"resent-to", "resent-cc"})
# Reply-all and receipt targets: protected addresses are taken out of them, the rest stays.
REPLY_FIELDS = frozenset(
    {"reply-to", "mail-followup-to", "mail-reply-to", "disposition-notification-to", "return-receipt-to"}
)
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
        "return-path",
    }
)
# Delivery fields vendors add under their own names (X-MDaemon-Deliver-To, X-Gm-Original-To, ...).
TRACE_SUFFIXES = ("deliver-to", "delivered-to", "original-to", "envelope-to", "rcpt-to")
# A signature over the headers we change would fail at the receiver; the provider signs anew.
SIGNATURE_FIELDS = frozenset({"dkim-signature"})
UNDISCLOSED = "undisclosed-recipients:;"
_TRAILING_SPACE = re.compile(rb"[ \t]+(\r?\n)$")


def is_trace_field(key: str) -> bool:
    return key in TRACE_FIELDS or key.endswith(TRACE_SUFFIXES)


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
    kind: CopyKind
    headers: bytes
    body: bytes  # the same object for every copy of a message

    @property
    def size(self) -> int:
        return len(self.headers) + len(self.body)


@dataclass(frozen=True, slots=True)
class _FieldFacts:
    """What a field says about protected addresses, worked out once per message, not once per copy."""

    field: HeaderField
    mentions: frozenset[str]  # protected keys written anywhere in the field
    # Reply fields only: (position, formatted mailbox) of the mailboxes every copy keeps, and of the
    # protected ones by key, so each copy's field is assembled without re-reading the whole list.
    kept_by_all: tuple[tuple[int, str], ...]
    protected_items: Mapping[str, list[tuple[int, str]]]


def _received_field(trace: TraceInfo, recipients: tuple[str, ...]) -> bytes:
    eol = "\r\n"
    text = (
        f"Received: from {trace.helo} ({trace.peer}){eol}\tby {trace.hostname} (privacy-relay) "
        f"with {trace.protocol} id {trace.queue_id}"
    )
    # Name the recipient only when the copy has exactly one: a list would expose them.
    if len(recipients) == 1:
        text += f"{eol}\tfor <{recipients[0]}>"
    # surrogateescape: an address read from 8-bit header bytes goes back out as those same bytes.
    return f"{text}; {trace.date}{eol}".encode("utf-8", "surrogateescape")


def _filtered_reply_field(facts: _FieldFacts, may_show: frozenset[str]) -> bytes | None:
    if not facts.mentions - may_show:
        return facts.field.raw
    kept = list(facts.kept_by_all)
    for key in may_show:
        for item in facts.protected_items.get(key, ()):
            bisect.insort(kept, item)
    if not kept:
        return None
    return fold_field(facts.field.name, [text for _, text in kept])


def _safe_shown(mailbox: Mailbox, protected: frozenset[str], may_show: frozenset[str]) -> Mailbox:
    """The recipient's own mailbox, without a display name that spells out someone else's address."""
    if "@" in mailbox.display_name and (mentioned_addresses(mailbox.display_name) & protected) - may_show:
        return Mailbox("", mailbox.address)
    return mailbox


def _reply_item(mailbox: Mailbox, protected: frozenset[str], reader: LeakChecker) -> str | None:
    """A reply-field mailbox as written, without a display name naming another protected address;
    None when even its bare address does (junk such as =?utf-8?q?bob@example.com?= or bob@example.com--x)."""
    own = frozenset({mailbox.key})

    def shows_another(text: str) -> bool:
        return bool((mentioned_addresses(text) & protected) - own or reader.keys_in("", text, own))

    text = format_mailbox(mailbox)
    if shows_another(text):
        text = mailbox.address
        if shows_another(text):
            return None
    return text


def _without_tag(field: HeaderField, tag: str) -> bytes:
    """The Subject field with every occurrence of the override tag (and one space after it) removed."""
    pattern = re.compile(re.escape(tag.encode("utf-8")) + rb" ?", re.IGNORECASE)
    name, colon, value = field.raw.partition(b":")
    return name + colon + _TRAILING_SPACE.sub(rb"\1", pattern.sub(b"", value))


def _facts(message: ParsedMessage, protected: frozenset[str]) -> list[_FieldFacts]:
    # The leak check's reading too, so that a field it would refuse is dropped or filtered here instead.
    reader = LeakChecker(protected)
    facts = []
    for header in message.fields:
        if header.key in REPLY_FIELDS:
            kept_by_all: list[tuple[int, str]] = []
            protected_items: dict[str, list[tuple[int, str]]] = {}
            keys = set()
            for position, mailbox in enumerate(parse_address_list(header.value)):
                key = mailbox.key
                keys.add(key)
                text = _reply_item(mailbox, protected, reader)
                if text is None:
                    continue
                if key in protected:
                    protected_items.setdefault(key, []).append((position, text))
                else:
                    kept_by_all.append((position, text))
            mentions = frozenset((keys | mentioned_addresses(header.value)) & protected) | reader.keys_in(
                header.name, header.value
            )
            facts.append(_FieldFacts(header, mentions, tuple(kept_by_all), protected_items))
        elif is_trace_field(header.key):
            mentions = frozenset(mentioned_addresses(header.value) & protected) | reader.keys_in(
                header.name, header.value
            )
            facts.append(_FieldFacts(header, mentions, (), {}))
        else:
            facts.append(_FieldFacts(header, frozenset(), (), {}))
    return facts


def _original_headers(message: ParsedMessage, decision: Decision, added: list[bytes]) -> bytes:
    out = list(added)
    tag = decision.override_tag
    for field in message.fields:
        if field.key in ALWAYS_REMOVED or (tag and field.key in SIGNATURE_FIELDS):
            continue
        out.append(_without_tag(field, tag) if tag and field.key == "subject" else field.raw)
    return serialize(out)


def _rewritten_headers(facts: list[_FieldFacts], decision: Decision, plan: CopyPlan, added: list[bytes]) -> bytes:
    out: list[bytes] = list(added)
    to_written = False
    resent_block: set[str] = set()
    resent_written = False
    for fact in facts:
        field = fact.field
        key = field.key
        if key.startswith("resent-"):
            # A name seen twice starts the next Resent- block (RFC 5322 3.6.6); each keeps one Resent-To.
            if key in resent_block:
                resent_block, resent_written = set(), False
            resent_block.add(key)
        else:
            resent_block, resent_written = set(), False
        if key in ALWAYS_REMOVED or key in SIGNATURE_FIELDS:
            continue
        if key in RECIPIENT_FIELDS:
            if not to_written:
                out.extend(_recipient_fields(decision, plan))
                to_written = True
        elif key in RESENT_RECIPIENT_FIELDS:
            if not resent_written:
                out.append(fold_field("Resent-To", _visible_items(decision, plan, ())))
                resent_written = True
        elif key in REPLY_FIELDS:
            kept = _filtered_reply_field(fact, plan.may_show)
            if kept is not None:
                out.append(kept)
        elif is_trace_field(key):
            if not fact.mentions - plan.may_show:
                out.append(field.raw)
        else:
            out.append(field.raw)
    if not to_written:
        out.extend(_recipient_fields(decision, plan))
    return serialize(out)


def _visible_items(decision: Decision, plan: CopyPlan, extra: tuple[Mailbox, ...]) -> list[str]:
    items = [format_mailbox(m) for m in extra]
    if plan.kind is CopyKind.SINGLE and plan.shown is not None:
        return [format_mailbox(_safe_shown(plan.shown, decision.protected, plan.may_show)), *items]
    return items or [UNDISCLOSED]


def _recipient_fields(decision: Decision, plan: CopyPlan) -> list[bytes]:
    in_to = tuple(m for name, m in decision.always_visible if name == "to")
    in_cc = tuple(m for name, m in decision.always_visible if name == "cc")
    fields = [fold_field("To", _visible_items(decision, plan, in_to))]
    if in_cc:
        fields.append(fold_field("Cc", [format_mailbox(m) for m in in_cc]))
    return fields


def build_copies(
    message: ParsedMessage,
    decision: Decision,
    trace: TraceInfo,
    message_id: str,
) -> list[OutgoingCopy]:
    """One OutgoingCopy per CopyPlan, in the same order, each with its own header bytes and the shared body."""
    missing: list[bytes] = []
    if not message.get_all("message-id"):
        missing.append(b"Message-ID: " + message_id.encode("ascii") + CRLF)
    if not message.get_all("date"):
        missing.append(b"Date: " + trace.date.encode("ascii") + CRLF)
    facts = _facts(message, decision.protected) if any(p.is_rewritten for p in decision.copies) else []
    copies = []
    for plan in decision.copies:
        added = [_received_field(trace, plan.recipients), *missing]
        if plan.is_rewritten:
            headers = _rewritten_headers(facts, decision, plan, added)
        else:
            headers = _original_headers(message, decision, added)
        copies.append(OutgoingCopy(plan.recipients, plan.kind, headers, message.body))
    return copies
