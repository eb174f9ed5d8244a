"""The accounts file (listen.users_file): who may log in, with which password, as which senders.

Only argon2id hashes are stored. The file is written atomically with mode 0600, and a running relay
re-reads it when it changes, so `privacy-relay user add` takes effect without a restart.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
import yaml
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from relay.core.addresses import validate_envelope_address
from relay.core.replies import RelayError
from relay.core.senders import Account, Accounts
from relay.files import change_lock, write_atomically

# argon2-cffi's defaults are RFC 9106's second recommended profile (argon2id, 64 MiB, 3 passes).
_HASHER = PasswordHasher()
_NAME = re.compile(r"[^\s\x00-\x1f\x7f]{1,256}")
MIN_PASSWORD_LENGTH = 8
FILE_HEADER = (
    "# privacy-relay accounts for client AUTH, written by `privacy-relay user`.\n"
    "# Passwords are argon2id hashes; keep this file mode 0600 all the same.\n"
)


class UsersFileError(Exception):
    """The accounts file cannot be read, parsed or written; the text names the file."""


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(password_hash: str, password: bytes) -> bool:
    """True when the password matches; False for a wrong password or an unreadable hash. Slow by design."""
    try:
        return _HASHER.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise UsersFileError(f"{name!r} is not a usable user name (1 to 256 characters, no spaces)")
    return name


def check_address(address: str) -> str:
    try:
        return validate_envelope_address(address, smtputf8=True)
    except RelayError as refusal:
        raise UsersFileError(f"--address {address!r}: {refusal.text}") from None


def check_new_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UsersFileError(f"the password must be at least {MIN_PASSWORD_LENGTH} characters long")
    return password


def _account(path: Path, name: object, entry: object) -> Account:
    where = f"{path}: user {name!r}"
    if not isinstance(name, str) or not isinstance(entry, dict):
        raise UsersFileError(f"{where}: each user must be a name with password and addresses")
    password_hash = entry.get("password")
    addresses = entry.get("addresses") or []
    if not isinstance(password_hash, str) or not password_hash.startswith("$argon2"):
        raise UsersFileError(f"{where}: password must be an argon2 hash (set it with `privacy-relay user add`)")
    if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
        raise UsersFileError(f"{where}: addresses must be a list of email addresses")
    unknown = sorted(set(entry) - {"password", "addresses"})
    if unknown:
        raise UsersFileError(f"{where}: unknown key(s) {', '.join(unknown)}")
    return Account(name, password_hash, tuple(addresses))


def load_accounts(path: Path) -> Accounts:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsersFileError(
            f"the accounts file {path} does not exist; create an account with `privacy-relay user add NAME`"
        ) from None
    except OSError as exc:
        raise UsersFileError(f"cannot read the accounts file {path}: {exc.strerror}") from exc
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Only the position: PyYAML's own message quotes the offending line, which may hold a hash.
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise UsersFileError(f"{path} is not valid YAML{where}") from None
    if data is None:
        return Accounts()
    if not isinstance(data, dict):
        raise UsersFileError(f"{path}: the top level must be a mapping with a `users` key")
    users = data.get("users")
    if users is None:
        return Accounts()
    if not isinstance(users, dict):
        raise UsersFileError(f"{path}: `users` must be a mapping of user names")
    return Accounts({name: _account(path, name, entry) for name, entry in users.items()})


def load_accounts_or_empty(path: Path) -> Accounts:
    """For `user add`: a missing file is an empty one."""
    return load_accounts(path) if path.exists() else Accounts()


def save_accounts(path: Path, accounts: Accounts) -> None:
    """Write the whole file atomically: a temporary file (0600) in the same folder, fsync, rename."""
    users = {
        account.name: {"password": account.password_hash, "addresses": list(account.addresses)}
        for account in sorted(accounts.by_name.values(), key=lambda a: a.name)
    }
    text = FILE_HEADER + yaml.safe_dump({"users": users}, sort_keys=False, allow_unicode=True)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(path, (text.encode("utf-8"),))
    except OSError as exc:
        raise UsersFileError(f"cannot write the accounts file {path}: {exc.strerror}") from exc


@contextmanager
def changing_accounts(path: Path) -> Iterator[None]:
    """Held by `user add/remove` from reading the file to writing it back: two at once each keep their change."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = change_lock(path)
        lock.acquire()
    except OSError as exc:
        raise UsersFileError(f"cannot lock the accounts file {path}: {exc.strerror}") from exc
    try:
        yield
    finally:
        lock.release()


def readable_by_others(path: Path) -> bool:
    """True when users other than the owner may read the file (group or world permission bits)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IRGRP | stat.S_IROTH))


class AccountsFile:
    """The accounts as the relay uses them: loaded at start-up, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._signature = self._stat()
        self._accounts = load_accounts(path)
        self._log = structlog.get_logger("relay")

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            info = self.path.stat()
        except OSError:
            return None
        return (info.st_ino, info.st_mtime_ns, info.st_size)

    def current(self) -> Accounts:
        signature = self._stat()
        if signature != self._signature:
            self._signature = signature
            try:
                self._accounts = load_accounts(self.path)
                self._log.info("users_file.reloaded", path=str(self.path), users=len(self._accounts.by_name))
            except UsersFileError as exc:
                # Keep serving with the accounts we had rather than locking everyone out.
                self._log.error("users_file.unreadable", error=str(exc), kept_users=len(self._accounts.by_name))
        return self._accounts
