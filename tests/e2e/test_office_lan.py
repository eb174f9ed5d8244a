"""The office guide's configuration on a LAN of its own: network namespaces for the relay's machine
and a desk, joined by a veth pair, with addresses that exist only inside them (needs root and `ip`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RelayCertificate
from tests.e2e.conftest import CONSOLE_SCRIPT, PROCESS_DEADLINE

pytestmark = pytest.mark.slow

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "office-relay.md"
RELAY_ADDRESS = "192.168.1.10"  # listen.allowed_networks in the guide: 192.168.1.0/24
DESK_ADDRESS = "192.168.1.20"
OUTSIDE_ADDRESS = "192.168.2.20"  # on the same wire, but outside allowed_networks
FIRST_LINE = (
    "import socket, sys\n"
    "with socket.create_connection((sys.argv[1], 587), timeout=10, source_address=(sys.argv[2], 0)) as s:\n"
    "    print(s.recv(200).decode().splitlines()[0])\n"
)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def lan() -> Iterator[tuple[str, str]]:
    """(office namespace, desk namespace), removed afterwards with everything in them."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    office, desk = f"pr-office-{os.getpid()}", f"pr-desk-{os.getpid()}"
    office_end, desk_end = f"pro{os.getpid() % 100000}", f"prd{os.getpid() % 100000}"
    ip("netns", "add", office)
    try:
        ip("netns", "add", desk)
        ip("link", "add", office_end, "netns", office, "type", "veth", "peer", "name", desk_end, "netns", desk)
        for namespace, link in ((office, office_end), (desk, desk_end)):
            ip("-n", namespace, "link", "set", "lo", "up")
            ip("-n", namespace, "link", "set", link, "up")
        ip("-n", office, "address", "add", f"{RELAY_ADDRESS}/24", "dev", office_end)
        ip("-n", office, "route", "add", "192.168.2.0/24", "dev", office_end)
        ip("-n", desk, "address", "add", f"{DESK_ADDRESS}/24", "dev", desk_end)
        ip("-n", desk, "address", "add", f"{OUTSIDE_ADDRESS}/24", "dev", desk_end)
        yield office, desk
    finally:
        subprocess.run(["ip", "netns", "delete", desk], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "delete", office], capture_output=True, timeout=30)


def guide_config(folder: Path, certificate: RelayCertificate) -> Path:
    """The guide's "configuration for port 587", with its files in `folder` instead of /etc and /var."""
    text = re.search(r"## A configuration for port 587\n\n```yaml\n(.*?)^```$", GUIDE.read_text(), re.M | re.S)
    assert text is not None
    config = text.group(1).replace("/etc/privacy-relay/", f"{folder}/").replace("/var/spool/", f"{folder}/")
    (folder / "upstream-password").write_text("not used here\n")
    for name, source in (("relay.crt", certificate.cert_file), ("relay.key", certificate.key_file)):
        (folder / name).write_bytes(source.read_bytes())
    (folder / "relay.key").chmod(0o600)
    path = folder / "relay.yaml"
    path.write_text(config)
    return path


def first_line(namespace: str, server: str, source: str) -> str:
    command = ["ip", "netns", "exec", namespace, sys.executable, "-c", FIRST_LINE, server, source]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=30).stdout.strip()


def test_the_guides_configuration_serves_the_lan_and_this_machine_and_refuses_others(
    lan: tuple[str, str], relay_certificate: RelayCertificate, tmp_path: Path
) -> None:
    office, desk = lan
    config = guide_config(tmp_path, relay_certificate)
    environ = {name: value for name, value in os.environ.items() if not name.startswith("RELAY_")}
    environ["RELAY_LOGGING_FORMAT"] = "json"
    add_user = ["user", "add", "kay", "--address", "kay@company.example", "--config", str(config)]
    added = subprocess.run(
        ["ip", "netns", "exec", office, CONSOLE_SCRIPT, *add_user],
        input="a desk's long password",
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    assert str(tmp_path / "users.yaml") in added.stdout
    log = tmp_path / "relay.log"
    with open(log, "wb") as output:
        relay = subprocess.Popen(
            ["ip", "netns", "exec", office, CONSOLE_SCRIPT, "serve", "--config", str(config)],
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )
    try:
        deadline = time.monotonic() + PROCESS_DEADLINE
        while b'"relay.started"' not in log.read_bytes():
            assert relay.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert first_line(desk, RELAY_ADDRESS, DESK_ADDRESS).startswith("220 relay.company.example ")
        assert first_line(office, "127.0.0.1", "127.0.0.1").startswith("220 relay.company.example ")
        assert first_line(desk, RELAY_ADDRESS, OUTSIDE_ADDRESS).startswith("554 5.7.1 ")
    finally:
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(PROCESS_DEADLINE) == 0, log.read_text()
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    refused = [event["client"] for event in events if event.get("event") == "connection.refused"]
    assert refused == [OUTSIDE_ADDRESS]
