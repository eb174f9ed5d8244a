"""Which sender addresses a client may use (Postfix's reject_sender_login_mismatch), as pure checks.

The accounts (who owns which addresses) and a passthrough login come in as plain values: the SMTP side
reads the accounts file and knows the session's login; these only decide.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from relay.core.addresses import normalize_address, parse_address_list
from relay.core.message import ParsedMessage
from relay.core.replies import RelayError
from relay.core.routing import SenderRoute, route_for


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    password_hash: str = field(repr=False)
    # As typed by the administrator; compared through normalize_address().
    addresses: tuple[str, ...] = ()

    @property
    def may_send_as_anyone(self) -> bool:
        return not self.addresses

    def owns(self, address: str) -> bool:
        key = normalize_address(address)
        return any(normalize_address(own) == key for own in self.addresses)


@dataclass(frozen=True, slots=True)
class Accounts:
    by_name: Mapping[str, Account] = field(default_factory=dict)

    def owners_of(self, address: str) -> list[Account]:
        return [account for account in self.by_name.values() if account.owns(address)]

    def with_account(self, account: Account) -> Accounts:
        return Accounts({**self.by_name, account.name: account})

    def without(self, name: str) -> Accounts:
        return Accounts({n: a for n, a in self.by_name.items() if n != name})


def sender_refusal(accounts: Accounts, login: Account | None, address: str, where: str) -> RelayError | None:
    """Like Postfix's reject_sender_login_mismatch, for the envelope sender or a From address.

    A logged-in user may use only their own addresses (any address when they have none listed); a client
    that has not logged in may not use an address that belongs to an account.
    """
    if not address:
        return None
    if login is None:
        if not accounts.owners_of(address):
            return None
        return RelayError(
            553,
            "5.7.1",
            f"<{address}>: sender address rejected ({where}): not logged in, and this address belongs to "
            "an account on this relay; log in (AUTH) to send as it",
        )
    if login.may_send_as_anyone or login.owns(address):
        return None
    return RelayError(553, "5.7.1", f"<{address}>: sender address rejected ({where}): not owned by user {login.name}")


def from_header_refusal(accounts: Accounts, login: Account | None, message: ParsedMessage) -> RelayError | None:
    """sender_refusal() for every address in the From header(s)."""
    for header in message.get_all("from"):
        mailboxes = parse_address_list(header.value)
        if not mailboxes and (login is None or not login.may_send_as_anyone):
            # What this relay cannot read, a mail program might still show as someone's address.
            return RelayError(553, "5.7.1", "the From header has no address this relay can read; fix the From line")
        for mailbox in mailboxes:
            refusal = sender_refusal(accounts, login, mailbox.address, "From header")
            if refusal is not None:
                return refusal
    return None


@dataclass(frozen=True, slots=True)
class UpstreamLogin:
    """A client logged in at a passthrough upstream: that upstream's route name (None: the default
    `upstream`), where the config sets it (upstream or upstreams.NAME), and the name the client logged in with."""

    route: str | None
    key: str
    user: str


def upstream_login_refusal(
    routes: Sequence[SenderRoute], login: UpstreamLogin, address: str, where: str
) -> RelayError | None:
    """Mail from this login leaves only through the upstream it logged in at (reject_sender_login_mismatch)."""
    if route_for(address, routes) == login.route:
        return None
    return RelayError(
        553,
        "5.7.1",
        f"<{address}>: sender address rejected ({where}): mail from it does not leave through "
        f"{login.key}, where {login.user} logged in",
    )


def upstream_login_from_refusal(
    routes: Sequence[SenderRoute], login: UpstreamLogin, message: ParsedMessage
) -> RelayError | None:
    """upstream_login_refusal() for every address in the From header(s)."""
    for header in message.get_all("from"):
        for mailbox in parse_address_list(header.value):
            refusal = upstream_login_refusal(routes, login, mailbox.address, "From header")
            if refusal is not None:
                return refusal
    return None


def needs_own_login_refusal(passthrough_key: str | None, address: str, authenticated: bool) -> RelayError | None:
    """For a session not logged in at a passthrough upstream: mail from an address that leaves through one
    (passthrough_key names it; None: the address's upstream is not passthrough) needs that login."""
    if passthrough_key is None:
        return None
    if not authenticated:
        return RelayError(530, "5.7.0", "Authentication required")
    return RelayError(
        553,
        "5.7.1",
        f"<{address}>: sender address rejected (MAIL FROM): mail from it leaves through {passthrough_key}, "
        "which takes each sender's own login there; log in with that account",
    )
