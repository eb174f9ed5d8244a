"""Sender login mismatch, like Postfix's reject_sender_login_mismatch: MAIL FROM and the From header."""

from __future__ import annotations

import smtplib

import pytest

from tests.conftest import USER_PASSWORD, Upstream


def message(sender: str) -> bytes:
    return f"From: Someone <{sender}>\r\nTo: ann@one.test\r\nSubject: hi\r\n\r\nHello.\r\n".encode()


@pytest.fixture
def office(start_relay, upstream: Upstream, write_users):
    users = write_users(kay=["kay@office.test", "info@office.test"], crm=[])
    return start_relay(upstream, RELAY_LISTEN_AUTH="optional", RELAY_LISTEN_USERS_FILE=str(users))


def logged_in(relay, name: str | None) -> smtplib.SMTP:
    client = smtplib.SMTP(relay.host, relay.port)
    client.ehlo("desk")
    if name is not None:
        client.login(name, USER_PASSWORD)
    return client


def test_a_user_sends_as_their_own_addresses_in_any_case(office, upstream: Upstream) -> None:
    with logged_in(office, "kay") as client:
        client.sendmail("Kay@Office.TEST", ["ann@one.test"], message("kay@office.test"))
        client.sendmail("info@office.test", ["ann@one.test"], message("INFO@office.test"))
    assert len(upstream.messages) == 2


def test_mail_from_another_address_is_refused_naming_it(office, upstream: Upstream) -> None:
    with logged_in(office, "kay") as client:
        code, text = client.mail("boss@office.test")
    assert code == 553
    assert text.startswith(b"5.7.1 <boss@office.test>:")
    assert b"not owned by user kay" in text
    assert upstream.messages == []


def test_from_header_with_another_address_is_refused_naming_it(office, upstream: Upstream) -> None:
    with logged_in(office, "kay") as client, pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail("kay@office.test", ["ann@one.test"], message("boss@office.test"))
    assert refused.value.smtp_code == 553
    assert refused.value.smtp_error.startswith(b"5.7.1 <boss@office.test>:")
    assert b"From header" in refused.value.smtp_error
    assert upstream.messages == []


def test_a_user_without_addresses_may_send_as_anyone(office, upstream: Upstream) -> None:
    with logged_in(office, "crm") as client:
        client.sendmail("newsletter@shop.test", ["ann@one.test"], message("kay@office.test"))
    assert len(upstream.messages) == 1


def test_without_login_an_address_that_belongs_to_an_account_is_refused(office, upstream: Upstream) -> None:
    with logged_in(office, None) as client:
        code, text = client.mail("kay@office.test")
        assert code == 553
        assert text.startswith(b"5.7.1 <kay@office.test>:")
        assert b"not logged in" in text
        client.rset()
        # The copier's own address belongs to nobody: auth is optional, so it may send.
        client.sendmail("copier@office.test", ["ann@one.test"], message("copier@office.test"))
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("copier@office.test", ["ann@one.test"], message("info@office.test"))
    assert refused.value.smtp_code == 553
    assert len(upstream.messages) == 1
