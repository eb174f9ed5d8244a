"""A throttling reply slows the relay's pace to the upstream instead of only retrying the copy."""

from __future__ import annotations

from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.conftest import LOOPBACK, LoopThread, RecordingHandler
from tests.support.spool import (
    FAST_RETRIES,
    RelayProcess,
    UpstreamOnPort,
    copy_keys,
    free_port,
    send_split_messages,
    wait_until,
)


class ThrottlingHandler(RecordingHandler):
    """Answers SES's throttling reply to the first few transactions."""

    def __init__(self, throttled: int) -> None:
        super().__init__()
        self.throttled = throttled

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.throttled > 0:
            self.throttled -= 1
            return "454 Throttling failure: Maximum sending rate exceeded."
        return await super().handle_MAIL(server, session, envelope, address, options)


def test_throttling_replies_slow_the_pace_and_everything_arrives(loops: LoopThread, tmp_path: Path) -> None:
    handler = ThrottlingHandler(throttled=2)
    upstream = UpstreamOnPort(loops, handler, free_port())
    upstream.start()
    settings = {
        "RELAY_UPSTREAM_HOST": LOOPBACK,
        "RELAY_UPSTREAM_PORT": str(upstream.port),
        "RELAY_UPSTREAM_TLS": "none",
    }
    relay = RelayProcess(tmp_path, {**settings, **FAST_RETRIES, "RELAY_DELIVERY_MODE": "queue"})
    try:
        accepted = send_split_messages(relay.port, count=1, recipients_each=3, tag="throttle")
        assert wait_until(lambda: set(copy_keys(handler.messages)) >= set(accepted))
    finally:
        relay.stop()
        upstream.stop()
    throttled = [e for e in relay.events if e.get("event") == "upstream.throttling"]
    assert [e["reply"] for e in throttled] == ["454 4.0.0"] * 2
    # The pace doubles with each throttling reply: one transaction a second, then one every two.
    assert [e["pace_seconds"] for e in throttled] == [1.0, 2.0]
