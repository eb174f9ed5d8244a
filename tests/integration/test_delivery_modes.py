"""hybrid and queue delivery through the spool: what the client is told, and that everything arrives."""

from __future__ import annotations

import smtplib
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from email import message_from_bytes
from email.policy import default
from pathlib import Path

import pytest

from tests.conftest import Upstream
from tests.support.spool import FAST_RETRIES, wait_until

SENDER = "coach@coaching.test"
RECIPIENTS = ["ann@one.test", "bob@two.test", "cy@three.test"]
MESSAGE = (
    b"From: Coach <coach@coaching.test>\r\n"
    b"To: ann@one.test, bob@two.test, cy@three.test\r\n"
    b"Subject: Workshop\r\n"
    b"\r\n"
    b"See you there.\r\n"
)


def send(relay, recipients: list[str] = RECIPIENTS, message: bytes = MESSAGE) -> tuple[int, bytes]:
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo()
        client.mail(SENDER)
        for recipient in recipients:
            assert client.rcpt(recipient)[0] == 250
        return client.data(message)


def spool_rows(tmp_path: Path, query: str) -> list[tuple]:
    with sqlite3.connect(tmp_path / "spool" / "spool.db") as db:
        return db.execute(query).fetchall()


def test_hybrid_is_the_default_and_answers_250_once_the_upstream_took_every_copy(
    start_relay, upstream: Upstream, tmp_path: Path
) -> None:
    relay = start_relay(upstream)
    code, text = send(relay)
    assert code == 250 and b"relayed as 3 copies" in text
    assert sorted(r for m in upstream.messages for r in m.rcpt_tos) == sorted(RECIPIENTS)
    assert spool_rows(tmp_path, "SELECT count(*) FROM messages") == [(0,)]


def test_a_big_split_leaves_room_for_another_message(start_relay, upstream: Upstream) -> None:
    upstream.handler.data_delay = 0.05
    relay = start_relay(upstream, RELAY_UPSTREAM_MAX_CONNECTIONS="2")
    newsletter_to = [f"member{n}@club{n}.test" for n in range(20)]
    newsletter = f"From: coach@coaching.test\r\nTo: {', '.join(newsletter_to)}\r\nSubject: News\r\n\r\nHi\r\n"
    with ThreadPoolExecutor(1) as background:
        sending = background.submit(send, relay, newsletter_to, newsletter.encode())
        wait_until(lambda: len(upstream.messages) >= 2)
        code, _ = send(relay, ["ann@one.test"], b"From: coach@coaching.test\r\nTo: ann@one.test\r\n\r\nHi\r\n")
        assert code == 250
        assert sending.result()[0] == 250
    order = [m.rcpt_tos for m in upstream.messages]
    # The newsletter's copies take at most max_connections connections at a time: Ann's message goes
    # out among them, not after all twenty.
    assert order.index(["ann@one.test"]) < 10


def test_concurrent_clients_each_get_250_after_their_own_commit(
    start_relay, upstream: Upstream, tmp_path: Path
) -> None:
    relay = start_relay(upstream)

    def one_client(number: int) -> tuple[int, bytes]:
        recipients = [f"c{number}.{n}@x{n}.test" for n in range(3)]
        message = f"From: coach@coaching.test\r\nTo: {', '.join(recipients)}\r\nSubject: {number}\r\n\r\nHi\r\n"
        return send(relay, recipients, message.encode())

    with ThreadPoolExecutor(max_workers=20) as clients:
        replies = list(clients.map(one_client, range(20)))
    assert all(code == 250 for code, _ in replies)
    assert wait_until(lambda: len(upstream.messages) == 60)
    assert len({r for m in upstream.messages for r in m.rcpt_tos}) == 60
    assert wait_until(lambda: spool_rows(tmp_path, "SELECT count(*) FROM messages") == [(0,)])


def test_hybrid_gives_the_client_the_upstream_5xx_when_every_copy_is_refused(
    start_relay, upstream: Upstream, tmp_path: Path
) -> None:
    upstream.handler.mail_reply = "550 5.7.1 Sender address rejected: not owned by user"
    relay = start_relay(upstream)
    code, text = send(relay)
    assert code == 550 and b"5.7.1" in text and b"not owned by user" in text
    assert upstream.messages == []
    # The client has the error; no DSN follows and the message leaves the spool.
    assert spool_rows(tmp_path, "SELECT count(*) FROM messages") == [(0,)]


def test_hybrid_answers_250_on_a_temporary_failure_and_delivers_from_the_spool(start_relay, upstream: Upstream) -> None:
    upstream.handler.mail_reply = "451 4.3.0 Try again later"
    relay = start_relay(upstream, RELAY_DELIVERY_MIN_BACKOFF="0.2", RELAY_DELIVERY_MAX_BACKOFF="0.2")
    code, text = send(relay)
    assert code == 250 and b"will be sent from the queue" in text
    upstream.handler.mail_reply = None
    assert wait_until(lambda: len(upstream.messages) == 3)


def test_hybrid_answers_250_when_the_upstream_is_slower_than_sync_timeout(
    start_relay, upstream: Upstream, loops
) -> None:
    upstream.handler.mail_reply = "451 4.3.0 Try again later"
    relay = start_relay(upstream, RELAY_DELIVERY_SYNC_TIMEOUT="0", **FAST_RETRIES)
    code, text = send(relay)
    assert code == 250 and b"queued as" in text
    upstream.handler.mail_reply = None
    assert wait_until(lambda: len(upstream.messages) == 3)


def test_queue_mode_answers_at_once_and_delivers_in_the_background(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_DELIVERY_MODE="queue")
    code, text = send(relay)
    assert code == 250 and b"3 of 3 copies will be sent from the queue" in text
    assert wait_until(lambda: len(upstream.messages) == 3)
    for received in upstream.messages:
        assert received.data.endswith(b"\r\n\r\nSee you there.\r\n")


def test_one_refused_recipient_of_a_split_gets_a_dsn_and_the_others_their_copies(
    start_relay, upstream: Upstream, tmp_path: Path
) -> None:
    upstream.handler.rcpt_replies["bob@two.test"] = "550 5.1.1 No such user here"
    relay = start_relay(upstream)
    code, text = send(relay)
    assert code == 250 and b"a delivery report goes to the sender" in text
    assert wait_until(lambda: len(upstream.messages) == 3)
    copies = [m for m in upstream.messages if m.rcpt_tos != [SENDER]]
    assert sorted(r for m in copies for r in m.rcpt_tos) == ["ann@one.test", "cy@three.test"]
    (dsn,) = [m for m in upstream.messages if m.rcpt_tos == [SENDER]]
    parsed = message_from_bytes(dsn.data, policy=default)
    assert parsed.get_content_type() == "multipart/report"
    assert b"Final-Recipient: rfc822; bob@two.test" in dsn.data
    assert b"Diagnostic-Code: smtp; 550 5.1.1 No such user here" in dsn.data
    assert wait_until(lambda: spool_rows(tmp_path, "SELECT count(*) FROM messages") == [(0,)])


def test_a_bounce_that_cannot_be_sent_is_kept_in_outbox_failed(start_relay, upstream: Upstream, tmp_path: Path) -> None:
    upstream.handler.rcpt_replies["bob@two.test"] = "550 5.1.1 No such user here"
    upstream.handler.rcpt_replies[SENDER] = "550 5.1.1 The sender's mailbox is gone too"
    relay = start_relay(upstream)
    assert send(relay)[0] == 250
    failed = tmp_path / "outbox" / "failed"
    assert wait_until(lambda: failed.is_dir() and len(list(failed.glob("*.eml"))) == 1)
    (kept,) = failed.glob("*.eml")
    assert b"Final-Recipient: rfc822; bob@two.test" in kept.read_bytes()
    assert len(upstream.messages) == 2
    assert wait_until(lambda: spool_rows(tmp_path, "SELECT count(*) FROM messages") == [(0,)])


def test_a_null_sender_gets_no_bounce(start_relay, upstream: Upstream, tmp_path: Path) -> None:
    upstream.handler.rcpt_replies["bob@two.test"] = "550 5.1.1 No such user here"
    relay = start_relay(upstream)
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo()
        client.mail("<>")
        for recipient in RECIPIENTS:
            client.rcpt(recipient)
        assert client.data(MESSAGE)[0] == 250
    failed = tmp_path / "outbox" / "failed"
    assert wait_until(lambda: failed.is_dir() and len(list(failed.glob("*.eml"))) == 1)
    assert sorted(r for m in upstream.messages for r in m.rcpt_tos) == ["ann@one.test", "cy@three.test"]


@pytest.mark.parametrize("mode", ["hybrid", "queue", "direct"])
def test_a_bcc_copy_with_more_recipients_than_the_provider_takes_goes_as_several_transactions(
    start_relay, upstream: Upstream, mode: str
) -> None:
    recipients = [f"r{n}@x{n}.test" for n in range(5)]
    message = b"From: coach@coaching.test\r\nTo: " + ", ".join(recipients).encode() + b"\r\nSubject: s\r\n\r\nbody\r\n"
    relay = start_relay(
        upstream, RELAY_POLICY_ACTION="bcc", RELAY_UPSTREAM_MAX_RECIPIENTS_PER_MESSAGE="2", RELAY_DELIVERY_MODE=mode
    )
    assert send(relay, recipients, message)[0] == 250
    assert wait_until(lambda: len(upstream.messages) == 3)
    assert sorted(len(m.rcpt_tos) for m in upstream.messages) == [1, 2, 2]
    assert sorted(r for m in upstream.messages for r in m.rcpt_tos) == recipients


def test_copies_over_the_daily_cap_wait_in_the_spool(start_relay, upstream: Upstream, tmp_path: Path) -> None:
    relay = start_relay(upstream, RELAY_UPSTREAM_RATE_LIMIT_PER_DAY="2")
    code, text = send(relay)
    assert code == 250 and b"1 of 3 copies will be sent from the queue" in text
    assert len(upstream.messages) == 2
    ((waiting, next_attempt, attempts),) = spool_rows(tmp_path, "SELECT state, next_attempt, attempts FROM copies")
    assert (waiting, attempts) == ("queued", 0)
    received_at = spool_rows(tmp_path, "SELECT received_at FROM messages")[0][0]
    assert next_attempt > received_at + 86_000


def test_a_copy_retried_until_max_age_fails_with_a_dsn_saying_so(
    start_relay, upstream: Upstream, tmp_path: Path
) -> None:
    upstream.handler.rcpt_replies["bob@two.test"] = "451 4.2.2 Mailbox full, try later"
    relay = start_relay(upstream, RELAY_DELIVERY_MAX_AGE="0.5", **FAST_RETRIES)
    assert send(relay)[0] == 250
    assert wait_until(lambda: any(m.rcpt_tos == [SENDER] for m in upstream.messages))
    (dsn,) = [m for m in upstream.messages if m.rcpt_tos == [SENDER]]
    assert b"Final-Recipient: rfc822; bob@two.test" in dsn.data
    assert b"Status: 4.4.7" in dsn.data
    assert b"451 4.2.2 Mailbox full, try later (gave up after" in dsn.data
    assert sorted(r for m in upstream.messages for r in m.rcpt_tos) == sorted(["ann@one.test", "cy@three.test", SENDER])


# The test upstream takes AUTH without TLS, which aiosmtpd warns about.
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_a_wrong_upstream_password_reaches_the_waiting_client(start_relay, make_upstream, tmp_path: Path) -> None:
    upstream = make_upstream(credentials=("relay", "right"))
    hybrid = start_relay(upstream, RELAY_UPSTREAM_USERNAME="relay", RELAY_UPSTREAM_PASSWORD="wrong")
    code, text = send(hybrid)
    assert code == 535 and b"check upstream.username and the password" in text
    assert spool_rows(tmp_path, "SELECT count(*) FROM messages") == [(0,)]


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_queued_mail_waits_for_a_wrong_password_to_be_fixed(start_relay, make_upstream, tmp_path: Path) -> None:
    upstream = make_upstream(credentials=("relay", "right"))
    relay = start_relay(
        upstream,
        RELAY_DELIVERY_MODE="queue",
        RELAY_UPSTREAM_USERNAME="relay",
        RELAY_UPSTREAM_PASSWORD="wrong",
        **FAST_RETRIES,
    )
    assert send(relay)[0] == 250
    assert wait_until(lambda: spool_rows(tmp_path, "SELECT min(attempts) FROM copies") >= [(2,)])
    assert spool_rows(tmp_path, "SELECT count(*) FROM failures") == [(0,)]
    assert (tmp_path / "outbox" / "failed").exists() is False
