"""The relay end to end in one process: smtplib -> privacy-relay -> a real aiosmtpd upstream."""

from __future__ import annotations

import smtplib
from email import message_from_bytes
from email.policy import default

from tests.conftest import Upstream

INVITATION = (
    b"From: Coach <coach@coaching.test>\r\n"
    b"To: Ann <ann@one.test>, bob@two.test, Cy <cy@three.test>\r\n"
    b"Cc: dee@four.test, Eve <eve@five.test>\r\n"
    b"Subject: Workshop on Saturday\r\n"
    b"\r\n"
    b"See you there.\r\n"
)
RECIPIENTS = ["ann@one.test", "bob@two.test", "cy@three.test", "dee@four.test", "eve@five.test"]


def test_three_to_and_two_cc_become_five_private_copies(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream)
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        refused = client.sendmail("coach@coaching.test", RECIPIENTS, INVITATION)
    assert refused == {}
    assert len(upstream.messages) == 5
    for received in upstream.messages:
        assert received.mail_from == "coach@coaching.test"
        assert len(received.rcpt_tos) == 1
        parsed = message_from_bytes(received.data, policy=default)
        shown = [a.addr_spec for a in parsed["To"].addresses]
        assert shown == received.rcpt_tos
        assert parsed["Cc"] is None
        others = set(RECIPIENTS) - set(received.rcpt_tos)
        assert not any(o.encode() in received.data for o in others)
        assert received.data.endswith(b"\r\n\r\nSee you there.\r\n")
    assert sorted(r for m in upstream.messages for r in m.rcpt_tos) == sorted(RECIPIENTS)
