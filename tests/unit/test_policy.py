"""decide(), the policy engine, on its own: plain settings and a parsed message in, a Decision out."""

from __future__ import annotations

from dataclasses import replace

from relay.config.models import PolicyConfig
from relay.core.message import parse_message
from relay.core.policy import Action, CopyKind, Decision, Envelope, decide
from tests.support.mailkit import SENDER, message

DEFAULTS = PolicyConfig().settings()
ANN, BOB, LEE = "ann@one.test", "bob@two.test", "lee@coaching.test"


def decision(*rcpts: str, **settings: object) -> Decision:
    """The envelope's recipients, all shown in To, as a mail program writes them."""
    data = message(f"From: {SENDER}", f"To: {', '.join(rcpts)}", "Subject: Saturday")
    return decide(Envelope(SENDER, rcpts), parse_message(data), replace(DEFAULTS, **settings))  # type: ignore[arg-type]


def test_split_gives_each_protected_recipient_a_copy_that_may_show_only_them() -> None:
    split = decision(ANN, BOB)
    assert split.action is Action.SPLIT and split.protected == {ANN, BOB}
    assert [(c.recipients, c.kind, c.may_show) for c in split.copies] == [
        ((ANN,), CopyKind.SINGLE, frozenset({ANN})),
        ((BOB,), CopyKind.SINGLE, frozenset({BOB})),
    ]


def test_bcc_sends_one_undisclosed_copy_that_shows_nobody() -> None:
    bcc = decision(ANN, BOB, action="bcc")
    assert [(c.recipients, c.kind, c.may_show) for c in bcc.copies] == [((ANN, BOB), CopyKind.UNDISCLOSED, frozenset())]


def test_internal_recipients_get_the_message_as_written() -> None:
    mixed = decision(ANN, BOB, LEE, internal_domains=("coaching.test",))
    original = [c for c in mixed.copies if c.kind is CopyKind.ORIGINAL]
    assert [c.recipients for c in original] == [(LEE,)] and not original[0].leak_checked
    assert LEE not in mixed.protected


def test_fewer_recipients_than_min_recipients_leave_the_message_unchanged() -> None:
    alone = decision(ANN)
    assert alone.action is Action.UNCHANGED
    assert [(c.recipients, c.kind) for c in alone.copies] == [((ANN,), CopyKind.ORIGINAL)]


def test_reject_refuses_a_message_that_would_expose_recipients() -> None:
    refused = decision(ANN, BOB, action="reject")
    assert refused.rejection is not None and refused.rejection.code >= 500
