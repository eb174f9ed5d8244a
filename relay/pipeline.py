"""From received bytes to checked outgoing copies: parse, decide, rewrite, leak check.

Pure: the listener and `privacy-relay preview` both call prepare(); neither duplicates its steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.config import PolicyConfig
from relay.errors import SmtpReply
from relay.leakcheck import Leak, LeakChecker
from relay.message import parse_message
from relay.policy import Decision, Envelope, decide
from relay.rewrite import OutgoingCopy, TraceInfo, build_copies


class PrivacyCheckFailed(SmtpReply):
    """A rewritten copy still named another protected recipient: nothing is sent."""

    def __init__(self, leak: Leak, decision: Decision) -> None:
        where = (
            f"the text of the message starts with lines that look like header fields ({leak.field}), which "
            "would show one to another recipient. Remove other recipients' addresses from the top of the text"
            if leak.in_body
            else f"the {leak.field} header would still show one to another recipient. Remove other "
            f"recipients' addresses from {leak.field}"
        )
        super().__init__(
            554,
            "5.7.1",
            f"Not sent: privacy-relay could not hide every recipient's address: {where} "
            "(or put the recipients in Bcc) and send it again.",
        )
        self.leak = leak
        self.decision = decision


@dataclass(frozen=True, slots=True)
class Prepared:
    decision: Decision
    copies: list[OutgoingCopy]


def prepare(
    envelope: Envelope,
    data: bytes,
    policy: PolicyConfig,
    trace: TraceInfo,
    message_id: str,
) -> Prepared:
    """Every copy to send for this message, each verified; raises SmtpReply if it must be refused."""
    message = parse_message(data)
    decision = decide(envelope, message, policy)
    if decision.rejection is not None:
        raise decision.rejection
    copies = build_copies(message, decision, trace, message_id)
    checker = LeakChecker(decision.protected)
    for plan, copy in zip(decision.copies, copies, strict=True):
        if not plan.leak_checked:
            continue
        leak = checker.find(copy.headers, plan.may_show, copy.body)
        if leak is not None:
            raise PrivacyCheckFailed(leak, decision)
    return Prepared(decision, copies)
