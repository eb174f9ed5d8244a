"""`privacy-relay queue list | show | retry | delete`, run while the relay is running, on either spool."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import LOOPBACK, UpstreamFactory
from tests.support.spool import RelayProcess, send_split_messages, wait_until


def queue(relay: RelayProcess, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "queue", *arguments],
        env=relay.environ,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_queue_commands_while_the_relay_runs(
    make_upstream: UpstreamFactory, tmp_path: Path, spool_settings: dict[str, str]
) -> None:
    upstream = make_upstream()
    upstream.handler.rcpt_replies["r1.0@q1.test"] = "451 4.2.2 Mailbox full, try later"
    relay = RelayProcess(
        tmp_path,
        {
            "RELAY_UPSTREAM_HOST": LOOPBACK,
            "RELAY_UPSTREAM_PORT": str(upstream.port),
            "RELAY_UPSTREAM_TLS": "none",
            "RELAY_DELIVERY_MIN_BACKOFF": "1h",
            "RELAY_DELIVERY_MAX_BACKOFF": "2h",
            **spool_settings,
        },
    )
    try:
        send_split_messages(relay.port, count=2, recipients_each=2, tag="q")
        assert wait_until(lambda: len(upstream.messages) == 3)
        listed = queue(relay, "list")
        assert listed.returncode == 0, listed.stderr
        assert "1 message(s), 1 copy waiting." in listed.stdout
        queue_id = listed.stdout.splitlines()[1].split()[0]

        shown = queue(relay, "show", queue_id)
        assert shown.returncode == 0
        assert "to r1.0@q1.test" in shown.stdout and "attempts so far: 1" in shown.stdout
        assert "last reply: 451 4.2.2 Mailbox full, try later" in shown.stdout

        upstream.handler.rcpt_replies.clear()
        retried = queue(relay, "retry", queue_id)
        assert retried.returncode == 0 and "1 copy will be sent again" in retried.stdout
        assert wait_until(lambda: len(upstream.messages) == 4)
        assert wait_until(lambda: "The spool is empty." in queue(relay, "list").stdout)

        upstream.handler.rcpt_replies["r0.0@q0.test"] = "451 4.2.2 Mailbox full, try later"
        send_split_messages(relay.port, count=1, recipients_each=2, tag="q")
        assert wait_until(lambda: "1 copy waiting" in queue(relay, "list").stdout)
        second_id = queue(relay, "list").stdout.splitlines()[1].split()[0]
        deleted = queue(relay, "delete", second_id)
        assert deleted.returncode == 0 and "no delivery report" in deleted.stdout
        assert queue(relay, "show", second_id).returncode == 1
        assert "The spool is empty." in queue(relay, "list").stdout
        assert relay.process.poll() is None
    finally:
        relay.stop()


def test_queue_without_a_spool_says_so(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relay", "queue", "list"],
        env={"RELAY_SPOOL_PATH": str(tmp_path / "nowhere"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 1 and "There is no spool" in result.stderr
