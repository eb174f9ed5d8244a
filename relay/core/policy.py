"""The policy engine: does a message expose recipients to each other, and what to do about it.

Pure: decide() takes the envelope, the parsed header fields and the policy settings, and returns a
Decision that lists every outgoing copy. No I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from relay.core.addresses import Mailbox, normalize_address, normalize_domain, parse_address_list
from relay.core.content import scan_content
from relay.core.leakcheck import LeakChecker
from relay.core.message import ParsedMessage
from relay.core.replies import RelayError

# Headers whose addresses every recipient reads as "who else got this".
VISIBLE_FIELDS = ("to", "cc", "resent-to", "resent-cc")
# The author and resender: their own addresses are shown in every copy anyway, so never protected.
SENDER_FIELDS = ("from", "sender", "resent-from", "resent-sender")
# Never in any copy.
REMOVED_FIELDS = ("bcc", "resent-bcc")


class Action(StrEnum):
    SPLIT = "split"
    BCC = "bcc"
    REJECT = "reject"
    PASS = "pass"  # noqa: S105 (exposed, sent as written on purpose: audit only)
    HOLD = "hold"  # exposed: kept, unsent, until a person releases or discards it
    OVERRIDE = "override"  # the sender asked, with policy.override_tag, to send it as written
    UNCHANGED = "unchanged"  # nothing to protect


class CopyKind(StrEnum):
    ORIGINAL = "original"  # as written, to the sender, internal recipients or where exposure is allowed
    SINGLE = "single"  # one protected recipient, shown alone in To
    UNDISCLOSED = "undisclosed"  # protected recipients in Bcc, none shown
    BOUNCE = "bounce"  # a delivery report the relay made (relay/delivery), not a plan of the policy
    NOTICE = "notice"  # the relay's notice to a sender that their message is held (relay/delivery/holding.py)


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """The `policy` section as plain values; the config layer builds it (PolicyConfig.settings()), with its defaults."""

    action: Literal["split", "bcc", "reject", "pass", "hold"]
    min_recipients: int
    internal_domains: tuple[str, ...]
    always_visible: tuple[str, ...]
    calendar: Literal["reject", "pass"]
    tnef: Literal["reject", "pass"]
    override_tag: str | None
    # action hold: whether the sender hears that the message waits, and how long before it goes back unsent.
    hold_notify: bool
    hold_max_age: float


@dataclass(frozen=True, slots=True)
class Envelope:
    mail_from: str  # "" for the null sender
    rcpt_tos: tuple[str, ...]
    smtputf8: bool = False


@dataclass(frozen=True, slots=True)
class CopyPlan:
    """One outgoing transaction: who receives it and what its headers may show."""

    recipients: tuple[str, ...]
    kind: CopyKind
    # single copies: the recipient's own mailbox, shown in To.
    shown: Mailbox | None = None
    # Keys of the protected addresses this copy may show (its own recipient); every other protected
    # address of the Decision must appear nowhere in its headers.
    may_show: frozenset[str] = frozenset()
    # False for copies sent as written on purpose (to the sender or internal recipients, or exposure
    # that the policy allows): only those skip the leak check.
    leak_checked: bool = True

    @property
    def is_rewritten(self) -> bool:
        return self.kind is not CopyKind.ORIGINAL


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str
    copies: tuple[CopyPlan, ...]
    protected: frozenset[str]
    exposed_fields: tuple[str, ...] = ()
    # always_visible mailboxes found in the original, by the field they were in ("to" or "cc").
    always_visible: tuple[tuple[str, Mailbox], ...] = ()
    rejection: RelayError | None = field(default=None)
    # Set when the Subject carried policy.override_tag: the copies' Subject loses it.
    override_tag: str | None = None


def _is_internal(key: str, internal_domains: frozenset[str]) -> bool:
    domain = key.rpartition("@")[2]
    return any(domain == d or domain.endswith("." + d) for d in internal_domains)


def _dedupe(addresses: tuple[str, ...]) -> list[str]:
    seen: set[str] = set()
    unique: list[str] = []
    for address in addresses:
        key = normalize_address(address)
        if key not in seen:
            seen.add(key)
            unique.append(address)
    return unique


def _counted(count: int, noun: str) -> str:
    """ "1 address", "3 addresses": reasons are read by people in the console and the logs."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {noun}es" if noun.endswith("ss") else f"{count} {noun}s"


def _field_label(key: str) -> str:
    return "-".join(part.capitalize() for part in key.split("-"))


def visible_mailboxes(message: ParsedMessage) -> list[tuple[str, Mailbox]]:
    """(field key, mailbox) for every address in the fields all recipients can read."""
    found: list[tuple[str, Mailbox]] = []
    for header in message.fields:
        if header.key in VISIBLE_FIELDS:
            found.extend((header.key, mailbox) for mailbox in parse_address_list(header.value))
    return found


def _mentioned(message: ParsedMessage, checker: LeakChecker) -> list[tuple[str, str]]:
    """(field key, protected key) for protected addresses written anywhere a recipient can read.

    Display names and comments in To/Cc, Reply-To, trace fields, even the Subject or a field's name:
    whatever stays in a copy is read by its recipient. Read by the leak checker itself, so that what
    the decision calls unexposed is what the check of its copies lets through.
    """
    found: list[tuple[str, str]] = []
    for header in message.fields:
        if header.key not in REMOVED_FIELDS:
            found.extend((header.key, key) for key in sorted(checker.keys_in(header.name, header.value)))
    return found


def _shows_someone_else(shown: set[str], recipient_keys: list[str]) -> bool:
    """True when some recipient would see a protected address other than its own (linear)."""
    return len(shown) > 1 or (len(shown) == 1 and any(key not in shown for key in recipient_keys))


def subject_has_tag(message: ParsedMessage, tag: str | None) -> bool:
    if not tag:
        return False
    return any(tag.lower() in f.value.lower() for f in message.get_all("subject"))


CALENDAR_REFUSAL = (
    "Not sent: this meeting invitation lists {count} attendees' addresses inside its calendar data, "
    "which every invited person's calendar shows and this relay cannot hide. Send one invitation per "
    "attendee, or send the details as an ordinary message with the recipients in Bcc."
)
TNEF_REFUSAL = (
    "Not sent: Outlook attached a winmail.dat (Rich Text / TNEF) that carries the full list of "
    "recipients, which this relay cannot hide. In Outlook, write the message in HTML or plain text "
    "(File > Options > Mail > Compose messages in HTML; and under Message format, set Rich Text "
    "messages to Internet recipients to Convert to HTML format), then send it again."
)


def decide(envelope: Envelope, message: ParsedMessage, config: PolicySettings) -> Decision:
    internal_domains = frozenset(normalize_domain(d) for d in config.internal_domains)
    always_visible_keys = frozenset(normalize_address(a) for a in config.always_visible)
    sender_keys = {normalize_address(envelope.mail_from)} if envelope.mail_from else set()
    for header in message.fields:
        if header.key in SENDER_FIELDS:
            sender_keys.update(m.key for m in parse_address_list(header.value))

    visible = visible_mailboxes(message)
    recipients = _dedupe(envelope.rcpt_tos)
    recipient_keys = [normalize_address(r) for r in recipients]

    def is_protected(key: str) -> bool:
        return key not in sender_keys and key not in always_visible_keys and not _is_internal(key, internal_domains)

    candidate_keys = set(recipient_keys) | {m.key for _, m in visible}
    protected = frozenset(k for k in candidate_keys if is_protected(k))
    exposing = [(name, m.key) for name, m in visible if m.key in protected]
    exposing += _mentioned(message, LeakChecker(protected))
    shown_anywhere = {key for _, key in exposing}
    exposed_fields = tuple(dict.fromkeys(_field_label(name) for name, _ in exposing))
    always_visible = tuple((name, m) for name, m in visible if m.key in always_visible_keys and name in ("to", "cc"))
    everyone = (CopyPlan(tuple(recipients), CopyKind.ORIGINAL, leak_checked=False),)

    def decision(
        action: Action,
        reason: str,
        copies: tuple[CopyPlan, ...],
        rejection: RelayError | None = None,
        override_tag: str | None = None,
    ) -> Decision:
        return Decision(action, reason, copies, protected, exposed_fields, always_visible, rejection, override_tag)

    if subject_has_tag(message, config.override_tag):
        return decision(
            Action.OVERRIDE,
            f"the Subject contains the override tag {config.override_tag!r}: sent as written",
            everyone,
            override_tag=config.override_tag,
        )
    if len(protected) < config.min_recipients:
        return decision(
            Action.UNCHANGED,
            _counted(len(protected), "protected recipient") + ", fewer than policy.min_recipients",
            everyone,
        )

    headers_expose = _shows_someone_else(shown_anywhere, recipient_keys)
    content = scan_content(message)
    attendees = set(content.calendar_attendees & protected)
    calendar_exposes = config.calendar == "reject" and _shows_someone_else(attendees, recipient_keys)
    # A winmail.dat carries the whole recipient table, Bcc included, so it exposes any two recipients.
    tnef_exposes = config.tnef == "reject" and content.has_tnef
    if not (headers_expose or calendar_exposes or tnef_exposes):
        # Still leak-checked: one copy to several recipients must show none of them.
        receiving = frozenset(k for k in recipient_keys if k in protected)
        checked = CopyPlan(
            tuple(recipients),
            CopyKind.ORIGINAL,
            may_show=receiving if len(receiving) == 1 else frozenset(),
        )
        return decision(Action.UNCHANGED, "no recipient can see another protected recipient", (checked,))

    exposed_count = len(shown_anywhere)
    where = " and ".join(exposed_fields) or "To/Cc"
    reason = f"{_counted(exposed_count, 'address')} visible to each other in {where}"
    if calendar_exposes:
        reason = f"{_counted(len(attendees), 'address')} listed as attendees in a calendar invitation"
    elif tnef_exposes:
        reason = "a winmail.dat (TNEF) attachment carries the recipient list"
    action = Action(config.action)
    if action is Action.PASS:
        return decision(Action.PASS, reason, everyone)
    if calendar_exposes:
        refusal = RelayError(550, "5.7.1", CALENDAR_REFUSAL.format(count=len(attendees)))
        return decision(Action.REJECT, reason, (), rejection=refusal)
    if tnef_exposes:
        return decision(Action.REJECT, reason, (), rejection=RelayError(550, "5.7.1", TNEF_REFUSAL))
    if action is Action.HOLD:
        return decision(Action.HOLD, reason, ())
    if action is Action.REJECT:
        rejection = RelayError(
            550,
            "5.7.1",
            f"Not sent: this message would show {exposed_count} recipients' addresses to each "
            f"other in {where}. Put the recipients in Bcc instead (and yourself in To), "
            "then send it again.",
        )
        return decision(Action.REJECT, reason, (), rejection=rejection)

    unprotected = tuple(r for r, key in zip(recipients, recipient_keys, strict=True) if key not in protected)
    protected_recipients = [(r, key) for r, key in zip(recipients, recipient_keys, strict=True) if key in protected]
    copies: list[CopyPlan] = []
    if unprotected:
        # The sender, internal colleagues and always-visible addresses see the message as written.
        copies.append(CopyPlan(unprotected, CopyKind.ORIGINAL, leak_checked=False))
    if action is Action.BCC:
        if protected_recipients:
            # A copy to one person may name that person (its Received line does).
            alone = frozenset(key for _, key in protected_recipients) if len(protected_recipients) == 1 else frozenset()
            copies.append(CopyPlan(tuple(r for r, _ in protected_recipients), CopyKind.UNDISCLOSED, may_show=alone))
    else:
        shown_by_key: dict[str, Mailbox] = {}
        for _, mailbox in visible:
            if mailbox.key not in shown_by_key or (mailbox.display_name and not shown_by_key[mailbox.key].display_name):
                shown_by_key[mailbox.key] = mailbox
        for recipient, key in protected_recipients:
            shown = shown_by_key.get(key, Mailbox("", recipient))
            copies.append(CopyPlan((recipient,), CopyKind.SINGLE, shown, frozenset({key})))
    return decision(action, reason, tuple(copies))
