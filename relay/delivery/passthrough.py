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
from relay.core.activity import MessageRecord
from relay.core.message import ParsedMessage
from relay.core.replies import RelayError
from relay.core.rewrite import OutgoingCopy
from relay.core.senders import (
    UpstreamLogin,
    needs_own_login_refusal,
    upstream_login_from_refusal,
    upstream_login_refusal,
)
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
        self,
        queue_id: str,
        mail_from: str,
        copies: Sequence[OutgoingCopy],
        smtputf8: bool,
        record: MessageRecord | None = None,
    ) -> DeliveryReport:
        """Sent at once and never stored: no history is kept (record is not used)."""
        assert self._delivery is not None, "a passthrough session delivers nothing after it ended"
        return await self._delivery.deliver(queue_id, mail_from, copies, smtputf8)

    @property
    def login(self) -> UpstreamLogin:
        return UpstreamLogin(self.upstream.name, self.upstream.key, self.user)

    def sender_refusal(self, config: Config, address: str, where: str) -> RelayError | None:
        return upstream_login_refusal(config.routes, self.login, address, where)

    def from_header_refusal(self, config: Config, message: ParsedMessage) -> RelayError | None:
        return upstream_login_from_refusal(config.routes, self.login, message)

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
    return needs_own_login_refusal(upstream.key if upstream.config.is_passthrough else None, address, authenticated)


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
