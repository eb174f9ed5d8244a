"""nmap's smtp-open-relay script against the relay on loopback: all 16 of its tricks must fail.

127.0.0.2 plays the outside client. A control run against a relay that does accept the scanner's
address shows that the script and this test do detect an open relay when there is one.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import structlog

from tests.conftest import Upstream

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def nmap_installed() -> None:
    if shutil.which("nmap") is None:
        if os.environ.get("PRIVACY_RELAY_TESTS_REQUIRE_NMAP") == "1":
            pytest.fail("nmap is not installed (apt-get install nmap), and PRIVACY_RELAY_TESTS_REQUIRE_NMAP=1")
        pytest.skip("needs nmap (Debian package nmap)")


def smtp_open_relay(port: int, source: str) -> str:
    """The script's verdict. `+` runs it on a port that nmap would not guess is SMTP."""
    result = subprocess.run(
        [
            "nmap", "-n", "-Pn", "-sT", "-S", source, "-e", "lo", "-p", str(port),
            "--script", "+smtp-open-relay", "--script-args", "smtp-open-relay.domain=nmap.test",
            "127.0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_control_a_relay_open_to_the_scanner_is_reported(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_LISTEN_ALLOWED_NETWORKS="127.0.0.0/8")
    assert "Server is an open relay" in smtp_open_relay(relay.port, "127.0.0.2")


def test_a_client_outside_allowed_networks_gets_nothing(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_LISTEN_ALLOWED_NETWORKS="127.0.0.1/32")
    with structlog.testing.capture_logs() as logs:
        verdict = smtp_open_relay(relay.port, "127.0.0.2")
    assert "open relay (" not in verdict
    refused = {entry.get("client") for entry in logs if entry["event"] == "connection.refused"}
    assert refused == {"127.0.0.2"}
    assert upstream.messages == []


def test_without_auth_where_it_is_required_every_trick_fails(start_relay, upstream: Upstream, write_users) -> None:
    users = write_users(kay=["kay@office.test"])
    relay = start_relay(
        upstream,
        RELAY_LISTEN_ALLOWED_NETWORKS="127.0.0.0/8",
        RELAY_LISTEN_AUTH="required",
        RELAY_LISTEN_USERS_FILE=str(users),
    )
    verdict = smtp_open_relay(relay.port, "127.0.0.2")
    assert "Server isn't an open relay, authentication needed" in verdict
    assert upstream.messages == []
