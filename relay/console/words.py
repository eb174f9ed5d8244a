"""The console's plain words for decisions and copy states, the same on the page and in the API."""

from __future__ import annotations

from relay.core.activity import REFUSED, copies_word
from relay.core.policy import Action
from relay.spool.interface import HistoryState, MessageHistory

# Every decision a message can have, for the filter and for /metrics.
DECISIONS = (*(action.value for action in Action if action is not Action.REJECT), REFUSED)

_DECISION_WORDS = {
    Action.SPLIT.value: "Split into {copies}",
    Action.BCC.value: "Sent as {copies} with the recipients hidden (Bcc)",
    Action.PASS.value: "Sent as written, although recipients could see each other (policy.action: pass)",
    Action.OVERRIDE.value: "Sent as written, as the sender asked with the override tag",
    Action.UNCHANGED.value: "Sent unchanged",
    Action.HOLD.value: "Held for review, not sent",
    REFUSED: "Refused, nothing sent",
}

STATE_WORDS = {
    HistoryState.QUEUED: "waiting to be sent",
    HistoryState.SENDING: "being sent",
    HistoryState.DELIVERED: "sent",
    HistoryState.DEFERRED: "waiting for a retry",
    HistoryState.BOUNCED: "bounced",
    HistoryState.DISCARDED: "discarded, not sent",
    HistoryState.HELD: "held for review",
}


def decision_words(entry: MessageHistory) -> str:
    """E.g. "Split into 25 copies: 25 addresses visible to each other in To"."""
    template = _DECISION_WORDS.get(entry.record.decision, entry.record.decision)
    headline = template.format(copies=copies_word(len(entry.copies)))
    return f"{headline}: {entry.record.reason}" if entry.record.reason else headline
