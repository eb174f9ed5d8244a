"""One console, whatever listen.workers is, and its metrics count every worker's mail."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.conftest import LOOPBACK, UpstreamFactory
from tests.integration.test_console import metric
from tests.support.console import ConsoleClient, send
from tests.support.spool import RelayProcess, wait_until

pytestmark = pytest.mark.e2e
TEAM = ["ann@families.test", "bob@families.test", "cy@parents.test"]


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_and_activity_after_known_traffic(workers: int, make_upstream: UpstreamFactory, tmp_path: Path) -> None:
    upstream = make_upstream()
    relay = RelayProcess(
        tmp_path,
        {
            "RELAY_LISTEN_WORKERS": str(workers),
            "RELAY_UPSTREAM_HOST": LOOPBACK,
            "RELAY_UPSTREAM_PORT": str(upstream.port),
            "RELAY_UPSTREAM_TLS": "none",
        },
    )
    try:
        assert wait_until(lambda: relay.event("console.started") is not None)
        consoles = [e for e in relay.events if e.get("event") == "console.started"]
        assert len(consoles) == 1, "exactly one console, whatever the number of workers"
        url = str(consoles[0]["url"])
        port = int(url.split(":")[2].split("/")[0])
        client = ConsoleClient(port, url.split("token=")[1])
        for number in range(6):  # one connection each: the supervisor deals them out in turn
            assert send(relay.port, TEAM, subject=f"Round {number}").startswith("250")
        assert send(relay.port, TEAM, subject="Broken", body="NUL \x00 byte").startswith("550")
        started = {e["pid"] for e in relay.events if e.get("event") == "relay.started"}
        assert len(started) == workers
        assert wait_until(lambda: len(upstream.messages) == 18)
        text = client.get("/metrics").text
        assert metric(text, 'privacy_relay_messages_total{decision="split"}') == 6
        assert metric(text, 'privacy_relay_messages_total{decision="refused"}') == 1
        assert metric(text, 'privacy_relay_copies_total{result="delivered"}') == 18
        assert metric(text, "privacy_relay_smtp_connections_total") == 7
        assert metric(text, "privacy_relay_delivery_seconds_count") == 18
        subjects = {m["subject"] for m in client.get("/api/messages").json()["messages"]}
        assert subjects == {f"Round {n}" for n in range(6)} | {"Broken"}
        assert client.get("/healthz", bearer=False).status == 200
        assert relay.terminate() == 0
    finally:
        relay.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_the_console_shows_the_policy_reloaded_by_sighup(workers: int, tmp_path: Path) -> None:
    config_file = tmp_path / "config" / "relay.yaml"
    config_file.parent.mkdir()
    config_file.write_text("policy:\n  action: split\n")
    relay = RelayProcess(tmp_path, {"RELAY_LISTEN_WORKERS": str(workers)})
    try:
        assert wait_until(lambda: relay.event("console.started") is not None)
        url = str(relay.event("console.started")["url"])  # type: ignore[index]
        client = ConsoleClient(int(url.split(":")[2].split("/")[0]), url.split("token=")[1])
        assert "<dd>split when" in client.get("/status").text
        config_file.write_text("policy:\n  action: bcc\n")
        relay.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "<dd>bcc when" in client.get("/status").text)
        assert relay.terminate() == 0
    finally:
        relay.stop()
