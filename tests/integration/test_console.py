"""The console over HTTP: access rules (each refusal changes nothing), the API, pages, /healthz and /metrics."""

from __future__ import annotations

import http.client
import re
import sqlite3
import stat
from pathlib import Path

import pytest

from relay.config.loading import load_config
from relay.config.models import ConfigError
from relay.console.access import SECURITY_HEADERS, SESSION_COOKIE
from tests.conftest import Upstream
from tests.support.console import ConsoleClient, RunningConsole, send
from tests.support.spool import wait_until

TEAM = ["ann@families.test", "bob@families.test", "cy@parents.test"]


def browser_session(running: RunningConsole) -> ConsoleClient:
    """A client holding the session cookie that opening the token URL gives, and no Bearer token."""
    client = running.client
    opened = client.get(f"/?token={client.token}", bearer=False)
    assert opened.status == 303
    cookie = opened.headers["Set-Cookie"].split(";", 1)[0]
    return ConsoleClient(client.port, client.token, cookie=cookie)


def messages(running: RunningConsole, query: str = "") -> list[dict[str, object]]:
    answer = running.client.get(f"/api/messages{query}")
    assert answer.status == 200, answer.body
    listed: list[dict[str, object]] = answer.json()["messages"]
    return listed


def held_back(upstream: Upstream, running: RunningConsole) -> str:
    """A message one of whose copies the upstream defers for now: its queue id, once it waits in the queue."""
    upstream.handler.rcpt_replies["cy@parents.test"] = "451 4.2.2 Mailbox busy, try later"
    send(running.relay_port, TEAM, subject="Match moved")
    assert wait_until(lambda: bool(running.client.get("/api/queue").json()["queue"]))
    queue_id: str = running.client.get("/api/queue").json()["queue"][0]["id"]
    return queue_id


def next_attempt(running: RunningConsole, queue_id: str) -> str:
    (entry,) = [e for e in running.client.get("/api/queue").json()["queue"] if e["id"] == queue_id]
    return str(entry["copies"][0]["next_attempt_at"])


SLOW_RETRIES = {"RELAY_DELIVERY_MIN_BACKOFF": "1h", "RELAY_DELIVERY_MAX_BACKOFF": "2h"}


def test_the_token_url_sets_a_strict_http_only_cookie_and_drops_the_token_from_the_address(start_console) -> None:
    running = start_console()
    opened = running.client.get(f"/queue?token={running.client.token}&x=1", bearer=False)
    assert opened.status == 303
    assert opened.headers["Location"] == "/queue?x=1"
    cookie = opened.headers["Set-Cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert running.client.token not in cookie
    session = ConsoleClient(running.client.port, running.client.token, cookie=cookie.split(";", 1)[0])
    page = session.get("/queue", bearer=False)
    assert page.status == 200 and "<h1>Queue</h1>" in page.text


def test_the_token_file_is_private_and_kept_across_restarts(start_console) -> None:
    first = start_console()
    mode = stat.S_IMODE(first.token_file.stat().st_mode)
    assert mode == 0o600
    token = first.token_file.read_text().strip()
    assert len(token) >= 43  # 32 random bytes, base64url
    second = start_console()
    assert second.client.token == token


def test_without_the_token_the_api_answers_401_json_and_pages_say_where_the_token_is(start_console) -> None:
    running = start_console()
    api = running.client.get("/api/messages", bearer=False)
    assert api.status == 401 and "error" in api.json()
    wrong = running.client.get("/api/messages", bearer=False, headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status == 401
    page = running.client.get("/", bearer=False)
    assert page.status == 401 and page.headers["Content-Type"].startswith("text/html")
    assert str(running.token_file) in page.text
    wrong_url = running.client.get("/?token=guess", bearer=False)
    assert wrong_url.status == 401 and "Set-Cookie" not in wrong_url.headers
    metrics = running.client.get("/metrics", bearer=False)
    assert metrics.status == 401


def test_an_unknown_host_name_is_refused_even_with_the_token(start_console) -> None:
    running = start_console(RELAY_CONSOLE_ALLOWED_HOSTS="relay.office.test")
    for host in ("rebind.attacker.test", "127.0.0.2"):
        stranger = ConsoleClient(running.client.port, running.client.token, host=host)
        assert stranger.get("/api/messages").status == 403
        assert stranger.get(f"/?token={running.client.token}", bearer=False).status == 403
    for host in ("localhost", "127.0.0.1", "relay.office.test"):
        assert ConsoleClient(running.client.port, running.client.token, host=host).get("/api/messages").status == 200
    assert running.client.get("/api/messages", headers={"Host": f"[::1]:{running.client.port}"}).status == 200


def test_every_response_carries_the_security_headers(start_console) -> None:
    running = start_console()
    answers = [
        running.client.get("/"),
        running.client.get("/api/messages"),
        running.client.get("/api/nowhere"),
        running.client.get("/static/console.css"),
        running.client.get("/healthz"),
        running.client.get("/", bearer=False),
        running.client.get("/", headers={"Host": "elsewhere.test"}),
    ]
    for answer in answers:
        for name, value in SECURITY_HEADERS.items():
            assert answer.headers[name] == value
    assert "unsafe-inline" not in SECURITY_HEADERS["Content-Security-Policy"]
    assert "<script>" not in answers[0].text and "style=" not in answers[0].text


def test_a_cookie_post_needs_the_same_origin_and_the_csrf_token_and_a_refusal_changes_nothing(
    start_console, upstream: Upstream
) -> None:
    running = start_console(upstream, **SLOW_RETRIES)
    queue_id = held_back(upstream, running)
    due_before = next_attempt(running, queue_id)
    session = browser_session(running)
    token = session.csrf_token()
    form = f"csrf={token}".encode()
    form_type = {"Content-Type": "application/x-www-form-urlencoded"}
    refused = [
        session.post(f"/queue/{queue_id}/retry", form, bearer=False, headers=form_type),  # no Origin at all
        session.post(
            f"/queue/{queue_id}/retry", form, bearer=False, headers={**form_type, "Origin": "http://evil.test"}
        ),
        session.post(
            f"/queue/{queue_id}/retry", form, bearer=False, headers={**form_type, "Sec-Fetch-Site": "cross-site"}
        ),
        session.post(
            f"/queue/{queue_id}/retry", b"csrf=0000", bearer=False, headers={**form_type, "Origin": session.origin}
        ),
        session.post(f"/api/queue/{queue_id}/retry", bearer=False, headers={"Origin": session.origin}),
        session.request("DELETE", f"/api/queue/{queue_id}", bearer=False, headers={"Origin": session.origin}),
        session.post(f"/queue/{queue_id}/delete", form, bearer=False, headers={**form_type, "Origin": "null"}),
    ]
    assert [answer.status for answer in refused] == [403] * len(refused)
    assert next_attempt(running, queue_id) == due_before
    assert [e["id"] for e in running.client.get("/api/queue").json()["queue"]] == [queue_id]

    retried = session.post(
        f"/queue/{queue_id}/retry", form, bearer=False, headers={**form_type, "Sec-Fetch-Site": "same-origin"}
    )
    assert retried.status == 303
    assert next_attempt(running, queue_id) != due_before or not running.client.get("/api/queue").json()["queue"]
    by_header = session.post(
        f"/api/queue/{queue_id}/retry", bearer=False, headers={"Origin": session.origin, "X-CSRF-Token": token}
    )
    assert by_header.status == 200


def test_bearer_requests_need_no_csrf_token(start_console, upstream: Upstream) -> None:
    running = start_console(upstream, **SLOW_RETRIES)
    queue_id = held_back(upstream, running)
    assert running.client.post(f"/api/queue/{queue_id}/retry").status == 200
    deleted = running.client.request("DELETE", f"/api/queue/{queue_id}")
    assert deleted.status == 200 and deleted.json() == {"id": queue_id, "deleted": True}
    assert running.client.get("/api/queue").json() == {"queue": []}
    assert running.client.request("DELETE", f"/api/queue/{queue_id}").status == 404
    (entry,) = messages(running)
    states = sorted(copy["state"] for copy in entry["copies"])
    assert states == ["delivered", "delivered", "discarded"]


def test_activity_shows_each_message_its_decision_in_plain_words_and_each_copy(
    start_console, upstream: Upstream
) -> None:
    running = start_console(upstream)
    reply = send(running.relay_port, TEAM, subject="=?utf-8?q?Tr=C3=A4ining?= on Sunday")
    assert reply.startswith("250")
    (entry,) = messages(running)
    assert entry["sender"] == "coach@club.test"
    assert entry["subject"] == "Träining on Sunday"
    assert entry["recipients"] == TEAM
    assert entry["decision"] == "split"
    assert entry["summary"] == "Split into 3 copies: 3 addresses visible to each other in To"
    assert [copy["recipients"] for copy in entry["copies"]] == [[address] for address in TEAM]
    assert {copy["state"] for copy in entry["copies"]} == {"delivered"}
    assert all(copy["attempts"] == 1 for copy in entry["copies"])
    assert {copy["last_reply"] for copy in entry["copies"]} == {"250 2.0.0 Queued"}  # the upstream's own words
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", str(entry["received_at"]))
    assert running.client.get(f"/api/messages/{entry['id']}").json() == entry

    page = running.client.get("/")
    assert "Träining on Sunday" in page.text and "Split into 3 copies" in page.text
    assert "ann@families.test" in page.text and "250 2.0.0 Queued" in page.text


def test_activity_keeps_refused_messages_and_filters_and_searches(start_console, upstream: Upstream) -> None:
    running = start_console(upstream, RELAY_POLICY_ACTION="reject")
    assert send(running.relay_port, TEAM, subject="Fixtures").startswith("550")
    assert send(running.relay_port, ["dan@club.test"], subject="Kit order", sender="sec@club.test").startswith("250")
    assert [m["decision"] for m in messages(running)] == ["unchanged", "refused"]
    (refused,) = messages(running, "?decision=refused")
    assert refused["subject"] == "Fixtures" and refused["copies"] == []
    assert str(refused["reason"]).startswith("550 5.7.1 Not sent")
    assert [m["subject"] for m in messages(running, "?q=KIT")] == ["Kit order"]
    assert [m["subject"] for m in messages(running, "?q=cy%40parents")] == ["Fixtures"]
    assert [m["subject"] for m in messages(running, "?limit=1")] == ["Kit order"]
    page = running.client.get("/?decision=refused")
    assert "Fixtures" in page.text and "Kit order" not in page.text
    fragment = running.client.get("/", headers={"X-Console-Fragment": "1"})
    assert "<html" not in fragment.text and "Kit order" in fragment.text


def test_bad_requests_get_a_json_error_and_change_nothing_and_mail_keeps_flowing(
    start_console, upstream: Upstream
) -> None:
    running = start_console(upstream, **SLOW_RETRIES)
    queue_id = held_back(upstream, running)
    due_before = next_attempt(running, queue_id)
    bad = [
        (running.client.get("/api/messages?limit=lots"), 400),
        (running.client.get("/api/messages?limit=0"), 400),
        (running.client.get("/api/messages?decision=maybe"), 400),
        (running.client.get("/api/messages/NOSUCHID"), 404),
        (running.client.post("/api/queue/NOSUCHID/retry"), 404),
        (running.client.request("DELETE", "/api/queue/NOSUCHID"), 404),
        (running.client.get("/api/nowhere"), 404),
        (running.client.request("PUT", "/api/messages"), 405),
        (running.client.post("/api/preview"), 400),
    ]
    for answer, status in bad:
        assert answer.status == status, answer.body
        assert answer.headers["Content-Type"].startswith("application/json")
        assert "error" in answer.json()
    too_big = running.client.post("/api/preview", b"Subject: x\r\n\r\n" + b"x" * (80 * 1024 * 1024))
    assert too_big.status == 413 and "error" in too_big.json()
    assert next_attempt(running, queue_id) == due_before
    assert len(messages(running)) == 1
    upstream.handler.rcpt_replies.clear()
    assert send(running.relay_port, ["dan@club.test"], subject="Still flowing").startswith("250")
    assert wait_until(lambda: any("Still flowing" in m.data.decode() for m in upstream.messages))


def test_preview_shows_the_decision_and_every_copy_without_sending(start_console, upstream: Upstream) -> None:
    running = start_console(upstream)
    raw = b"From: coach@club.test\r\nTo: ann@families.test, bob@families.test\r\nSubject: Picnic\r\n\r\nBring food\r\n"
    answer = running.client.post("/api/preview?rcpt=ann@families.test&rcpt=bob@families.test", raw)
    assert answer.status == 200
    result = answer.json()
    assert result["decision"] == "split" and len(result["copies"]) == 2
    assert result["mail_from"] == "coach@club.test"
    assert "To: ann@families.test" in result["copies"][0]["headers"]
    assert "bob@families.test" not in result["copies"][0]["headers"]
    refused = running.client.post("/api/preview", b"no header here at all\x00").json()
    assert refused["decision"] == "refused"
    session = browser_session(running)
    page = session.submit("/preview", {"text": raw.decode()})
    assert page.status == 200, page.text
    assert "Decision: split" in page.text and "Copy 2 of 2" in page.text
    assert upstream.messages == []
    assert messages(running) == []


def test_healthz_needs_no_token_and_turns_503_when_the_relay_stops_accepting(start_console, loops) -> None:
    running = start_console()
    healthy = running.client.get("/healthz", bearer=False)
    assert healthy.status == 200 and healthy.json() == {"status": "ok"}
    loops.run(running.relay.stop())
    down = running.client.get("/healthz", bearer=False)
    assert down.status == 503
    assert down.json()["problems"] == ["the relay is not accepting mail"]


def test_healthz_is_503_when_the_spool_cannot_be_written(
    start_console, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = start_console()
    monkeypatch.setattr("relay.spool.sqlite.BUSY_TIMEOUT", 0.2)  # the probe gives up quickly
    blocker = sqlite3.connect(tmp_path / "spool" / "spool.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # as a stuck process would: nobody else can write
    try:
        down = running.client.get("/healthz", bearer=False)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert down.status == 503
    assert down.json()["problems"][0].startswith("the spool cannot be written")
    assert running.client.get("/healthz", bearer=False).status == 200


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found is not None, f"{name} not in /metrics"
    return float(found.group(1))


def test_metrics_after_known_traffic(start_console, upstream: Upstream, spool_settings: dict[str, str]) -> None:
    running = start_console(upstream, **spool_settings)
    for subject in ("One", "Two"):
        assert send(running.relay_port, TEAM, subject=subject).startswith("250")
    assert send(running.relay_port, TEAM[:2], subject="Invite", body="a NUL \x00 byte").startswith("550")
    upstream.handler.rcpt_replies["bob@families.test"] = "550 5.1.1 No such user"
    assert send(running.relay_port, TEAM[:2], subject="Three").startswith("250")
    assert wait_until(
        lambda: metric(running.client.get("/metrics").text, 'privacy_relay_copies_total{result="bounced"}') == 1
    )
    text = running.client.get("/metrics").text
    assert metric(text, 'privacy_relay_messages_total{decision="split"}') == 3
    assert metric(text, 'privacy_relay_messages_total{decision="refused"}') == 1
    assert metric(text, 'privacy_relay_messages_total{decision="bcc"}') == 0
    assert metric(text, 'privacy_relay_copies_total{result="delivered"}') >= 7  # 3 + 3 + 1, and the bounce's DSN
    assert metric(text, "privacy_relay_smtp_connections_total") == 4
    assert metric(text, "privacy_relay_delivery_seconds_count") == metric(
        text, 'privacy_relay_copies_total{result="delivered"}'
    )
    assert metric(text, 'privacy_relay_delivery_seconds_bucket{le="+Inf"}') >= 7
    assert metric(text, 'privacy_relay_upstream_up{upstream="default"}') == 1
    assert metric(text, "privacy_relay_queue_oldest_seconds") >= 0
    assert metric(text, 'privacy_relay_queue_copies{state="queued"}') == 0
    samples = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    for private in ("@", "families", "One", "Invite", "Three"):
        assert private not in samples


def test_metrics_say_when_the_upstream_is_down(start_console, upstream: Upstream) -> None:
    from tests.support.spool import free_port

    running = start_console(
        RELAY_UPSTREAM_HOST="127.0.0.1", RELAY_UPSTREAM_PORT=str(free_port()), RELAY_UPSTREAM_TLS="none", **SLOW_RETRIES
    )
    assert send(running.relay_port, ["dan@club.test"]).startswith("250")
    assert wait_until(lambda: 'upstream="default"' in running.client.get("/metrics").text)
    text = running.client.get("/metrics").text
    assert metric(text, 'privacy_relay_upstream_up{upstream="default"}') == 0
    assert metric(text, 'privacy_relay_copies_total{result="deferred"}') == 1
    assert metric(text, 'privacy_relay_queue_copies{state="deferred"}') == 1


def test_metrics_public_serves_metrics_without_the_token_and_nothing_else(start_console) -> None:
    running = start_console(RELAY_CONSOLE_METRICS_PUBLIC="true")
    assert running.client.get("/metrics", bearer=False).status == 200
    assert running.client.get("/api/messages", bearer=False).status == 401


def test_pages_render_and_the_status_check_runs_the_check_steps(start_console, upstream: Upstream) -> None:
    running = start_console(upstream)
    for path, heading in (("/", "Activity"), ("/queue", "Queue"), ("/preview", "Preview"), ("/status", "Status")):
        page = running.client.get(path)
        assert page.status == 200 and f"<h1>{heading}</h1>" in page.text
    status = running.client.get("/status").text
    assert f"127.0.0.1:{running.relay_port}" in status
    assert f"{upstream.host}:{upstream.port}" in status
    session = browser_session(running)
    checked = session.submit("/status/check")
    assert checked.status == 200
    assert "connect: OK" in checked.text
    assert upstream.messages == []


def test_a_console_reachable_from_other_machines_needs_https(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"console\.host"):
        load_config(environ={"RELAY_CONSOLE_HOST": "0.0.0.0", "RELAY_SPOOL_PATH": str(tmp_path)})
    assert load_config(environ={"RELAY_CONSOLE_HOST": "0.0.0.0", "RELAY_CONSOLE_ENABLED": "false"})


def test_a_taken_console_port_leaves_the_relay_relaying(start_console, upstream: Upstream) -> None:
    first = start_console(upstream)
    with pytest.raises(AssertionError, match="the console did not start"):
        start_console(upstream, RELAY_CONSOLE_PORT=str(first.client.port))


def test_the_delivery_histogram_is_cumulative(start_console, upstream: Upstream) -> None:
    running = start_console(upstream)
    assert send(running.relay_port, ["dan@club.test"]).startswith("250")
    assert wait_until(lambda: "privacy_relay_delivery_seconds_count 1.0" in running.client.get("/metrics").text)
    text = running.client.get("/metrics").text
    bounds = re.findall(r'^privacy_relay_delivery_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.MULTILINE)
    counts = [float(count) for _, count in bounds]
    assert counts == sorted(counts) and counts[-1] == 1 and bounds[-1][0] == "+Inf"
    assert metric(text, 'privacy_relay_delivery_seconds_bucket{le="86400.0"}') == 1


def test_a_console_for_other_machines_is_served_over_https_with_the_listen_certificate(
    start_console, relay_certificate, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests may use loopback only, so the console's host is taken for one that other machines reach.
    monkeypatch.setattr("relay.console.service.is_loopback_host", lambda host: False)
    running = start_console(
        RELAY_LISTEN_CERT_FILE=str(relay_certificate.cert_file), RELAY_LISTEN_KEY_FILE=str(relay_certificate.key_file)
    )
    assert running.console.url == f"https://127.0.0.1:{running.client.port}/"
    connection = http.client.HTTPSConnection(
        "127.0.0.1", running.client.port, context=relay_certificate.client_context(), timeout=30
    )
    try:
        connection.request("GET", f"/?token={running.client.token}")
        opened = connection.getresponse()
        opened.read()
    finally:
        connection.close()
    assert opened.status == 303
    assert "Secure" in opened.headers["Set-Cookie"]
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        running.client.get("/healthz", bearer=False)  # plain HTTP gets no answer


def test_the_preview_page_takes_an_uploaded_eml_file(start_console) -> None:
    running = start_console()
    session = browser_session(running)
    eml = b"From: coach@club.test\r\nTo: ann@families.test, bob@families.test\r\nSubject: Upload\r\n\r\nHi\r\n"
    boundary = "----console-test"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="csrf"\r\n\r\n{session.csrf_token()}\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="text"\r\n\r\n\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="team.eml"\r\n'
        "Content-Type: message/rfc822\r\n\r\n".encode()
        + eml
        + b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ]
    page = session.post(
        "/preview",
        b"".join(parts),
        bearer=False,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}", "Origin": session.origin},
    )
    assert page.status == 200
    assert "Decision: split" in page.text and "Copy 2 of 2 (single) to bob@families.test" in page.text
