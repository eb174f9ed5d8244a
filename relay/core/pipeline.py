"""From a parsed message to checked outgoing copies: decide, rewrite, leak check.

Pure: the listener and `privacy-relay preview` both call prepare(); neither duplicates its steps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from relay.core.leakcheck import Leak, LeakChecker
from relay.core.line_length import fit_line_length, fold_long_header_lines
from relay.core.message import ParsedMessage
from relay.core.policy import Decision, Envelope, PolicySettings, decide
from relay.core.replies import RelayError
from relay.core.rewrite import OutgoingCopy, TraceInfo, build_copies


class PrivacyCheckFailed(RelayError):
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
    message: ParsedMessage,
    policy: PolicySettings,
    trace: TraceInfo,
    message_id: str,
) -> Prepared:
    """Every copy to send for this message (parsed once, by the caller), each verified; RelayError if refused."""
    decision = decide(envelope, message, policy)
    if decision.rejection is not None:
        raise decision.rejection
    # Re-encoded (if a line is too long) once, before the copies share the body.
    message = fit_line_length(message)
    copies = [
        replace(copy, headers=fold_long_header_lines(copy.headers))
        for copy in build_copies(message, decision, trace, message_id)
    ]
    checker = LeakChecker(decision.protected)
    for plan, copy in zip(decision.copies, copies, strict=True):
        if not plan.leak_checked:
            continue
        leak = checker.find(copy.headers, plan.may_show, copy.body)
        if leak is not None:
            raise PrivacyCheckFailed(leak, decision)
    return Prepared(decision, copies)
