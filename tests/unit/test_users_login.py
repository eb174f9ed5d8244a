"""Logins: the lockout window, the password check, and which senders a login may use."""

from __future__ import annotations

import asyncio

import pytest

from relay.core.message import parse_message
from relay.core.replies import RelayError
from relay.core.senders import Account, Accounts, from_header_refusal, sender_refusal
from relay.smtp.accounts import AccountsFile, save_accounts
from relay.smtp.auth import Authenticator, FailedLoginLockout
from tests.conftest import USER_PASSWORD


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_lockout_starts_at_max_failures_once_and_lasts_the_window() -> None:
    clock = Clock()
    lockout = FailedLoginLockout(3, window=600, clock=clock)
    assert [lockout.record_failure("192.0.2.1") for _ in range(3)] == [False, False, True]
    assert lockout.is_locked("192.0.2.1")
    assert not lockout.is_locked("192.0.2.2")
    clock.now += 300
    assert lockout.is_locked("192.0.2.1")
    assert [lockout.record_failure("192.0.2.1") for _ in range(3)] == [False, False, False]
    clock.now += 301
    assert not lockout.is_locked("192.0.2.1")


def test_failures_older_than_the_window_are_forgotten() -> None:
    clock = Clock()
    lockout = FailedLoginLockout(3, window=600, clock=clock)
    lockout.record_failure("192.0.2.1")
    lockout.record_failure("192.0.2.1")
    clock.now += 601
    assert not lockout.record_failure("192.0.2.1")
    assert not lockout.is_locked("192.0.2.1")


@pytest.fixture
def accounts(user_password_hash: str) -> Accounts:
    return Accounts(
        {
            "kay": Account("kay", user_password_hash, ("kay@office.test",)),
            "crm": Account("crm", user_password_hash, ()),
        }
    )


def test_sender_rules(accounts: Accounts) -> None:
    kay, crm = accounts.by_name["kay"], accounts.by_name["crm"]
    assert sender_refusal(accounts, kay, "KAY@office.test", "MAIL FROM") is None
    assert sender_refusal(accounts, crm, "kay@office.test", "MAIL FROM") is None
    assert sender_refusal(accounts, None, "copier@office.test", "MAIL FROM") is None
    assert sender_refusal(accounts, kay, "", "MAIL FROM") is None  # the null sender <>
    refusal = sender_refusal(accounts, kay, "boss@office.test", "MAIL FROM")
    assert refusal is not None
    assert refusal.render() == (
        "553 5.7.1 <boss@office.test>: sender address rejected (MAIL FROM): not owned by user kay"
    )
    anonymous = sender_refusal(accounts, None, "kay@office.test", "MAIL FROM")
    assert anonymous is not None and anonymous.code == 553 and "not logged in" in anonymous.text


def test_every_from_address_is_checked(accounts: Accounts) -> None:
    kay = accounts.by_name["kay"]

    def refusal(from_value: bytes, login: Account | None = kay) -> RelayError | None:
        message = parse_message(b"From: " + from_value + b"\r\nSubject: x\r\n\r\nbody\r\n")
        return from_header_refusal(accounts, login, message)

    assert refusal(b"Kay <kay@office.test>") is None
    second = refusal(b"Kay <kay@office.test>, Boss <boss@office.test>")
    assert second is not None and "<boss@office.test>" in second.text and "From header" in second.text
    unreadable = refusal(b"undisclosed")
    assert unreadable is not None and unreadable.code == 553
    assert refusal(b"undisclosed", accounts.by_name["crm"]) is None


def test_the_authenticator_checks_passwords_and_refuses_when_locked(tmp_path, accounts: Accounts) -> None:
    path = tmp_path / "users.yaml"
    save_accounts(path, accounts)
    authenticator = Authenticator(AccountsFile(path), FailedLoginLockout(2))

    async def login(name: bytes, password: bytes, client: str = "192.0.2.1") -> Account | int:
        try:
            return await authenticator.login(client, name, password)
        except RelayError as refusal:
            return refusal.code

    async def scenario() -> list[Account | int]:
        return [
            await login(b"kay", USER_PASSWORD.encode()),
            await login(b"nobody", USER_PASSWORD.encode()),
            await login(b"\xff\xfe", USER_PASSWORD.encode()),
            await login(b"kay", USER_PASSWORD.encode()),
            await login(b"kay", USER_PASSWORD.encode(), client="192.0.2.9"),
        ]

    results = asyncio.run(scenario())
    assert results == [accounts.by_name["kay"], 535, 535, 454, accounts.by_name["kay"]]
