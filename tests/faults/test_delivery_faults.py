"""Fault injection with the relay as a real process and a real upstream on loopback.

Each test says what it broke, and checks that every accepted copy arrived (lost = 0) and how many arrived
twice. The figures are printed (pytest -s shows them) for the delivery notes.
"""

from __future__ import annotations

import asyncio
import random
import resource
import smtplib
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.conftest import LOOPBACK, LoopThread, RecordingHandler, UpstreamFactory
from tests.support.spool import (
    FAST_RETRIES,
    RelayProcess,
    UpstreamOnPort,
    copy_keys,
    free_port,
    send_split_messages,
    wait_until,
)

pytestmark = pytest.mark.slow


def upstream_settings(port: int, **more: str) -> dict[str, str]:
    return {"RELAY_UPSTREAM_HOST": LOOPBACK, "RELAY_UPSTREAM_PORT": str(port), "RELAY_UPSTREAM_TLS": "none", **more}


def figures(
    name: str, accepted: list[tuple[str, str]], received: list[tuple[str, str]], **extra: int
) -> tuple[int, int]:
    counts = Counter(received)
    lost = len(set(accepted) - set(counts))
    repeated = sum(n - 1 for n in counts.values())
    details = " ".join(f"{k}={v}" for k, v in extra.items())
    counted = f"copies accepted={len(accepted)} received={len(received)} lost={lost} repeated={repeated}"
    print(f"\nFAULT {name}: {counted} {details}")
    return lost, repeated


class SlowHandler(RecordingHandler):
    """An upstream that takes a moment per message, so a crash finds copies in flight."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.sleep(0.01)
        return await super().handle_DATA(server, session, envelope)


def test_kill_9_while_delivering_then_restart_delivers_everything(loops: LoopThread, tmp_path: Path) -> None:
    upstream = UpstreamOnPort(loops, SlowHandler(), free_port())
    upstream.start()
    relay = RelayProcess(tmp_path, upstream_settings(upstream.port, RELAY_DELIVERY_MODE="queue", **FAST_RETRIES))
    try:
        accepted = send_split_messages(relay.port, count=30, recipients_each=10, tag="crash")
        assert wait_until(lambda: len(upstream.handler.messages) >= 60)
        relay.kill()
    finally:
        relay.stop()
    with sqlite3.connect(tmp_path / "spool" / "spool.db") as db:
        (in_flight,) = db.execute("SELECT count(*) FROM copies WHERE state = 'sending'").fetchone()
        (waiting,) = db.execute("SELECT count(*) FROM copies").fetchone()
    received_before_restart = len(upstream.handler.messages)
    assert received_before_restart < len(accepted) and waiting > 0, "the kill came too late to test anything"

    restarted = RelayProcess(tmp_path, upstream_settings(upstream.port, **FAST_RETRIES))
    try:
        assert wait_until(lambda: set(copy_keys(upstream.handler.messages)) >= set(accepted), limit=30)
        recovered = restarted.event("spool.recovered")
    finally:
        restarted.stop()
        upstream.stop()
    lost, repeated = figures(
        "kill -9",
        accepted,
        copy_keys(upstream.handler.messages),
        received_before_kill=received_before_restart,
        in_flight_at_kill=in_flight,
        left_in_spool=waiting,
    )
    assert lost == 0
    assert repeated <= in_flight
    # The restart counts the copies that may be repeated: those in flight at the kill.
    assert (recovered or {}).get("in_flight", 0) == in_flight


def test_upstream_down_while_accepting_then_back(loops: LoopThread, tmp_path: Path) -> None:
    upstream = UpstreamOnPort(loops, RecordingHandler(), free_port())
    relay = RelayProcess(tmp_path, upstream_settings(upstream.port, RELAY_DELIVERY_SYNC_TIMEOUT="2", **FAST_RETRIES))
    try:
        accepted = send_split_messages(relay.port, count=10, recipients_each=5, tag="down")
        assert upstream.handler.messages == []
        upstream.start()
        assert wait_until(lambda: set(copy_keys(upstream.handler.messages)) >= set(accepted))
    finally:
        relay.stop()
        upstream.stop()
    lost, repeated = figures("upstream down", accepted, copy_keys(upstream.handler.messages))
    assert (lost, repeated) == (0, 0)


class FlakyHandler(RecordingHandler):
    """Answers 4xx at random to a share of MAIL, RCPT and DATA commands."""

    def __init__(self, share: float, seed: int) -> None:
        super().__init__()
        self.share = share
        self.random = random.Random(seed)
        self.refusals = 0

    def flaky(self) -> str | None:
        if self.random.random() < self.share:
            self.refusals += 1
            return self.random.choice(["451 4.3.0 Temporary failure", "450 4.2.1 Mailbox busy", "452 4.3.1 Full"])
        return None

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        return self.flaky() or await super().handle_MAIL(server, session, envelope, address, options)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        return self.flaky() or await super().handle_RCPT(server, session, envelope, address, options)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return self.flaky() or await super().handle_DATA(server, session, envelope)


def test_random_4xx_to_a_share_of_commands(loops: LoopThread, tmp_path: Path) -> None:
    handler = FlakyHandler(share=0.3, seed=4)
    upstream = UpstreamOnPort(loops, handler, free_port())
    upstream.start()
    relay = RelayProcess(tmp_path, upstream_settings(upstream.port, **FAST_RETRIES))
    try:
        accepted = send_split_messages(relay.port, count=20, recipients_each=5, tag="flaky")
        assert wait_until(lambda: set(copy_keys(handler.messages)) >= set(accepted))
    finally:
        relay.stop()
        upstream.stop()
    lost, repeated = figures("random 4xx", accepted, copy_keys(handler.messages), refusals=handler.refusals)
    assert handler.refusals > 10
    assert (lost, repeated) == (0, 0)


def test_a_permanent_5xx_for_one_recipient_of_a_split_gives_one_dsn(
    make_upstream: UpstreamFactory, tmp_path: Path
) -> None:
    upstream = make_upstream()
    upstream.handler.rcpt_replies["r2.0@dsn2.test"] = "550 5.1.1 <r2.0@dsn2.test>: Recipient address rejected"
    relay = RelayProcess(tmp_path, upstream_settings(upstream.port, **FAST_RETRIES))
    try:
        accepted = send_split_messages(relay.port, count=1, recipients_each=5, tag="dsn")
        spool = tmp_path / "spool" / "spool.db"

        def spool_empty() -> bool:
            with sqlite3.connect(spool) as db:
                return db.execute("SELECT count(*) FROM messages").fetchone() == (0,)

        assert wait_until(lambda: len(upstream.messages) >= 5 and spool_empty())
    finally:
        relay.stop()
    dsns = [m for m in upstream.messages if m.rcpt_tos == ["sender@origin.test"]]
    copies = [m for m in upstream.messages if m not in dsns]
    expected = [key for key in accepted if key[1] != "r2.0@dsn2.test"]
    lost, repeated = figures("one 5xx", expected, copy_keys(copies), dsns=len(dsns))
    assert (lost, repeated) == (0, 0)
    assert len(dsns) == 1
    assert b"multipart/report; report-type=delivery-status" in dsns[0].data
    assert b"Final-Recipient: rfc822; r2.0@dsn2.test" in dsns[0].data
    assert b"Recipient address rejected" in dsns[0].data


def test_a_spool_that_cannot_be_written_gives_4xx_and_loses_nothing(
    make_upstream: UpstreamFactory, tmp_path: Path
) -> None:
    upstream = make_upstream()
    upstream.handler.mail_reply = "451 4.3.0 Not now"
    relay = RelayProcess(tmp_path, upstream_settings(upstream.port, RELAY_DELIVERY_SYNC_TIMEOUT="1", **FAST_RETRIES))
    pid = relay.process.pid
    try:
        accepted = send_split_messages(relay.port, count=5, recipients_each=2, tag="full")
        # No file may grow any more, as on a full disk: every write to the spool fails.
        soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, hard))
        with smtplib.SMTP(LOOPBACK, relay.port) as client, pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("sender@origin.test", ["x@one.test", "y@two.test"], b"Subject: full\r\n\r\nx\r\n")
        assert refused.value.smtp_code in (451, 452)
        assert refused.value.smtp_error.startswith((b"4.3.0", b"4.3.1"))
        assert wait_until(lambda: relay.event("spool.write_failed") is not None)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))
        upstream.handler.mail_reply = None
        assert wait_until(lambda: set(copy_keys(upstream.messages)) >= set(accepted))
    finally:
        relay.stop()
    received = copy_keys(upstream.messages)
    lost, repeated = figures("spool not writable", accepted, received, refused_while_full=1)
    assert lost == 0 and repeated == 0
    assert not any(subject == "full" for subject, _ in received)
