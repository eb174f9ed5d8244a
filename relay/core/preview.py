"""What the relay would do with a message, without sending it: `privacy-relay preview` and the console's Preview."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from relay.core.activity import REFUSED
from relay.core.addresses import parse_address_list
from relay.core.message import parse_message
from relay.core.pipeline import PrivacyCheckFailed, prepare
from relay.core.policy import Envelope, PolicySettings
from relay.core.replies import RelayError
from relay.core.rewrite import TraceInfo


@dataclass(frozen=True, slots=True)
class PreviewCopy:
    kind: str
    recipients: tuple[str, ...]
    headers: str  # as sent, decoded for reading (undecodable bytes replaced)


@dataclass(frozen=True, slots=True)
class Preview:
    mail_from: str | None  # None: the message could not be read, so there is no envelope to show
    recipients: tuple[str, ...]
    decision: str  # a policy action, or "refused"
    reason: str
    copies: tuple[PreviewCopy, ...] = ()
    reply: str | None = None  # the refusal the client would get
    leaked_header: str | None = None  # refused by the privacy check: the header that still named someone


def preview_message(
    policy: PolicySettings,
    data: bytes,
    hostname: str,
    date: str,
    mail_from: str | None = None,
    rcpts: Sequence[str] = (),
) -> Preview:
    """The decision and every copy; the envelope defaults to From and To/Cc/Bcc, as a mail program would send it.

    Pure: the caller gives the host name and the date (RFC 5322) the copies' trace headers show.
    """
    try:
        message = parse_message(data)
    except RelayError as refusal:
        return Preview(None, tuple(rcpts), REFUSED, refusal.text, reply=refusal.render())
    if mail_from is None:
        senders = parse_address_list(message.first_value("from") or "")
        mail_from = senders[0].address if senders else ""
    if not rcpts:
        rcpts = [
            mailbox.address
            for field in message.fields
            if field.key in ("to", "cc", "bcc")
            for mailbox in parse_address_list(field.value)
        ]
    recipients = tuple(rcpts)
    trace = TraceInfo("preview", "[127.0.0.1]", hostname, "ESMTP", "PREVIEW", date)
    try:
        prepared = prepare(Envelope(mail_from, recipients), message, policy, trace, f"<preview@{hostname}>")
    except PrivacyCheckFailed as failure:
        return Preview(
            mail_from, recipients, REFUSED, failure.text, reply=failure.render(), leaked_header=failure.leak.field
        )
    except RelayError as refusal:
        return Preview(mail_from, recipients, REFUSED, refusal.text, reply=refusal.render())
    copies = tuple(
        PreviewCopy(copy.kind, tuple(copy.recipients), copy.headers.decode("utf-8", errors="replace"))
        for copy in prepared.copies
    )
    return Preview(mail_from, recipients, prepared.decision.action.value, prepared.decision.reason, copies)
