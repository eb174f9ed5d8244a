"""The privacy promise seen by an SMTP client: refusals arrive as clear replies, nothing is sent on a leak,
and a copy that needs SMTPUTF8 is never downgraded for an upstream that lacks it."""

from __future__ import annotations

import asyncio
import smtplib

import pytest
from aiosmtpd.smtp import SMTP
from structlog.testing import capture_logs

from tests.conftest import LOOPBACK, LoopThread, RecordingHandler, Upstream

ANN, BOB = "ann@one.test", "bob@two.test"


@pytest.fixture
def ascii_upstream(loops: LoopThread) -> Upstream:
    """A recording upstream that does not offer SMTPUTF8, like many older providers."""
    handler = RecordingHandler()

    async def start() -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(
            lambda: SMTP(handler, enable_SMTPUTF8=False, hostname="old.test"), LOOPBACK, 0
        )

    server: asyncio.Server = loops.run(start())
    yield Upstream(LOOPBACK, server.sockets[0].getsockname()[1], handler)

    async def stop() -> None:
        server.close()

    loops.run(stop())


def test_a_utf8_copy_is_refused_not_downgraded(start_relay, ascii_upstream: Upstream) -> None:
    # Direct mode: the client's reply names the refused copy (hybrid would answer 250 and send a DSN).
    relay = start_relay(ascii_upstream, RELAY_DELIVERY_MODE="direct")
    data = f"From: coach@coaching.test\r\nTo: jörg@bücher.test, {ANN}\r\nSubject: x\r\n\r\nHi\r\n".encode()
    with smtplib.SMTP(relay.host, relay.port) as client, pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail("coach@coaching.test", ["jörg@bücher.test", ANN], data, mail_options=["SMTPUTF8"])
    assert refused.value.smtp_code == 550
    assert b"5.6.7" in refused.value.smtp_error and b"SMTPUTF8" in refused.value.smtp_error
    # The ASCII copy went; the UTF-8 one did not, and the reply says so.
    assert [m.rcpt_tos for m in ascii_upstream.messages] == [[ANN]]
    assert "jörg@bücher.test".encode() in refused.value.smtp_error


def test_smtputf8_is_not_asked_of_the_upstream_when_nothing_needs_it(start_relay, ascii_upstream: Upstream) -> None:
    relay = start_relay(ascii_upstream)
    data = f"From: coach@coaching.test\r\nTo: {ANN}, {BOB}\r\n\r\nHi\r\n".encode()
    with smtplib.SMTP(relay.host, relay.port) as client:
        assert client.sendmail("coach@coaching.test", [ANN, BOB], data, mail_options=["SMTPUTF8"]) == {}
    assert sorted(m.rcpt_tos[0] for m in ascii_upstream.messages) == [ANN, BOB]
    assert all("SMTPUTF8" not in m.mail_options for m in ascii_upstream.messages)


def test_a_leak_the_rewrite_cannot_remove_is_refused_and_nothing_is_sent(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream)
    data = f"From: coach@coaching.test\r\nTo: {ANN}, {BOB}\r\nSubject: Ann meet {BOB}\r\n\r\nHi\r\n".encode()
    with smtplib.SMTP(relay.host, relay.port) as client, pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail("coach@coaching.test", [ANN, BOB], data)
    assert refused.value.smtp_code == 554
    assert b"5.7.1" in refused.value.smtp_error and b"Subject" in refused.value.smtp_error
    assert upstream.messages == []


def test_the_relay_keeps_serving_after_broken_input(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream)
    with smtplib.SMTP(relay.host, relay.port) as client:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("coach@coaching.test", [ANN, BOB], b"To: a@b.test\r\nno colon\r\nCc: c@d.test\r\n\r\nx")
        assert refused.value.smtp_code == 550
        good = f"From: coach@coaching.test\r\nTo: {ANN}, {BOB}\r\n\r\nHi\r\n".encode()
        assert client.sendmail("coach@coaching.test", [ANN, BOB], good) == {}
    assert len(upstream.messages) == 2


def test_every_override_is_logged_and_the_tag_removed(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_POLICY_OVERRIDE_TAG="[visible]")
    data = f"From: coach@coaching.test\r\nTo: {ANN}, {BOB}\r\nSubject: [visible] Ann, meet Bob\r\n\r\nHi\r\n".encode()
    with capture_logs() as events, smtplib.SMTP(relay.host, relay.port) as client:
        client.sendmail("coach@coaching.test", [ANN, BOB], data)
    [message] = upstream.messages
    assert message.rcpt_tos == [ANN, BOB]
    assert b"Subject: Ann, meet Bob\r\n" in message.data
    [override] = [e for e in events if e["event"] == "policy.override"]
    assert override["tag"] == "[visible]" and override["exposed_fields"] == ["To"]


def test_a_leak_is_logged_as_a_policy_failure_with_its_header(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream)
    data = f"From: coach@coaching.test\r\nTo: {ANN}, {BOB}\r\nX-Note: cc {BOB}\r\n\r\nHi\r\n".encode()
    with capture_logs() as events, smtplib.SMTP(relay.host, relay.port) as client, pytest.raises(smtplib.SMTPDataError):
        client.sendmail("coach@coaching.test", [ANN, BOB], data)
    [failure] = [e for e in events if e["event"] == "policy.failure"]
    assert failure["header"] == "X-Note" and failure["leaked"] == BOB


def test_an_address_glued_into_a_field_or_its_name_is_refused_over_smtp(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream)
    cara = "cara@three.test"
    with smtplib.SMTP(relay.host, relay.port) as client:
        for field, name in ((f'Subject: team "b"{cara}', b"Subject"), (f"{BOB}-Note: hello", f"{BOB}-Note".encode())):
            data = f"From: coach@coaching.test\r\nTo: undisclosed-recipients:;\r\n{field}\r\n\r\nHi\r\n".encode()
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("coach@coaching.test", [ANN, BOB, cara], data)
            assert refused.value.smtp_code == 554 and name in refused.value.smtp_error
        top = f"To: {ANN}, {BOB}\r\n\r\nHi\r\n".encode()
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("coach@coaching.test", [ANN, BOB], b"From: coach@coaching.test\r\n\r\n" + top)
        assert refused.value.smtp_code == 554 and b"text of the message" in refused.value.smtp_error
    assert upstream.messages == []
