"""privacy-relay as Postfix's after-queue content filter, with contrib/postfix's lines in a real Postfix.

Mail is submitted to Postfix's smtpd; Postfix hands it to `privacy-relay serve` (direct mode), which
hands the copies back to Postfix's reinjection smtpd; Postfix delivers them to the test's upstream.
"""

from __future__ import annotations

import email
import email.policy
import signal
import smtplib
import time
from collections.abc import Callable

import pytest

from tests.conftest import Received, Upstream
from tests.e2e.conftest import PROCESS_DEADLINE, PostfixFilter, ServedRelay

SENDER = "ann@sender.test"
RECIPIENTS = ("bo@one.test", "cy@two.test", "di@three.test")
# Postfix's queue manager picks new mail up within a second; this is only the point of giving up.
DELIVERY_DEADLINE = 60


def submit(postfix_filter: PostfixFilter, subject: str) -> None:
    message = (
        f"From: Ann <{SENDER}>\r\nTo: {', '.join(RECIPIENTS)}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@sender.test>\r\n\r\nThe minutes are attached.\r\n"
    )
    with smtplib.SMTP("127.0.0.1", postfix_filter.port, timeout=30) as client:
        client.sendmail(SENDER, list(RECIPIENTS), message.encode())


def wait_for(upstream: Upstream, count: int, postfix_filter: PostfixFilter) -> list[Received]:
    deadline = time.monotonic() + DELIVERY_DEADLINE
    while len(upstream.messages) < count:
        if time.monotonic() > deadline:
            pytest.fail(
                f"{len(upstream.messages)} of {count} message(s) reached the sink; Postfix's queue:\n"
                f"{postfix_filter.postfix.queue_listing()}\n{postfix_filter.postfix.log[-4000:]}"
            )
        time.sleep(0.1)
    return list(upstream.messages)


def assert_one_private_copy_each(received: list[Received]) -> None:
    assert sorted(r for message in received for r in message.rcpt_tos) == sorted(RECIPIENTS)
    for message in received:
        (recipient,) = message.rcpt_tos
        parsed = email.message_from_bytes(message.data, policy=email.policy.default)
        assert parsed["To"].addresses[0].addr_spec == recipient
        assert len(parsed["To"].addresses) == 1
        headers = message.data.partition(b"\r\n\r\n")[0].decode()
        for other in set(RECIPIENTS) - {recipient}:
            assert other not in headers, f"{recipient}'s copy shows {other}"


def stop(relay: ServedRelay) -> None:
    relay.process.send_signal(signal.SIGTERM)
    assert relay.process.wait(PROCESS_DEADLINE) == 0, relay.log_path.read_text()


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("recipient_limit", [True, False], ids=["recipient-limit-1", "postfix-default"])
def test_three_recipients_in_to_reach_the_sink_as_three_private_copies(
    postfix_filter: Callable[..., PostfixFilter],
    serve_relay: Callable[..., ServedRelay],
    upstream: Upstream,
    recipient_limit: bool,
) -> None:
    # With the limit, privacy-relay sees one recipient per transaction and three in To: it still rewrites.
    through = postfix_filter(recipient_limit=recipient_limit)
    serve_relay(cwd=through.relay_folder, **through.relay_settings())
    submit(through, "minutes")
    assert_one_private_copy_each(wait_for(upstream, len(RECIPIENTS), through))
    time.sleep(1)  # nothing more is on its way
    assert len(upstream.messages) == len(RECIPIENTS)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_refusal_by_the_relay_comes_back_to_the_sender_as_postfixs_bounce_with_the_relays_text(
    postfix_filter: Callable[..., PostfixFilter], serve_relay: Callable[..., ServedRelay], upstream: Upstream
) -> None:
    through = postfix_filter()
    serve_relay(cwd=through.relay_folder, **through.relay_settings(RELAY_POLICY_ACTION="reject"))
    submit(through, "refused")
    (bounce,) = wait_for(upstream, 1, through)
    assert bounce.mail_from == "<>"
    assert bounce.rcpt_tos == [SENDER]
    text = " ".join(bounce.data.decode(errors="replace").split())
    assert "550 5.7.1 Not sent: this message would show 3 recipients' addresses to each other in To" in text
    for recipient in RECIPIENTS:
        assert f"<{recipient}>" in text


@pytest.mark.e2e
@pytest.mark.slow
def test_postfix_defers_while_the_relay_is_down_and_delivers_once_it_is_back(
    postfix_filter: Callable[..., PostfixFilter], serve_relay: Callable[..., ServedRelay], upstream: Upstream
) -> None:
    through = postfix_filter()
    stop(serve_relay(cwd=through.relay_folder, **through.relay_settings()))
    submit(through, "while down")
    deadline = time.monotonic() + DELIVERY_DEADLINE
    while "Connection refused" not in (listing := through.postfix.queue_listing()):
        assert time.monotonic() < deadline, f"Postfix did not defer:\n{listing}\n{through.postfix.log[-4000:]}"
        time.sleep(0.2)
    assert upstream.messages == []

    serve_relay(cwd=through.relay_folder, **through.relay_settings())
    # Flushed until delivered: a recipient still in the active queue when the first flush ran is
    # deferred after it, and would otherwise wait out Postfix's backoff.
    deadline = time.monotonic() + DELIVERY_DEADLINE
    while len(upstream.messages) < len(RECIPIENTS) and time.monotonic() < deadline:
        through.postfix.flush()
        time.sleep(2)
    assert_one_private_copy_each(wait_for(upstream, len(RECIPIENTS), through))
