"""Client AUTH: checking logins against the accounts file or a passthrough upstream, locking out password
guessers, and which sender addresses a login may use (Postfix's reject_sender_login_mismatch).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import Callable
from functools import cache

import structlog

from relay.config.routes import UpstreamChoice
from relay.core.replies import RelayError
from relay.core.senders import Account, Accounts
from relay.delivery.passthrough import PassthroughLogins, PassthroughSession
from relay.smtp.accounts import AccountsFile, hash_password, verify_password
from relay.upstream.errors import UpstreamLoginRefused

LOCKOUT_WINDOW = 600.0  # seconds: failures are counted over this window, and a lockout lasts as long
# Each argon2id check takes 64 MiB and a core for a moment: never run more than this many at once.
CONCURRENT_PASSWORD_CHECKS = 2

INVALID_CREDENTIALS = RelayError(535, "5.7.8", "Authentication credentials invalid")
LOCKED_OUT = RelayError(
    454, "4.7.0", "Too many failed logins from your address; AUTH is refused for a while, try again later"
)


class FailedLoginLockout:
    """Counts failed logins per client address; after max_failures within the window, refuses that address."""

    def __init__(
        self, max_failures: int, window: float = LOCKOUT_WINDOW, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._locked_until: dict[str, float] = {}

    def is_locked(self, client: str) -> bool:
        until = self._locked_until.get(client)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._locked_until[client]
        return False

    def record_failure(self, client: str) -> bool:
        """Count one failure; True when it is the one that starts a lockout (a lockout is not extended)."""
        if self.is_locked(client):
            return False
        now = self._clock()
        self._forget_before(now)
        failures = self._failures.setdefault(client, deque())
        failures.append(now)
        if len(failures) < self.max_failures:
            return False
        del self._failures[client]
        self._locked_until[client] = now + self.window
        return True

    def _forget_before(self, now: float) -> None:
        # Keeps memory bounded by the addresses that failed, or were locked out, within the window.
        for client, until in list(self._locked_until.items()):
            if until <= now:
                del self._locked_until[client]
        cutoff = now - self.window
        for client in list(self._failures):
            failures = self._failures[client]
            while failures and failures[0] < cutoff:
                failures.popleft()
            if not failures:
                del self._failures[client]


@cache
def _stand_in_hash() -> str:
    """A hash to check unknown names against, so they take as long as known ones."""
    return hash_password(secrets.token_urlsafe(16))


def _check_login(account: Account | None, password: bytes) -> bool:
    if account is None:
        verify_password(_stand_in_hash(), password)
        return False
    return verify_password(account.password_hash, password)


class Authenticator:
    """Verifies AUTH PLAIN/LOGIN credentials off the event loop, with the lockout in front.

    A login name that routes to a passthrough upstream is checked there; any other against the accounts
    file (none when listen.auth is none and AUTH is only offered for passthrough).
    """

    def __init__(
        self,
        accounts: AccountsFile | None,
        lockout: FailedLoginLockout,
        passthrough: PassthroughLogins | None = None,
    ) -> None:
        self.accounts = accounts
        self.lockout = lockout
        self.passthrough = passthrough
        self._checks = asyncio.Semaphore(CONCURRENT_PASSWORD_CHECKS)
        # Logins in progress per client address, checked one after another: concurrent guesses would
        # otherwise all be tried before the lockout counted any of them.
        self._client_turns: dict[str, tuple[asyncio.Lock, int]] = {}
        self._log = structlog.get_logger("relay")

    def current_accounts(self) -> Accounts:
        return self.accounts.current() if self.accounts is not None else Accounts()

    def refusal_for(self, client: str) -> RelayError | None:
        return LOCKED_OUT if self.lockout.is_locked(client) else None

    async def login(self, client: str, name: bytes, password: bytes) -> Account | PassthroughSession:
        """The account or passthrough session for these credentials; raises RelayError (535 wrong, 454
        locked out or the passthrough upstream unavailable) otherwise."""
        lock, waiting = self._client_turns.get(client, (asyncio.Lock(), 0))
        self._client_turns[client] = (lock, waiting + 1)
        try:
            async with lock:
                return await self._login(client, name, password)
        finally:
            lock, waiting = self._client_turns[client]
            if waiting == 1:
                del self._client_turns[client]
            else:
                self._client_turns[client] = (lock, waiting - 1)

    async def _login(self, client: str, name: bytes, password: bytes) -> Account | PassthroughSession:
        if self.lockout.is_locked(client):
            raise LOCKED_OUT
        try:
            text_name: str | None = name.decode("utf-8")
        except UnicodeDecodeError:
            text_name = None
        if self.passthrough is not None and text_name is not None:
            upstream = self.passthrough.upstream_for_login(text_name)
            if upstream is not None:
                return await self._passthrough_login(self.passthrough, upstream, client, text_name, password)
        account = self.current_accounts().by_name.get(text_name) if text_name is not None else None
        async with self._checks:
            valid = await asyncio.to_thread(_check_login, account, password)
        if account is not None and valid:
            self._log.info("auth.succeeded", client=client, user=account.name)
            return account
        # Only a known name is logged: an unknown one is often a password typed in the wrong field.
        self._failed(client, user=account.name if account else None)
        raise INVALID_CREDENTIALS

    async def _passthrough_login(
        self, logins: PassthroughLogins, upstream: UpstreamChoice, client: str, name: str, password: bytes
    ) -> PassthroughSession:
        try:
            session = await logins.open_session(upstream, name, password)
        except UpstreamLoginRefused:
            # Counted as a local wrong password is, or the relay would let anyone guess passwords at the provider.
            # The name is not logged: it may be a password typed in the wrong field.
            self._failed(client, user=None, upstream=upstream.key)
            raise INVALID_CREDENTIALS from None
        self._log.info("auth.succeeded", client=client, login=name, upstream=upstream.key)
        return session

    def _failed(self, client: str, **context: str | None) -> None:
        self._log.info("auth.failed", client=client, **context)
        if self.lockout.record_failure(client):
            self._log.warning(
                "auth.locked_out",
                client=client,
                failures=self.lockout.max_failures,
                minutes=round(self.lockout.window / 60),
            )
