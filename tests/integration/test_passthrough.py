"""upstream.auth: passthrough. Each client logs in with their own provider account, which the relay checks
at the upstream and uses for that session's mail only, sent while the client waits and never spooled.
"""

from __future__ import annotations

import io
import json
import logging
import smtplib
import threading
from base64 import b64encode
from pathlib import Path

import pytest
import structlog

from relay.admin.cli import main
from relay.admin.queue import run_queue_command
from relay.config.loading import load_config
from relay.config.models import ConfigError, LoggingConfig
from relay.logs import configure_logging
from tests.conftest import USER_PASSWORD, UpstreamFactory
from tests.support.spool import free_port, wait_until

# aiosmtpd warns about the test upstreams that take AUTH without TLS; one test runs the upstream with STARTTLS.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")

PASSWORDS = {"kay@office.test": "kay's own provider password", "lee@office.test": "lee's own provider password"}
RECIPIENTS = ["ann@one.test", "bob@two.test"]


def message(sender: str) -> bytes:
    return f"From: {sender}\r\nTo: ann@one.test, bob@two.test\r\nSubject: Plans\r\n\r\nHello.\r\n".encode()


def auth_plain(client: smtplib.SMTP, name: str, password: str) -> tuple[int, bytes]:
    """One AUTH PLAIN (smtplib's login() would try LOGIN as well after a refusal)."""
    client.user, client.password = name, password
    try:
        return client.auth("PLAIN", client.auth_plain)
    except smtplib.SMTPAuthenticationError as refused:
        return refused.smtp_code, refused.smtp_error


def log_in(relay, name: str, password: str, source: str = "127.0.0.1") -> tuple[int, bytes]:
    with smtplib.SMTP(relay.host, relay.port, source_address=(source, 0), timeout=10) as client:
        client.ehlo("desk")
        return auth_plain(client, name, password)


def spool_listing(relay, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert run_queue_command(relay.server.config, "list", None) == 0
    return capsys.readouterr().out


def test_the_clients_own_login_checks_in_and_delivers_the_split_copies(
    start_relay, make_upstream: UpstreamFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream = make_upstream(tls="starttls", credentials=PASSWORDS)
    assert upstream.ca is not None
    ca_file = tmp_path / "upstream-ca.pem"
    upstream.ca.cert_pem.write_to_path(str(ca_file))
    # The default delivery mode, hybrid, would spool any other message first.
    relay = start_relay(
        upstream, RELAY_UPSTREAM_AUTH="passthrough", RELAY_UPSTREAM_TLS="starttls", RELAY_UPSTREAM_CA_FILE=str(ca_file)
    )

    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        client.ehlo("desk")
        assert client.has_extn("auth")  # although listen.auth is none
        assert client.login("kay@office.test", PASSWORDS["kay@office.test"])[0] == 235
        assert upstream.handler.auth_attempts == [("kay@office.test", PASSWORDS["kay@office.test"], True)]
        assert client.sendmail("kay@office.test", RECIPIENTS, message("kay@office.test")) == {}

    assert sorted(m.rcpt_tos[0] for m in upstream.messages) == RECIPIENTS
    assert all(len(m.rcpt_tos) == 1 and m.login == "kay@office.test" for m in upstream.messages)
    # The connection that checked the login carried the copies, and was logged out when the client left.
    assert upstream.handler.connections == 1
    assert wait_until(lambda: upstream.handler.quits == 1)
    assert "The spool is empty." in spool_listing(relay, capsys)


def test_the_client_hears_the_upstreams_temporary_refusal_and_nothing_is_queued(
    start_relay, make_upstream: UpstreamFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream = make_upstream(credentials=PASSWORDS)
    upstream.handler.data_reply = "451 4.3.0 Mailbox busy, try again later"
    relay = start_relay(upstream, RELAY_UPSTREAM_AUTH="passthrough", RELAY_DELIVERY_MODE="queue")

    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        client.login("kay@office.test", PASSWORDS["kay@office.test"])
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("kay@office.test", RECIPIENTS, message("kay@office.test"))
    # In queue mode any other message would have been answered 250 and kept for a retry.
    assert refused.value.smtp_code == 451
    assert b"Mailbox busy" in refused.value.smtp_error
    assert "The spool is empty." in spool_listing(relay, capsys)


def test_a_wrong_password_is_refused_by_the_upstream_and_gets_535(start_relay, make_upstream: UpstreamFactory) -> None:
    upstream = make_upstream(credentials=PASSWORDS)
    relay = start_relay(upstream, RELAY_UPSTREAM_AUTH="passthrough")

    code, text = log_in(relay, "kay@office.test", "a wrong guess")

    assert (code, text[:5]) == (535, b"5.7.8")
    # Tried once: a second mechanism after the refusal would be a second failed login at the provider.
    assert upstream.handler.auth_attempts == [("kay@office.test", "a wrong guess", False)]


def test_wrong_upstream_logins_lock_the_client_address_out(start_relay, make_upstream: UpstreamFactory) -> None:
    upstream = make_upstream(credentials=PASSWORDS)
    relay = start_relay(upstream, RELAY_UPSTREAM_AUTH="passthrough", RELAY_LISTEN_MAX_AUTH_FAILURES="2")
    right = PASSWORDS["kay@office.test"]

    assert [log_in(relay, "kay@office.test", guess)[0] for guess in ("guess 1", "guess 2")] == [535, 535]
    tried = len(upstream.handler.auth_attempts)
    code, text = log_in(relay, "kay@office.test", right)

    assert (code, text[:5]) == (454, b"4.7.0")
    assert b"Too many failed logins" in text
    assert len(upstream.handler.auth_attempts) == tried  # the provider is not asked again
    assert log_in(relay, "kay@office.test", right, source="127.0.0.2")[0] == 235


def test_concurrent_guesses_from_one_address_do_not_outrun_the_lockout(
    start_relay, make_upstream: UpstreamFactory
) -> None:
    upstream = make_upstream(credentials=PASSWORDS)
    relay = start_relay(upstream, RELAY_UPSTREAM_AUTH="passthrough", RELAY_LISTEN_MAX_AUTH_FAILURES="2")
    codes: list[int] = []
    start = threading.Barrier(5)

    def guess(number: int) -> None:
        with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
            client.ehlo("desk")
            start.wait()
            codes.append(auth_plain(client, "kay@office.test", f"guess {number}")[0])

    threads = [threading.Thread(target=guess, args=(number,)) for number in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(codes) == [454, 454, 454, 535, 535]
    assert len({password for _, password, _ in upstream.handler.auth_attempts}) == 2


def test_an_unreachable_upstream_gets_454_and_does_not_count_as_a_failure(start_relay) -> None:
    relay = start_relay(
        RELAY_UPSTREAM_HOST="127.0.0.1",
        RELAY_UPSTREAM_PORT=str(free_port()),
        RELAY_UPSTREAM_TLS="none",
        RELAY_UPSTREAM_AUTH="passthrough",
        RELAY_LISTEN_MAX_AUTH_FAILURES="1",
    )

    with structlog.testing.capture_logs() as logs:
        replies = [log_in(relay, "kay@office.test", PASSWORDS["kay@office.test"]) for _ in range(2)]

    for code, text in replies:
        assert (code, text[:5]) == (454, b"4.7.0")
        assert b"Temporary authentication failure" in text
        assert PASSWORDS["kay@office.test"].encode() not in text
    events = [entry["event"] for entry in logs]
    assert "auth.failed" not in events
    assert "auth.locked_out" not in events


def test_unauthenticated_mail_is_refused_with_530(start_relay, make_upstream: UpstreamFactory) -> None:
    upstream = make_upstream(credentials=PASSWORDS)
    relay = start_relay(upstream, RELAY_UPSTREAM_AUTH="passthrough")

    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        client.ehlo("desk")
        assert client.mail("kay@office.test") == (530, b"5.7.0 Authentication required")
        assert client.mail("<>")[0] == 530
    assert upstream.messages == []


def test_a_sender_that_routes_to_another_upstream_is_refused_with_553(
    start_relay, make_upstream: UpstreamFactory, tmp_path: Path
) -> None:
    upstream, gmail = make_upstream(credentials=PASSWORDS), make_upstream()
    config_file = tmp_path / "relay.yaml"
    config_file.write_text(
        json.dumps(
            {
                "upstreams": {"gmail": {"host": gmail.host, "port": gmail.port, "tls": "none"}},
                "routes": [{"sender": "*@gmail.test", "upstream": "gmail"}],
            }
        ),
        encoding="utf-8",
    )
    relay = start_relay(upstream, config_file=config_file, RELAY_UPSTREAM_AUTH="passthrough")

    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        client.login("kay@office.test", PASSWORDS["kay@office.test"])
        code, text = client.mail("kay@gmail.test")
        assert (code, text[:5]) == (553, b"5.7.1")
        assert b"<kay@gmail.test>" in text
        client.rset()
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("kay@office.test", RECIPIENTS, message("kay@gmail.test"))
        assert refused.value.smtp_code == 553
        assert b"<kay@gmail.test>" in refused.value.smtp_error
    assert upstream.messages == []
    assert gmail.messages == []


def test_two_people_each_send_with_their_own_login(start_relay, make_upstream: UpstreamFactory) -> None:
    upstream = make_upstream(credentials=PASSWORDS)
    relay = start_relay(upstream, RELAY_UPSTREAM_AUTH="passthrough")

    with (
        smtplib.SMTP(relay.host, relay.port, timeout=10) as kay,
        smtplib.SMTP(relay.host, relay.port, timeout=10) as lee,
    ):
        kay.login("kay@office.test", PASSWORDS["kay@office.test"])
        lee.login("lee@office.test", PASSWORDS["lee@office.test"])
        lee.sendmail("lee@office.test", RECIPIENTS, message("lee@office.test"))
        kay.sendmail("kay@office.test", RECIPIENTS, message("kay@office.test"))
        lee.sendmail("lee@office.test", ["cy@three.test"], message("lee@office.test"))

    assert sorted((m.login, m.mail_from) for m in upstream.messages) == [
        ("kay@office.test", "kay@office.test"),
        ("kay@office.test", "kay@office.test"),
        ("lee@office.test", "lee@office.test"),
        ("lee@office.test", "lee@office.test"),
        ("lee@office.test", "lee@office.test"),
    ]
    assert {(name, accepted) for name, _, accepted in upstream.handler.auth_attempts} == {
        ("kay@office.test", True),
        ("lee@office.test", True),
    }


def test_a_named_passthrough_upstream_beside_local_accounts(
    start_relay, make_upstream: UpstreamFactory, tmp_path: Path, write_users
) -> None:
    office, provider = make_upstream(), make_upstream(credentials=PASSWORDS)
    config_file = tmp_path / "relay.yaml"
    config_file.write_text(
        json.dumps(
            {
                "upstreams": {
                    "provider": {"host": provider.host, "port": provider.port, "tls": "none", "auth": "passthrough"}
                },
                "routes": [{"sender": "*@office.test", "upstream": "provider"}],
            }
        ),
        encoding="utf-8",
    )
    users = write_users(crm=["crm@coaching.test"])
    relay = start_relay(
        office, config_file=config_file, RELAY_LISTEN_AUTH="optional", RELAY_LISTEN_USERS_FILE=str(users)
    )

    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        client.ehlo("desk")
        assert client.mail("kay@office.test") == (530, b"5.7.0 Authentication required")
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        client.login("crm", USER_PASSWORD)  # a local account: checked against the accounts file
        code, text = client.mail("kay@office.test")
        assert (code, text[:5]) == (553, b"5.7.1")
        client.rset()
        client.sendmail("crm@coaching.test", ["ann@one.test"], message("crm@coaching.test"))
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        client.login("kay@office.test", PASSWORDS["kay@office.test"])
        client.sendmail("kay@office.test", ["ann@one.test"], message("kay@office.test"))

    assert [(m.mail_from, m.login) for m in office.messages] == [("crm@coaching.test", None)]
    assert [(m.mail_from, m.login) for m in provider.messages] == [("kay@office.test", "kay@office.test")]
    assert [name for name, _, _ in provider.handler.auth_attempts] == ["kay@office.test"]


@pytest.mark.parametrize(
    ("tree", "environ", "named"),
    [
        ({"upstream": {"host": "127.0.0.1", "auth": "passthrough", "username": "kay"}}, {}, r"upstream: .*username"),
        (
            {
                "upstreams": {
                    "m365": {
                        "host": "127.0.0.1",
                        "auth": "passthrough",
                        "password_file": "pw",
                        "oauth2": {"provider": "microsoft", "client_id": "x", "token_file": "t.json"},
                    }
                }
            },
            {},
            r"upstreams\.m365: .*password_file, oauth2 must not be set",
        ),
        ({"upstream": {"host": "127.0.0.1", "auth": "passthrough"}}, {"RELAY_UPSTREAM_PASSWORD": "x"}, "PASSWORD"),
        ({"upstream": {"auth": "passthrough"}}, {}, r"upstream\.host must be set"),
        ({"upstream": {"host": "192.0.2.1", "tls": "none", "auth": "passthrough"}}, {}, r"upstream\.tls is none"),
    ],
)
def test_passthrough_config_errors_name_the_keys(tmp_path: Path, tree: dict, environ: dict, named: str) -> None:
    config_file = tmp_path / "relay.yaml"
    config_file.write_text(json.dumps(tree), encoding="utf-8")
    with pytest.raises(ConfigError, match=named):
        load_config(config_file, environ)


def test_upstream_auth_has_an_environment_variable() -> None:
    config = load_config(None, {"RELAY_UPSTREAM_HOST": "127.0.0.1", "RELAY_UPSTREAM_AUTH": "passthrough"})
    assert config.upstream.is_passthrough
    assert config.uses_passthrough


def test_preview_says_a_passthrough_message_leaves_with_the_clients_login(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file = tmp_path / "relay.yaml"
    config_file.write_text(json.dumps({"upstream": {"host": "127.0.0.1", "auth": "passthrough"}}), encoding="utf-8")
    message_file = tmp_path / "m.eml"
    message_file.write_bytes(message("kay@office.test"))

    assert main(["preview", str(message_file), "--config", str(config_file)]) == 0
    assert "logged in as the client" in capsys.readouterr().out


def test_starttls_after_auth_ends_the_passthrough_login(
    start_relay, make_upstream: UpstreamFactory, relay_certificate
) -> None:
    upstream = make_upstream(credentials=PASSWORDS)
    relay = start_relay(
        upstream,
        RELAY_UPSTREAM_AUTH="passthrough",
        **relay_certificate.listen_settings(),
    )

    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        client.ehlo("desk")
        assert auth_plain(client, "kay@office.test", PASSWORDS["kay@office.test"])[0] == 235
        client.starttls(context=relay_certificate.client_context())
        client.ehlo("desk")
        # TLS starts a new SMTP session (RFC 3207): the login, and the upstream connection, are gone.
        assert wait_until(lambda: upstream.handler.quits == 1)
        assert client.mail("kay@office.test")[0] == 530
    assert upstream.messages == []


def test_passthrough_passwords_reach_no_log_and_no_reply(start_relay, make_upstream: UpstreamFactory) -> None:
    upstream = make_upstream(credentials=PASSWORDS)
    right, wrong = PASSWORDS["kay@office.test"], "kay's wrong but secret guess"
    stream = io.StringIO()
    configure_logging(LoggingConfig(level="debug", format="json", show_addresses=True), stream=stream)
    replies: list[bytes] = []
    try:
        relay = start_relay(upstream, RELAY_UPSTREAM_AUTH="passthrough")
        # The right login and a message, a wrong password, and a password typed into the name field.
        for name, password in (("kay@office.test", right), ("kay@office.test", wrong), (wrong, right)):
            with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
                client.ehlo("desk")
                replies.append(auth_plain(client, name, password)[1])
                if name == "kay@office.test" and password == right:
                    client.sendmail("kay@office.test", RECIPIENTS, message("kay@office.test"))
    finally:
        structlog.reset_defaults()
        logging.getLogger("mail.log").setLevel(logging.NOTSET)
    log = stream.getvalue().encode()
    assert b'"auth.succeeded"' in log and b'"auth.failed"' in log and b'"message.relayed"' in log
    assert [reply[:5] for reply in replies] == [b"2.7.0", b"5.7.8", b"5.7.8"]
    for secret in (right, wrong):
        for form in (secret.encode(), b64encode(secret.encode())):
            assert form not in log
            assert not any(form in reply for reply in replies)
