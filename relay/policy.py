"""The policy engine: does a message expose recipients to each other, and what to do about it.

Pure: decide() takes the envelope, the parsed header fields and the policy settings, and returns a
Decision that lists every outgoing copy. No I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from relay.addresses import Mailbox, normalize_address, normalize_domain, parse_address_list
from relay.config import PolicyConfig
from relay.errors import SmtpReply
from relay.message import ParsedMessage

# Headers whose addresses every recipient reads as "who else got this".
VISIBLE_FIELDS = ("to", "cc", "resent-to", "resent-cc")
SENDER_FIELDS = ("from",)


class Action(StrEnum):
    SPLIT = "split"
    BCC = "bcc"
    REJECT = "reject"
    PASS = "pass"  # noqa: S105 (exposed, sent as written on purpose: audit only)
    UNCHANGED = "unchanged"  # nothing to protect


CopyKind = Literal["original", "single", "undisclosed"]


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
    # Keys of protected addresses that must not appear anywhere in this copy's headers.
    hidden: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str
    copies: tuple[CopyPlan, ...]
    protected: frozenset[str]
    exposed_fields: tuple[str, ...] = ()
    # always_visible mailboxes found in the original, by the field they were in ("to" or "cc").
    always_visible: tuple[tuple[str, Mailbox], ...] = ()
    rejection: SmtpReply | None = field(default=None)


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


def _field_label(key: str) -> str:
    return "-".join(part.capitalize() for part in key.split("-"))


def visible_mailboxes(message: ParsedMessage) -> list[tuple[str, Mailbox]]:
    """(field key, mailbox) for every address in the fields all recipients can read."""
    found: list[tuple[str, Mailbox]] = []
    for header in message.fields:
        if header.key in VISIBLE_FIELDS:
            found.extend((header.key, mailbox) for mailbox in parse_address_list(header.value))
    return found


def decide(envelope: Envelope, message: ParsedMessage, config: PolicyConfig) -> Decision:
    internal_domains = frozenset(normalize_domain(d) for d in config.internal_domains)
    always_visible_keys = frozenset(normalize_address(a) for a in config.always_visible)
    sender_keys = {normalize_address(envelope.mail_from)} if envelope.mail_from else set()
    for header in message.fields:
        if header.key in SENDER_FIELDS:
            sender_keys.update(m.key for m in parse_address_list(header.value))

    visible = visible_mailboxes(message)
    recipients = _dedupe(envelope.rcpt_tos)

    def is_protected(key: str) -> bool:
        return key not in sender_keys and key not in always_visible_keys and not _is_internal(key, internal_domains)

    candidate_keys = {normalize_address(r) for r in recipients} | {m.key for _, m in visible}
    protected = frozenset(k for k in candidate_keys if is_protected(k))
    visible_protected = {m.key for _, m in visible if m.key in protected}
    exposed_fields = tuple(dict.fromkeys(_field_label(name) for name, m in visible if m.key in protected))
    exposes = any(visible_protected - {normalize_address(r)} for r in recipients)
    always_visible = tuple((name, m) for name, m in visible if m.key in always_visible_keys and name in ("to", "cc"))

    everyone = (CopyPlan(tuple(recipients), "original"),)
    if not exposes or len(protected) < config.min_recipients:
        reason = (
            "no recipient can see another protected recipient"
            if not exposes
            else f"{len(protected)} protected recipient(s), below policy.min_recipients"
        )
        return Decision(Action.UNCHANGED, reason, everyone, protected, exposed_fields, always_visible)

    exposed_count = len(visible_protected)
    where = " and ".join(exposed_fields) or "To/Cc"
    reason = f"{exposed_count} recipient address(es) visible to each other in {where}"
    action = Action(config.action)
    if action is Action.PASS:
        return Decision(Action.PASS, reason, everyone, protected, exposed_fields, always_visible)
    if action is Action.REJECT:
        rejection = SmtpReply(
            550,
            "5.7.1",
            f"Not sent: this message would show {exposed_count} recipients' addresses to each "
            f"other in {where}. Put the recipients in Bcc instead (and yourself in To), "
            "then send it again.",
        )
        return Decision(Action.REJECT, reason, (), protected, exposed_fields, always_visible, rejection)

    unprotected = tuple(r for r in recipients if normalize_address(r) not in protected)
    protected_recipients = [r for r in recipients if normalize_address(r) in protected]
    copies: list[CopyPlan] = []
    if unprotected:
        # The sender, internal colleagues and always-visible addresses see the message as written.
        copies.append(CopyPlan(unprotected, "original"))
    if action is Action.BCC:
        if protected_recipients:
            copies.append(CopyPlan(tuple(protected_recipients), "undisclosed", hidden=protected))
    else:
        shown_by_key: dict[str, Mailbox] = {}
        for _, mailbox in visible:
            if mailbox.key not in shown_by_key or (mailbox.display_name and not shown_by_key[mailbox.key].display_name):
                shown_by_key[mailbox.key] = mailbox
        for recipient in protected_recipients:
            key = normalize_address(recipient)
            shown = shown_by_key.get(key, Mailbox("", recipient))
            copies.append(CopyPlan((recipient,), "single", shown, protected - {key}))
    return Decision(action, reason, tuple(copies), protected, exposed_fields, always_visible)
