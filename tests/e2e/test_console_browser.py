"""The console in a real browser (Debian's Chromium): open the token URL, watch mail arrive, release by clicking.

Each page is saved as a screenshot, at a desktop and a phone width, under the test's tmp_path (and in
$PRIVACY_RELAY_SCREENSHOTS when set, which is how docs/console-*.png are made).
"""

from __future__ import annotations

import base64
import os
import shutil
import smtplib
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import Upstream
from tests.e2e.test_serve import upstream_settings
from tests.support.spool import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TEAM = ["ann@families.test", "bob@families.test", "cy@parents.test", "dee@parents.test"]
WAIT = 30


def send(port: int, to: list[str], subject: str, body: str = "See you on Saturday.") -> None:
    message = f"From: Coach Sam <coach@club.test>\r\nTo: {', '.join(to)}\r\nSubject: {subject}\r\n\r\n{body}\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("coach@club.test", to, message.encode())


def token_url(relay: Any) -> str:
    assert wait_until(lambda: any(e.get("event") == "console.started" for e in relay.log_events()))
    (started,) = [e for e in relay.log_events() if e.get("event") == "console.started"]
    return str(started["url"])


class Screenshots:
    def __init__(self, driver: Any, folder: Path) -> None:
        self.driver = driver
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.copy_to = os.environ.get("PRIVACY_RELAY_SCREENSHOTS")

    def take(self, name: str) -> None:
        """The whole page, as a desktop window and as a phone (Chromium's device emulation) show it."""
        for width, mobile, suffix in ((1100, False, ""), (390, True, "-phone")):
            metrics = {"width": width, "height": 800, "deviceScaleFactor": 1, "mobile": mobile}
            self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
            shot = self.driver.execute_cdp_cmd(
                "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}
            )
            path = self.folder / f"console-{name}{suffix}.png"
            path.write_bytes(base64.b64decode(shot["data"]))
            if self.copy_to:
                shutil.copy(path, Path(self.copy_to) / path.name)
        self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_watch_mail_arrive_and_release_a_held_message_by_clicking(
    serve_relay, upstream: Upstream, browser: Any, tmp_path: Path
) -> None:
    relay = serve_relay(
        RELAY_DELIVERY_MODE="hybrid",
        RELAY_POLICY_ACTION="hold",
        RELAY_POLICY_HOLD_NOTIFY="false",
        RELAY_LOGGING_SHOW_ADDRESSES="true",
        **upstream_settings(upstream),
    )
    shots = Screenshots(browser, tmp_path / "screenshots")
    url = token_url(relay)
    browser.get(url)
    WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.TAG_NAME, "h1").text == "Activity")
    assert "token=" not in browser.current_url

    send(relay.port, ["secretary@club.test"], "Minutes of the committee meeting")
    WebDriverWait(browser, WAIT).until(lambda d: "Minutes of the committee meeting" in d.page_source)
    send(relay.port, TEAM, "Training moves to Sunday")
    send(relay.port, TEAM[:3], "Kit order: sizes by Friday")
    WebDriverWait(browser, WAIT).until(lambda d: "Kit order: sizes by Friday" in d.page_source)
    assert "Held for review, not sent" in browser.page_source

    browser.get(url.split("?")[0] + "held")
    shots.take("held")
    article = browser.find_element(By.XPATH, "//article[.//span[text()='Training moves to Sunday']]")
    article.find_element(By.XPATH, ".//button[@value='split']").click()
    WebDriverWait(browser, WAIT).until(lambda d: "released as split" in d.find_element(By.CLASS_NAME, "notice").text)
    released = lambda: [m for m in upstream.messages if b"Training moves to Sunday" in m.data]  # noqa: E731
    assert wait_until(lambda: len(released()) == 4, WAIT)
    assert sorted(m.rcpt_tos[0] for m in released()) == sorted(TEAM)
    for received in released():
        headers = received.data.split(b"\r\n\r\n")[0].decode()
        assert [address for address in TEAM if address in headers] == received.rcpt_tos

    base = url.split("?")[0]
    browser.get(base)
    WebDriverWait(browser, WAIT).until(lambda d: "Split into 4 copies" in d.page_source)
    browser.find_element(By.XPATH, "//article[.//span[text()='Training moves to Sunday']]//summary").click()
    shots.take("activity")
    for page in ("queue", "preview", "status"):
        browser.get(base + page)
        shots.take(page)
    assert len(upstream.messages) == 5  # the one unchanged message and the four released copies, nothing more
