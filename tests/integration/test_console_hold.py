"""policy.action: hold: held with a 250, released or discarded once (console API, pages, CLI), returned when too old."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from email import message_from_bytes
from email.policy import default
from pathlib import Path
from urllib.parse import unquote_plus

from tests.conftest import Upstream
from tests.integration.test_console import TEAM, browser_session, metric
from tests.support.console import ConsoleClient, RunningConsole, send
from tests.support.spool import wait_until

HOLD = {"RELAY_POLICY_ACTION": "hold"}


def subjects(upstream: Upstream) -> list[str]:
    return [str(message_from_bytes(m.data, policy=default)["Subject"]) for m in upstream.messages]


def hold_one(running: RunningConsole, subject: str = "Season dates") -> str:
    reply = send(running.relay_port, TEAM, subject=subject)
    assert reply.startswith("250 2.0.0 Held for review as "), reply
    held_id = reply.split()[6].rstrip(",")
    assert "privacy-relay held release" in reply and "Held page" in reply
    return held_id


def held_ids(running: RunningConsole) -> list[str]:
    return [str(entry["id"]) for entry in running.client.get("/api/held").json()["held"]]


def release(running: RunningConsole, held_id: str, body: object) -> tuple[int, dict[str, object]]:
    answer = running.client.post(f"/api/held/{held_id}/release", json.dumps(body).encode())
    return answer.status, answer.json()


def test_a_held_message_waits_and_its_sender_is_told(start_console, upstream: Upstream) -> None:
    running = start_console(upstream, **HOLD)
    held_id = hold_one(running)
    assert wait_until(lambda: len(upstream.messages) == 1)
    (notice,) = upstream.messages
    assert notice.rcpt_tos == ["coach@club.test"]
    parsed = message_from_bytes(notice.data, policy=default)
    assert parsed["Subject"] == "Held for review, not sent yet: Season dates"
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert f"privacy-relay held release {held_id}" in parsed.get_content()
    (entry,) = running.client.get("/api/held").json()["held"]
    assert entry["id"] == held_id and entry["decision"] == "hold"
    assert entry["recipients"] == TEAM
    assert entry["copies"] == [
        {"recipients": TEAM, "state": "held", "attempts": 0, "last_reply": None, "next_attempt_at": None}
    ]
    text = running.client.get("/metrics").text
    assert metric(text, "privacy_relay_held_messages") == 1
    assert metric(text, 'privacy_relay_messages_total{decision="hold"}') == 1


def test_release_as_split_sends_the_copies_once_and_a_second_decision_is_409(
    start_console, upstream: Upstream, spool_settings: dict[str, str]
) -> None:
    running = start_console(upstream, RELAY_POLICY_HOLD_NOTIFY="false", **HOLD, **spool_settings)
    held_id = hold_one(running)
    status, answer = release(running, held_id, {"as": "split"})
    assert (status, answer) == (200, {"id": held_id, "state": "released", "copies": 3})
    assert wait_until(lambda: len(upstream.messages) == 3)
    assert sorted(m.rcpt_tos[0] for m in upstream.messages) == sorted(TEAM)
    for received in upstream.messages:
        to = str(message_from_bytes(received.data, policy=default)["To"])
        assert to == received.rcpt_tos[0]
    assert release(running, held_id, {"as": "split"})[0] == 409
    assert release(running, held_id, {"as": "bcc"})[0] == 409
    assert running.client.post(f"/api/held/{held_id}/discard").status == 409
    assert held_ids(running) == []
    assert wait_until(
        lambda: {c["state"] for c in running.client.get(f"/api/messages/{held_id}").json()["copies"]} == {"delivered"}
    )
    entry = running.client.get(f"/api/messages/{held_id}").json()
    assert entry["decision"] == "split" and "released as split" in entry["reason"]
    assert len(upstream.messages) == 3
    assert metric(running.client.get("/metrics").text, "privacy_relay_held_messages") == 0


def test_release_as_bcc_and_as_written_which_needs_a_confirmation(start_console, upstream: Upstream) -> None:
    running = start_console(upstream, RELAY_POLICY_HOLD_NOTIFY="false", **HOLD)
    bcc_id, written_id = hold_one(running, "For Bcc"), hold_one(running, "As written")
    assert release(running, bcc_id, {"as": "bcc"})[0] == 200
    assert wait_until(lambda: "For Bcc" in subjects(upstream))
    (bcc,) = upstream.messages
    assert sorted(bcc.rcpt_tos) == sorted(TEAM) and b"ann@families.test" not in bcc.data.split(b"\r\n\r\n")[0]

    status, answer = release(running, written_id, {"as": "written"})
    assert status == 400 and "confirm" in str(answer["error"])
    assert held_ids(running) == [written_id]
    assert release(running, written_id, {"as": "written", "confirm": True})[0] == 200
    assert wait_until(lambda: "As written" in subjects(upstream))
    written = upstream.messages[-1]
    assert sorted(written.rcpt_tos) == sorted(TEAM)
    assert "ann@families.test, bob@families.test" in str(message_from_bytes(written.data, policy=default)["To"])


def test_discard_sends_nothing_and_bad_requests_change_nothing(start_console, upstream: Upstream) -> None:
    running = start_console(upstream, RELAY_POLICY_HOLD_NOTIFY="false", **HOLD)
    held_id = hold_one(running)
    bad = [
        running.client.post(f"/api/held/{held_id}/release", b"{not json"),
        running.client.post(f"/api/held/{held_id}/release", b'["split"]'),
        running.client.post(f"/api/held/{held_id}/release", b'{"as": "everyone"}'),
        running.client.post(f"/api/held/{held_id}/release", b"\xff\xfe"),
    ]
    assert [answer.status for answer in bad] == [400, 400, 400, 400]
    assert all("error" in answer.json() for answer in bad)
    assert release(running, "NOSUCHID", {"as": "split"})[0] == 404
    assert running.client.post("/api/held/NOSUCHID/discard").status == 404
    assert held_ids(running) == [held_id]

    discarded = running.client.post(f"/api/held/{held_id}/discard")
    assert discarded.status == 200 and discarded.json()["state"] == "discarded"
    assert running.client.post(f"/api/held/{held_id}/discard").status == 409
    assert release(running, held_id, {"as": "split"})[0] == 409
    entry = running.client.get(f"/api/messages/{held_id}").json()
    assert [c["state"] for c in entry["copies"]] == ["discarded"]
    assert send(running.relay_port, ["dan@club.test"], subject="Still flowing").startswith("250")
    assert wait_until(lambda: subjects(upstream) == ["Still flowing"])


def test_a_cookie_release_without_csrf_is_refused_and_the_message_stays_held(start_console, upstream: Upstream) -> None:
    running = start_console(upstream, RELAY_POLICY_HOLD_NOTIFY="false", **HOLD)
    held_id = hold_one(running)
    session = browser_session(running)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    refused = [
        session.post(f"/held/{held_id}", b"as=split", bearer=False, headers={**form, "Origin": session.origin}),
        session.post(
            f"/held/{held_id}",
            f"as=split&csrf={session.csrf_token()}".encode(),
            bearer=False,
            headers={**form, "Origin": "http://attacker.test"},
        ),
        session.post(
            f"/api/held/{held_id}/release", b'{"as": "split"}', bearer=False, headers={"Origin": session.origin}
        ),
    ]
    stranger = ConsoleClient(running.client.port, running.client.token, host="rebind.attacker.test")
    refused.append(stranger.post(f"/api/held/{held_id}/release", b'{"as": "split"}'))  # the token, a foreign Host
    refused.append(running.client.post(f"/api/held/{held_id}/release", b'{"as": "split"}', bearer=False))
    assert [answer.status for answer in refused] == [403, 403, 403, 403, 401]
    assert held_ids(running) == [held_id]
    assert upstream.messages == []
    released = session.post(
        f"/held/{held_id}",
        f"as=split&csrf={session.csrf_token()}".encode(),
        bearer=False,
        headers={**form, "Origin": session.origin},
    )
    assert released.status == 303 and "released" in released.headers["Location"]
    assert wait_until(lambda: len(upstream.messages) == 3)


def test_a_message_held_too_long_goes_back_to_its_sender_unsent(
    start_console, upstream: Upstream, spool_settings: dict[str, str]
) -> None:
    running = start_console(
        upstream, RELAY_POLICY_HOLD_NOTIFY="false", RELAY_POLICY_HOLD_MAX_AGE="1s", **HOLD, **spool_settings
    )
    held_id = hold_one(running)
    assert wait_until(lambda: len(upstream.messages) == 1)
    (returned,) = upstream.messages
    assert returned.rcpt_tos == ["coach@club.test"]
    report = returned.data.decode()
    assert "Undelivered Mail Returned to Sender" in report and "never released; not sent" in report
    assert held_ids(running) == []
    assert release(running, held_id, {"as": "split"})[0] == 409
    entry = running.client.get(f"/api/messages/{held_id}").json()
    assert "returned to the sender, not sent" in entry["reason"]
    assert [c["state"] for c in entry["copies"]] == ["bounced"]


def test_held_messages_survive_a_restart(start_console, upstream: Upstream, loops) -> None:
    first = start_console(upstream, RELAY_POLICY_HOLD_NOTIFY="false", **HOLD)
    held_id = hold_one(first)
    first.console.stop()
    loops.run(first.relay.stop())
    second = start_console(upstream, RELAY_POLICY_HOLD_NOTIFY="false", **HOLD)
    assert held_ids(second) == [held_id]
    assert release(second, held_id, {"as": "split"})[0] == 200
    assert wait_until(lambda: len(upstream.messages) == 3)


def held_command(
    tmp_path: Path, *arguments: str, spool: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`privacy-relay held ...` on the spool in tmp_path, or on the one that spool's settings name."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    environ.update({"RELAY_SPOOL_PATH": str(tmp_path / "spool"), "RELAY_OUTBOX": str(tmp_path / "outbox")})
    environ.update(spool or {})
    return subprocess.run(
        [sys.executable, "-m", "relay", "held", *arguments],
        env=environ,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_the_held_command_lists_shows_releases_and_discards(
    start_console, upstream: Upstream, tmp_path: Path, spool_settings: dict[str, str]
) -> None:
    running = start_console(upstream, RELAY_POLICY_HOLD_NOTIFY="false", **HOLD, **spool_settings)
    first, second = hold_one(running, "First"), hold_one(running, "Second")
    listed = held_command(tmp_path, "list", spool=spool_settings)
    assert listed.returncode == 0 and first in listed.stdout and "2 message(s) held" in listed.stdout
    shown = held_command(tmp_path, "show", first, spool=spool_settings)
    assert "subject:    First" in shown.stdout and "bob@families.test" in shown.stdout
    unconfirmed = held_command(tmp_path, "release", first, "--as", "written", spool=spool_settings)
    assert unconfirmed.returncode == 1 and held_ids(running) == [first, second]
    released = held_command(tmp_path, "release", first, spool=spool_settings)
    assert released.returncode == 0 and "3 copies queued" in released.stdout
    assert wait_until(lambda: len(upstream.messages) == 3)
    again = held_command(tmp_path, "release", first, spool=spool_settings)
    assert again.returncode == 3 and "not held any more: it was released" in again.stderr
    assert held_command(tmp_path, "discard", second, spool=spool_settings).returncode == 0
    assert held_command(tmp_path, "discard", second, spool=spool_settings).returncode == 3
    assert held_command(tmp_path, "show", "NOSUCHID", spool=spool_settings).returncode == 1
    assert "Nothing is held." in held_command(tmp_path, "list", spool=spool_settings).stdout
    assert len(upstream.messages) == 3


def test_the_held_page_asks_a_second_time_before_sending_as_written(start_console, upstream: Upstream) -> None:
    running = start_console(upstream, RELAY_POLICY_HOLD_NOTIFY="false", **HOLD)
    held_id = hold_one(running)
    session = browser_session(running)
    page = session.get("/held", bearer=False).text
    assert "Season dates" in page and f'href="/held/{held_id}/confirm/written"' in page
    question = session.get(f"/held/{held_id}/confirm/written", bearer=False).text
    assert "will see all the others' addresses" in question and 'name="confirm" value="yes"' in question

    def post(fields: dict[str, str]) -> str:
        answer = session.submit(f"/held/{held_id}", fields)
        assert answer.status == 303
        return unquote_plus(answer.headers["Location"])

    assert "needs the second confirmation" in post({"as": "written"})
    assert held_ids(running) == [held_id]
    assert "released" in post({"as": "written", "confirm": "yes"})
    assert wait_until(lambda: len(upstream.messages) == 1)
    assert sorted(upstream.messages[0].rcpt_tos) == sorted(TEAM)
    assert "is not held any more: it was released" in post({"as": "discard"})
    gone = session.get(f"/held/{held_id}/confirm/discard", bearer=False)
    assert gone.status == 303 and "not held any more" in unquote_plus(gone.headers["Location"])
