"""build_copies(), the rewrite, on its own: each copy's headers show what its plan allows, the body is shared."""

from __future__ import annotations

from relay.config.models import PolicyConfig
from relay.core.message import parse_message
from relay.core.policy import CopyKind, Envelope, decide
from relay.core.rewrite import build_copies
from tests.support.mailkit import SENDER, TRACE, addresses_in, message, parsed

ANN, BOB = "ann@one.test", "bob@two.test"
DATA = message(f"From: {SENDER}", f"To: {ANN}, {BOB}", "Bcc: hidden@three.test", "Subject: Saturday")


def copies(**policy: object) -> list:
    parsed_message = parse_message(DATA)
    decision = decide(Envelope(SENDER, (ANN, BOB)), parsed_message, PolicyConfig(**policy).settings())  # type: ignore[arg-type]
    return build_copies(parsed_message, decision, TRACE, "<generated@relay.test>")


def test_a_single_copy_shows_its_own_recipient_in_to_and_nobody_else() -> None:
    for copy, recipient in zip(copies(), (ANN, BOB), strict=True):
        assert copy.kind is CopyKind.SINGLE
        assert addresses_in(copy, "to") == [recipient]
        assert addresses_in(copy, "from") == [SENDER]


def test_bcc_never_leaves_in_any_copy() -> None:
    for policy in ({}, {"action": "bcc"}):
        assert all(parsed(copy).get_all("bcc") is None for copy in copies(**policy))


def test_an_undisclosed_copy_shows_no_recipient() -> None:
    (copy,) = copies(action="bcc")
    assert copy.kind is CopyKind.UNDISCLOSED and addresses_in(copy, "to") == []


def test_every_copy_shares_one_body_object_and_gets_a_trace_header() -> None:
    made = copies()
    assert made[0].body is made[1].body
    assert all(copy.headers.startswith(b"Received: from client.test") for copy in made)
