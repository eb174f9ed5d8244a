"""The relay as a process: SIGTERM lets copies in flight finish and keeps the rest; SIGHUP reloads the config."""

from __future__ import annotations

import asyncio
import signal
import smtplib
import sqlite3
from collections import Counter
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.conftest import LOOPBACK, LoopThread, RecordingHandler, UpstreamFactory
from tests.support.spool import RelayProcess, UpstreamOnPort, copy_keys, free_port, send_split_messages, wait_until


class SlowHandler(RecordingHandler):
    """Takes a while per message, so a SIGTERM finds copies in flight."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.sleep(0.3)
        return await super().handle_DATA(server, session, envelope)


def upstream_settings(port: int, **more: str) -> dict[str, str]:
    return {"RELAY_UPSTREAM_HOST": LOOPBACK, "RELAY_UPSTREAM_PORT": str(port), "RELAY_UPSTREAM_TLS": "none", **more}


def test_sigterm_finishes_copies_in_flight_keeps_the_rest_and_exits_0(loops: LoopThread, tmp_path: Path) -> None:
    upstream = UpstreamOnPort(loops, SlowHandler(), free_port())
    upstream.start()
    relay = RelayProcess(tmp_path, upstream_settings(upstream.port, RELAY_DELIVERY_MODE="queue"))
    try:
        accepted = send_split_messages(relay.port, count=1, recipients_each=20, tag="term")
        assert wait_until(lambda: len(upstream.handler.messages) >= 1)
        assert relay.terminate() == 0
        stopped = relay.event("delivery.stopped")
    finally:
        relay.stop()
    assert stopped is not None and stopped["left"] == 0
    with sqlite3.connect(tmp_path / "spool" / "spool.db") as db:
        states = dict(db.execute("SELECT state, count(*) FROM copies GROUP BY state").fetchall())
    delivered = len(upstream.handler.messages)
    assert states == {"queued": len(accepted) - delivered}
    # After the restart the rest arrives, and nothing twice: no copy was cut off mid-send.
    restarted = RelayProcess(tmp_path, upstream_settings(upstream.port))
    try:
        assert wait_until(lambda: set(copy_keys(upstream.handler.messages)) >= set(accepted))
    finally:
        restarted.stop()
        upstream.stop()
    assert max(Counter(copy_keys(upstream.handler.messages)).values()) == 1
    assert restarted.event("spool.recovered") is None


def test_sighup_reloads_policy_and_upstream_and_refuses_a_bad_config(
    make_upstream: UpstreamFactory, tmp_path: Path
) -> None:
    first, second = make_upstream(), make_upstream()
    config = tmp_path / "relay.yaml"
    config.write_text(f"upstream: {{host: {LOOPBACK}, port: {first.port}, tls: none}}\npolicy: {{action: split}}\n")
    relay = RelayProcess(tmp_path, {}, ("--config", str(config)))
    try:
        with smtplib.SMTP(LOOPBACK, relay.port) as client:
            config.write_text(
                f"upstream: {{host: {LOOPBACK}, port: {second.port}, tls: none}}\npolicy: {{action: bcc}}\n"
            )
            relay.process.send_signal(signal.SIGHUP)
            assert wait_until(lambda: relay.event("config.reloaded") is not None)
            # The connection opened before the reload carries on, under the new policy and upstream.
            send_split_messages_on(client, "after-reload")
        assert wait_until(lambda: len(second.messages) == 1)
        assert len(second.messages[0].rcpt_tos) == 3 and first.messages == []
        config.write_text("policy: {action: shout}\n")
        relay.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: relay.event("config.reload_refused") is not None)
        assert "policy.action" in str(relay.event("config.reload_refused"))
        send_split_messages(relay.port, count=1, recipients_each=3, tag="still-bcc")
        assert wait_until(lambda: len(second.messages) == 2)
        assert len(second.messages[1].rcpt_tos) == 3
        assert relay.process.poll() is None
    finally:
        relay.stop()


def send_split_messages_on(client: smtplib.SMTP, tag: str) -> None:
    recipients = [f"r{n}@{tag}{n}.test" for n in range(3)]
    message = f"From: sender@origin.test\r\nTo: {', '.join(recipients)}\r\nSubject: {tag}\r\n\r\nHi.\r\n".encode()
    assert client.sendmail("sender@origin.test", recipients, message) == {}
