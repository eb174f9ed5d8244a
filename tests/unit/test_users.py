"""The accounts file: argon2id hashes only, atomic 0600 writes, validation that names the problem, reloads."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from relay.core.senders import Account, Accounts
from relay.smtp.accounts import (
    AccountsFile,
    UsersFileError,
    hash_password,
    load_accounts,
    readable_by_others,
    save_accounts,
    verify_password,
)


@pytest.fixture
def kay(user_password_hash: str) -> Account:
    return Account("kay", user_password_hash, ("Kay@Office.test", "kay@bücher.test"))


def test_a_saved_file_is_private_and_loads_back(tmp_path: Path, kay: Account) -> None:
    path = tmp_path / "users.yaml"
    path.write_text("users: {}\n")
    path.chmod(0o644)
    save_accounts(path, Accounts({"kay": kay}))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not readable_by_others(path)
    assert load_accounts(path).by_name == {"kay": kay}
    assert [p.name for p in tmp_path.iterdir()] == ["users.yaml"]  # no temporary file left behind
    assert kay.password_hash.startswith("$argon2id$")


def test_readable_by_others(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    path.write_text("users: {}\n")
    path.chmod(0o640)
    assert readable_by_others(path)


def test_only_the_right_password_verifies() -> None:
    hashed = hash_password("a long enough password")
    assert verify_password(hashed, b"a long enough password")
    assert not verify_password(hashed, b"a long enough passwore")
    assert not verify_password("$argon2id$garbage", b"a long enough password")


def test_addresses_are_owned_whatever_their_case_or_domain_spelling(kay: Account) -> None:
    assert kay.owns("kay@office.TEST")
    assert kay.owns("kay@xn--bcher-kva.test")
    assert not kay.owns("kay@office.example")
    assert Accounts({"kay": kay}).owners_of("KAY@OFFICE.TEST") == [kay]


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("users: [kay]\n", "must be a mapping of user names"),
        ("users: {kay: {password: secret}}\n", "must be an argon2 hash"),
        ("users: {kay: {password: $argon2id$x, addresses: kay@x.test}}\n", "addresses must be a list"),
        ("users: {kay: {password: $argon2id$x, admin: true}}\n", "unknown key(s) admin"),
        ("users: {kay: [\n", "is not valid YAML"),
        ("- kay\n", "the top level must be a mapping"),
    ],
)
def test_a_broken_file_is_refused_with_a_reason(tmp_path: Path, text: str, complaint: str) -> None:
    path = tmp_path / "users.yaml"
    path.write_text(text)
    with pytest.raises(UsersFileError) as refused:
        load_accounts(path)
    assert complaint in str(refused.value)
    assert str(path) in str(refused.value)


def test_a_missing_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(UsersFileError, match="privacy-relay user add NAME"):
        load_accounts(tmp_path / "users.yaml")


def test_the_relay_rereads_a_changed_file_and_keeps_the_old_one_if_broken(tmp_path: Path, kay: Account) -> None:
    path = tmp_path / "users.yaml"
    save_accounts(path, Accounts())
    accounts = AccountsFile(path)
    assert accounts.current().by_name == {}
    save_accounts(path, Accounts({"kay": kay}))
    assert set(accounts.current().by_name) == {"kay"}
    path.write_text("users: [broken\n")
    assert set(accounts.current().by_name) == {"kay"}


def test_a_yaml_error_gives_the_position_without_quoting_the_file(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    path.write_text("users:\n  kay: {password: $argon2id$v=19$m=65536$SECRETHASH, addresses: [\n")
    with pytest.raises(UsersFileError) as refused:
        load_accounts(path)
    assert "line " in str(refused.value)
    assert "SECRETHASH" not in str(refused.value)
