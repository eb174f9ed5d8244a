"""Client TLS and AUTH on the office relay: smtplib over loopback to a real in-process relay."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest
import structlog
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.server import RelayServer
from tests.conftest import USER_PASSWORD, RelayCertificate, Upstream, relay_config

MESSAGE = b"From: kay@office.test\r\nTo: ann@one.test\r\nSubject: hello\r\n\r\nHi Ann.\r\n"


def office_settings(certificate: RelayCertificate, users: Path, **settings: str) -> dict[str, str]:
    return {
        **certificate.listen_settings(),
        "RELAY_LISTEN_AUTH": "required",
        "RELAY_LISTEN_USERS_FILE": str(users),
        **settings,
    }


def test_starttls_then_auth_plain_sends_mail(start_relay, upstream: Upstream, relay_certificate, write_users) -> None:
    relay = start_relay(upstream, **office_settings(relay_certificate, write_users(kay=["kay@office.test"])))
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo("desk")
        assert client.has_extn("starttls")
        client.starttls(context=relay_certificate.client_context())
        client.ehlo("desk")
        assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
        client.user, client.password = "kay", USER_PASSWORD
        code, reply = client.auth("PLAIN", client.auth_plain, initial_response_ok=False)
        assert (code, reply[:5]) == (235, b"2.7.0")
        client.sendmail("kay@office.test", ["ann@one.test"], MESSAGE)
    [received] = upstream.messages
    assert received.rcpt_tos == ["ann@one.test"]
    assert b"with ESMTPSA id" in received.data  # RFC 3848: TLS and AUTH


def test_auth_login_with_initial_response_and_with_challenges(
    start_relay, upstream: Upstream, relay_certificate, write_users
) -> None:
    relay = start_relay(upstream, **office_settings(relay_certificate, write_users(kay=["kay@office.test"])))
    for initial_response_ok in (True, False):
        with smtplib.SMTP(relay.host, relay.port) as client:
            client.starttls(context=relay_certificate.client_context())
            client.ehlo("desk")
            client.user, client.password = "kay", USER_PASSWORD
            code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=initial_response_ok)
            assert code == 235
            client.sendmail("kay@office.test", ["ann@one.test"], MESSAGE)
    assert len(upstream.messages) == 2


def test_implicit_tls_port(start_relay, upstream: Upstream, relay_certificate, write_users) -> None:
    settings = office_settings(relay_certificate, write_users(kay=[]), RELAY_LISTEN_TLS="implicit")
    relay = start_relay(upstream, **settings)
    with smtplib.SMTP_SSL(relay.host, relay.port, context=relay_certificate.client_context()) as client:
        client.ehlo("desk")
        assert not client.has_extn("starttls")
        client.login("kay", USER_PASSWORD)
        client.sendmail("kay@office.test", ["ann@one.test"], MESSAGE)
    [received] = upstream.messages
    assert b"with ESMTPSA id" in received.data


def test_mail_before_auth_is_refused_with_530(start_relay, upstream: Upstream, relay_certificate, write_users) -> None:
    relay = start_relay(upstream, **office_settings(relay_certificate, write_users(kay=[])))
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.starttls(context=relay_certificate.client_context())
        client.ehlo("desk")
        assert client.mail("kay@office.test") == (530, b"5.7.0 Authentication required")
    assert upstream.messages == []


def test_wrong_password_gets_535(start_relay, upstream: Upstream, relay_certificate, write_users) -> None:
    relay = start_relay(upstream, **office_settings(relay_certificate, write_users(kay=[])))
    for name in ("kay", "nobody"):
        with smtplib.SMTP(relay.host, relay.port) as client:
            client.starttls(context=relay_certificate.client_context())
            with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                client.login(name, "not the password")
            assert refused.value.smtp_code == 535
            assert refused.value.smtp_error.startswith(b"5.7.8")


def test_lockout_after_max_failures_is_per_address_and_logged_once(
    start_relay, upstream: Upstream, relay_certificate, write_users
) -> None:
    settings = office_settings(relay_certificate, write_users(kay=[]), RELAY_LISTEN_MAX_AUTH_FAILURES="3")
    relay = start_relay(upstream, **settings)

    def attempt(password: str, source: str = "127.0.0.1") -> tuple[int, bytes]:
        with smtplib.SMTP(relay.host, relay.port, source_address=(source, 0)) as client:
            client.starttls(context=relay_certificate.client_context())
            client.ehlo("desk")
            client.user, client.password = "kay", password
            try:
                return client.auth("PLAIN", client.auth_plain)
            except smtplib.SMTPAuthenticationError as refused:
                return refused.smtp_code, refused.smtp_error

    with structlog.testing.capture_logs() as logs:
        assert [attempt("wrong guess")[0] for _ in range(3)] == [535, 535, 535]
        # Locked out now, even with the right password; the refusal comes before any password is read.
        for _ in range(3):
            code, text = attempt(USER_PASSWORD)
            assert (code, text[:5]) == (454, b"4.7.0")
        assert attempt(USER_PASSWORD, source="127.0.0.2")[0] == 235
    events = [entry["event"] for entry in logs]
    assert events.count("auth.failed") == 3
    assert events.count("auth.locked_out") == 1


def test_auth_none_offers_no_auth(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream)
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo("desk")
        assert not client.has_extn("auth")
        assert client.docmd("AUTH", "PLAIN AGthAHg=")[0] == 503


def test_plaintext_auth_is_accepted_from_loopback(start_relay, upstream: Upstream, write_users) -> None:
    relay = start_relay(
        upstream, RELAY_LISTEN_AUTH="required", RELAY_LISTEN_USERS_FILE=str(write_users(kay=["kay@office.test"]))
    )
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.login("kay", USER_PASSWORD)
        client.sendmail("kay@office.test", ["ann@one.test"], MESSAGE)
    [received] = upstream.messages
    assert b"with ESMTPA id" in received.data


def test_auth_inside_a_mail_transaction_is_refused(start_relay, upstream: Upstream, write_users) -> None:
    relay = start_relay(upstream, RELAY_LISTEN_AUTH="optional", RELAY_LISTEN_USERS_FILE=str(write_users(kay=[])))
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo("desk")
        assert client.mail("someone@else.test")[0] == 250
        assert client.docmd("AUTH", "LOGIN")[0] == 503


def test_a_user_added_while_running_can_log_in(start_relay, upstream: Upstream, write_users) -> None:
    users = write_users(kay=[])
    relay = start_relay(upstream, RELAY_LISTEN_AUTH="required", RELAY_LISTEN_USERS_FILE=str(users))
    write_users(kay=[], lee=["lee@office.test"])
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.login("lee", USER_PASSWORD)
        client.sendmail("lee@office.test", ["ann@one.test"], MESSAGE.replace(b"kay@", b"lee@"))
    assert len(upstream.messages) == 1


def test_without_tls_only_loopback_clients_are_offered_auth(tmp_path: Path, write_users, loops) -> None:
    # Every address a test may use is loopback, so a LAN client is represented by its session.
    config = relay_config(
        tmp_path, {"RELAY_LISTEN_AUTH": "optional", "RELAY_LISTEN_USERS_FILE": str(write_users(kay=[]))}
    )
    handler = RelayServer(config).handler
    responses = ["250-relay.test", "250-AUTH LOGIN PLAIN", "250 HELP"]

    async def offered(peer: str) -> tuple[list[str], object]:
        server = SMTP(handler)
        session = Session(loops.loop)
        session.peer = (peer, 40000)
        ehlo = await handler.handle_EHLO(server, session, Envelope(), "desk", responses)
        return ehlo, await handler.handle_AUTH(server, session, Envelope(), ["PLAIN"])

    lan_ehlo, lan_auth = loops.run(offered("192.168.1.20"))
    assert "250-AUTH LOGIN PLAIN" not in lan_ehlo
    assert isinstance(lan_auth, str) and lan_auth.startswith("538 5.7.11 ")
    loopback_ehlo, _ = loops.run(offered("::1"))
    assert "250-AUTH LOGIN PLAIN" in loopback_ehlo
