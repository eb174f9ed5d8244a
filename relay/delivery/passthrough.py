"""upstream.auth: passthrough. Each client logs in with their own account at the upstream, and the mail of
that SMTP session leaves through a connection logged in as them.

The relay stores no password: a client's credentials live in its PassthroughSession, in memory, for as long
as the client's SMTP session lasts, and go with it. So that mail is never spooled (after a restart there would
be no login to send it with): it is sent while the client waits, and the client hears the upstream's answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog

from relay.config.models import Config
from relay.config.routes import UpstreamChoice, upstream_for
from relay.core.addresses import parse_address_list
from relay.core.message import ParsedMessage
from relay.core.replies import RelayError
from relay.core.rewrite import OutgoingCopy
from relay.delivery.destinations import UpstreamDestination
from relay.delivery.direct import DirectDelivery
from relay.delivery.report import DeliveryReport
from relay.upstream.errors import UpstreamLoginUnavailable
from relay.upstream.pool import UpstreamPool

_closing: set[asyncio.Task[None]] = set()


class PassthroughSession:
    """One client's login at one passthrough upstream, and the delivery of that session's mail through it.

    The connection that checked the login is kept for the first message; the pool opens another with the
    same credentials when the upstream has closed it meanwhile. One connection at a time: each is a login.
    """

    def __init__(self, upstream: UpstreamChoice, user: str, pool: UpstreamPool) -> None:
        self.upstream = upstream
        self.user = user
        destination = UpstreamDestination(pool, upstream.config.max_recipients_per_message)
        self._delivery: DirectDelivery | None = DirectDelivery(destination, concurrency=1)

    async def deliver(
        self, queue_id: str, mail_from: str, copies: Sequence[OutgoingCopy], smtputf8: bool
    ) -> DeliveryReport:
        assert self._delivery is not None, "a passthrough session delivers nothing after it ended"
        return await self._delivery.deliver(queue_id, mail_from, copies, smtputf8)

    def sender_refusal(self, config: Config, address: str, where: str) -> RelayError | None:
        """Mail from this login leaves only through the upstream it logged in at (reject_sender_login_mismatch)."""
        if upstream_for(address, config).name == self.upstream.name:
            return None
        return RelayError(
            553,
            "5.7.1",
            f"<{address}>: sender address rejected ({where}): mail from it does not leave through "
            f"{self.upstream.key}, where {self.user} logged in",
        )

    def from_header_refusal(self, config: Config, message: ParsedMessage) -> RelayError | None:
        for field in message.get_all("from"):
            for mailbox in parse_address_list(field.value):
                refusal = self.sender_refusal(config, mailbox.address, "From header")
                if refusal is not None:
                    return refusal
        return None

    def end(self) -> None:
        """The client's session is over: forget the credentials now; the upstream hears QUIT in the background."""
        delivery, self._delivery = self._delivery, None
        if delivery is None:
            return
        task = asyncio.get_running_loop().create_task(delivery.stop(0))
        _closing.add(task)
        task.add_done_callback(_closing.discard)


def own_login_refusal(config: Config, address: str, authenticated: bool) -> RelayError | None:
    """For a session not logged in at a passthrough upstream: mail that would leave through one needs that login."""
    upstream = upstream_for(address, config)
    if not upstream.config.is_passthrough:
        return None
    if not authenticated:
        return RelayError(530, "5.7.0", "Authentication required")
    return RelayError(
        553,
        "5.7.1",
        f"<{address}>: sender address rejected (MAIL FROM): mail from it leaves through {upstream.key}, "
        "which takes each sender's own login there; log in with that account",
    )


class PassthroughLogins:
    """Checks a client's login by AUTH at the passthrough upstream its login name routes to."""

    def __init__(self, config: Config, local_hostname: str) -> None:
        self._config = config
        self._local_hostname = local_hostname
        self._log = structlog.get_logger("relay")

    def reconfigure(self, config: Config) -> None:
        self._config = config

    def upstream_for_login(self, name: str) -> UpstreamChoice | None:
        """The passthrough upstream that checks this login name (routed as a sender would be), if any."""
        upstream = upstream_for(name, self._config)
        return upstream if upstream.config.is_passthrough else None

    async def open_session(self, upstream: UpstreamChoice, name: str, password: bytes) -> PassthroughSession:
        """A session logged in at the upstream as the client.

        Raises UpstreamLoginRefused (a wrong password, for the client) or UpstreamLoginUnavailable (454).
        """
        # The client's login stands where a stored username and password would: for this session only.
        own = upstream.config.model_copy(update={"username": name, "max_connections": 1})
        pool = UpstreamPool(own, password, self._local_hostname)
        try:
            await pool.connect_ahead()
        except UpstreamLoginUnavailable as exc:
            self._log.warning("auth.upstream_unavailable", upstream=upstream.key, error=exc.detail)
            raise
        return PassthroughSession(upstream, name, pool)
