"""End-to-end fixtures: `privacy-relay serve` as a real subprocess, a private Postfix with
privacy-relay as its content filter, and Debian's headless Chromium for the console.

The relay listens on port 0 and its JSON start-up log line says which port it got, so no test ever
races another process for a "free" port. The swaks fixtures are in tests/conftest.py. Set
PRIVACY_RELAY_TESTS_REQUIRE_POSTFIX=1 (as .ci/run does as root) to make a missing Postfix (or not
being root, which a private Postfix needs) a failure instead of a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.postfix import PostfixRelay, postfix_available
from bench.procs import free_port
from tests.conftest import LoopThread, Upstream

CONSOLE_SCRIPT = str(Path(sys.executable).with_name("privacy-relay"))
CONTRIB_POSTFIX = Path(__file__).resolve().parents[2] / "contrib" / "postfix"
# The ports the contrib files name: the tests put free ones in their place.
CONTRIB_FILTER_PORT = 10025
CONTRIB_REINJECTION_PORT = 10026
# How long a relay may take to start or stop before the test fails instead of hanging.
PROCESS_DEADLINE = 30


@dataclass
class ServedRelay:
    process: subprocess.Popen[bytes]
    port: int
    cwd: Path
    log_path: Path

    def log_events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]


def _started_port(log_path: Path) -> int | None:
    for line in log_path.read_text().splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "relay.started":
                return int(str(event["listen"]).rpartition(":")[2])
    return None


def _wait_until_serving(process: subprocess.Popen[bytes], log_path: Path) -> int:
    deadline = time.monotonic() + PROCESS_DEADLINE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"privacy-relay serve exited with {process.returncode}:\n{log_path.read_text()}")
        port = _started_port(log_path)
        if port is not None:
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                return port
        time.sleep(0.05)
    pytest.fail(f"privacy-relay serve did not start listening:\n{log_path.read_text()}")


@pytest.fixture
def serve_relay(tmp_path: Path, loops: LoopThread) -> Iterator[Callable[..., ServedRelay]]:
    """serve_relay(RELAY_POLICY_ACTION="bcc", ...) -> a running `privacy-relay serve`; stopped with
    SIGTERM after the test, which must make it exit 0.

    It depends on `loops` so that the upstreams' event loop still runs while the relay stops: the
    relay says QUIT on its pooled upstream connections on the way out."""
    started: list[ServedRelay] = []

    def start(cwd: Path | None = None, **settings: str) -> ServedRelay:
        cwd = cwd or tmp_path
        environ = {name: value for name, value in os.environ.items() if not name.startswith("RELAY_")}
        environ.update(
            {
                "RELAY_LISTEN_PORT": "0",
                "RELAY_CONSOLE_PORT": "0",
                "RELAY_LOGGING_FORMAT": "json",
                "RELAY_DELIVERY_MODE": "direct",
                **settings,
            }
        )
        log_path = tmp_path / f"relay-{len(started)}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [CONSOLE_SCRIPT, "serve"], cwd=cwd, env=environ, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        relay = ServedRelay(process, 0, cwd, log_path)
        started.append(relay)
        relay.port = _wait_until_serving(process, log_path)
        return relay

    yield start
    for relay in started:
        if relay.process.poll() is None:
            relay.process.send_signal(signal.SIGTERM)
        try:
            returncode = relay.process.wait(PROCESS_DEADLINE)
        except subprocess.TimeoutExpired:
            relay.process.kill()
            relay.process.wait()
            pytest.fail(f"privacy-relay serve ignored SIGTERM:\n{relay.log_path.read_text()}")
        assert returncode == 0, relay.log_path.read_text()


@dataclass
class PostfixFilter:
    """A private Postfix that relays to the test's upstream (the sink) through privacy-relay."""

    postfix: PostfixRelay
    # Where Postfix's privacy-relay transport connects, and where privacy-relay hands copies back.
    filter_port: int
    reinjection_port: int
    # privacy-relay's config: contrib/postfix/privacy-relay.yaml, as config/relay.yaml in this folder.
    relay_folder: Path

    @property
    def port(self) -> int:
        """Postfix's own smtpd, where mail is submitted."""
        return self.postfix.port

    def relay_settings(self, **settings: str) -> dict[str, str]:
        """serve_relay's arguments for privacy-relay as this Postfix's filter, with the free ports."""
        return {
            "RELAY_LISTEN_PORT": str(self.filter_port),
            "RELAY_UPSTREAM_PORT": str(self.reinjection_port),
            **settings,
        }


def contrib_main_settings() -> dict[str, str]:
    """contrib/postfix/main.cf.snippet as parameter -> value."""
    settings = {}
    for line in (CONTRIB_POSTFIX / "main.cf.snippet").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            settings[name.strip()] = value.strip()
    return settings


@pytest.fixture
def postfix_filter(tmp_path: Path, upstream: Upstream) -> Iterator[Callable[..., PostfixFilter]]:
    """postfix_filter(recipient_limit=True) -> Postfix with contrib/postfix's lines (free ports in place of
    10025 and 10026), relaying to `upstream`; recipient_limit=False leaves out the recipient limit of 1.
    Start privacy-relay with serve_relay(cwd=filter.relay_folder, RELAY_LISTEN_PORT=..., ...)."""
    if not postfix_available() or os.geteuid() != 0:
        reason = "needs Postfix (apt-get install postfix) and root to start a private instance"
        if os.environ.get("PRIVACY_RELAY_TESTS_REQUIRE_POSTFIX") == "1":
            pytest.fail(f"{reason}, and PRIVACY_RELAY_TESTS_REQUIRE_POSTFIX=1")
        pytest.skip(reason)
    started: list[PostfixRelay] = []
    roots: list[Path] = []

    def start(recipient_limit: bool = True) -> PostfixFilter:
        filter_port, reinjection_port = free_port(), free_port()
        settings = contrib_main_settings()
        settings["content_filter"] = settings["content_filter"].replace(f":{CONTRIB_FILTER_PORT}", f":{filter_port}")
        if not recipient_limit:
            del settings["privacy-relay_destination_recipient_limit"]
        services = (CONTRIB_POSTFIX / "master.cf.snippet").read_text()
        services = services.replace(f"127.0.0.1:{CONTRIB_REINJECTION_PORT} ", f"127.0.0.1:{reinjection_port} ")
        # Not under tmp_path: pytest makes its folders 0700, and Postfix's daemons run as the postfix user.
        root = Path(tempfile.mkdtemp(prefix="privacy-relay-postfix-"))
        roots.append(root)
        postfix = PostfixRelay(root, upstream.port, settings, services)
        started.append(postfix)
        relay_folder = tmp_path / f"filter-{len(started)}"
        (relay_folder / "config").mkdir(parents=True)
        shutil.copy(CONTRIB_POSTFIX / "privacy-relay.yaml", relay_folder / "config" / "relay.yaml")
        return PostfixFilter(postfix, filter_port, reinjection_port, relay_folder)

    yield start
    for postfix in started:
        postfix.stop()
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Debian's headless Chromium through its chromedriver (Selenium is never allowed to fetch a browser)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("PRIVACY_RELAY_TESTS_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium or chromium-driver is not installed, and PRIVACY_RELAY_TESTS_REQUIRE_CHROMIUM=1")
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1100,900",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(PROCESS_DEADLINE)
    try:
        yield driver
    finally:
        driver.quit()
