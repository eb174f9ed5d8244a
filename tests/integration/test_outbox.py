"""With no upstream set, every copy lands in the outbox folder as one complete .eml file."""

from __future__ import annotations

import os
import smtplib
from email import message_from_bytes
from email.policy import default

RECIPIENTS = ["ann@one.test", "bob@two.test", "cy@three.test"]
BODY = b"See you on Saturday.\r\n"
MESSAGE = (
    b"From: coach@coaching.test\r\n"
    b"To: ann@one.test, bob@two.test\r\n"
    b"Cc: cy@three.test\r\n"
    b"Subject: Workshop\r\n"
    b"\r\n" + BODY
)


def test_each_copy_becomes_one_eml_file_and_no_temporary_file_remains(start_relay) -> None:
    relay = start_relay(RELAY_DELIVERY_MODE="direct")
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("coach@coaching.test")[0] == 250
        for recipient in RECIPIENTS:
            assert client.rcpt(recipient)[0] == 250
        code, reply = client.data(MESSAGE)
    assert code == 250
    assert reply.startswith(b"2.0.0 OK: relayed as 3 copies")

    names = sorted(os.listdir(relay.outbox))
    assert len(names) == 3
    assert all(name.endswith(".eml") and not name.startswith(".") for name in names)
    shown = []
    for name in names:
        data = (relay.outbox / name).read_bytes()
        assert data.endswith(b"\r\n\r\n" + BODY)
        message = message_from_bytes(data, policy=default)
        assert message["Cc"] is None
        shown.extend(address.addr_spec for address in message["To"].addresses)
    assert sorted(shown) == RECIPIENTS
