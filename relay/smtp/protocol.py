"""The SMTP protocol side of the listener: aiosmtpd's SMTP with admission (allowed networks, connection
limits), implicit TLS begun after admission, a DATA deadline, a junk-command limit, and DATA read in blocks.

The hooks that turn SMTP into calls on the core and delivery are the handler's (relay/smtp/listener.py).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from asyncio import sslproto
from collections.abc import Sequence
from typing import Any, AnyStr, cast

import structlog
from aiosmtpd.smtp import MISSING, SMTP, TLSSetupException, syntax

from relay.core.replies import RelayError
from relay.smtp.data_reader import read_data
from relay.smtp.listener import ConnectionSlots, IpNetwork, RelayHandler, passthrough_of, peer_allowed, peer_ip


def tls_failure_reason(error: BaseException) -> str:
    """One line for the log: OpenSSL's reason (TLSV1_ALERT_UNKNOWN_CA, WRONG_VERSION_NUMBER) when it gave one."""
    reason = getattr(error, "reason", None) if isinstance(error, ssl.SSLError) else None
    if isinstance(error, ConnectionResetError | BrokenPipeError | EOFError) and not str(error):
        reason = "the client closed the connection during the handshake"
    text = str(reason or error) or type(error).__name__
    return text.splitlines()[0]


# NOOP, RSET, VRFY and HELP commands a client may send between messages (Postfix's default).
JUNK_COMMAND_LIMIT = 100


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP, with admission (allowed networks, connection limits), a DATA deadline, and
    implicit TLS begun only after admission, so a half-open handshake holds a counted slot for at most
    tls_handshake_timeout seconds."""

    # Postfix accepts long lines too; many scripts send HTML on one line. Lines over 998 octets are
    # folded or re-encoded before they go on (relay.line_length), or the message is refused.
    line_length_limit = 65_536

    def __init__(
        self,
        handler: RelayHandler,
        networks: Sequence[IpNetwork],
        slots: ConnectionSlots,
        command_timeout: float,
        min_data_rate: int,
        implicit_tls: ssl.SSLContext | None = None,
        tls_handshake_timeout: float = 10,
        **kwargs: Any,
    ) -> None:
        # aiosmtpd's own timer restarts at every command: that is the command timeout.
        super().__init__(handler, timeout=command_timeout, **kwargs)
        self._networks = networks
        self._slots = slots
        self._command_timeout = command_timeout
        self._min_data_rate = min_data_rate
        self._client: str | None = None
        self._refused = False
        self._released = False
        self._data_deadline: float | None = None
        self._junk_commands = 0
        self._implicit_tls = implicit_tls
        self._tls_handshake_timeout = tls_handshake_timeout

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._client is not None:
            # Called a second time when STARTTLS or implicit TLS completes: the client was admitted
            # already, and aiosmtpd starts a new session, so a passthrough login of the old one ends here.
            self._end_passthrough()
            super().connection_made(transport)
            return
        peer = transport.get_extra_info("peername")
        client = str(peer_ip(peer) or "unknown")
        log = structlog.get_logger("relay")
        refusal: RelayError | None = None
        if not peer_allowed(peer, self._networks):
            log.warning("connection.refused", client=client)
            refusal = RelayError(
                554, "5.7.1", "This relay does not accept mail from your address (not in listen.allowed_networks)"
            )
        else:
            refusal = self._slots.acquire(client)
            if refusal is not None:
                log.warning("connection.over_limit", client=client, open=self._slots.total)
        if refusal is not None:
            # A cast, not an isinstance check: uvloop's TCP transport does not derive from asyncio's classes.
            cast(asyncio.WriteTransport, transport).write(refusal.render().encode("ascii") + b"\r\n")
            transport.close()
            self._refused = True
            return
        self._client = client
        if self._implicit_tls is not None:
            self._begin_implicit_tls(transport, self._implicit_tls)
            return
        super().connection_made(transport)

    def _begin_implicit_tls(self, transport: asyncio.BaseTransport, context: ssl.SSLContext) -> None:
        """TLS from the first byte, begun here rather than by the server, so that the handshake holds a
        counted slot and must finish within tls_handshake_timeout. As aiosmtpd's STARTTLS does, with
        asyncio's SSLProtocol, set up at once: loop.start_tls would leave a turn of the event loop in
        which the ClientHello could reach this protocol instead."""
        handshake = self.loop.create_future()
        tls = sslproto.SSLProtocol(
            self.loop,
            self,
            context,
            handshake,
            server_side=True,
            # typeshed says int; asyncio takes any number of seconds.
            ssl_handshake_timeout=cast(int, self._tls_handshake_timeout),
        )
        handshake.add_done_callback(functools.partial(self._implicit_tls_done, transport))
        transport.set_protocol(tls)
        tls.connection_made(transport)

    def _implicit_tls_done(self, transport: asyncio.BaseTransport, handshake: asyncio.Future[None]) -> None:
        """On success SSLProtocol has called connection_made with the encrypted transport (and aiosmtpd began)."""
        if handshake.cancelled():
            error: BaseException | None = ConnectionAbortedError("the relay is stopping")
        else:
            error = handshake.exception()
        if error is None and self.session is not None:
            return
        self._log_tls_failure("implicit", error or ConnectionResetError())
        transport.close()
        self._release_slot()

    def _log_tls_failure(self, tls: str, error: BaseException) -> None:
        structlog.get_logger("relay").info(
            "tls.handshake_failed", client=self._client, tls=tls, reason=tls_failure_reason(error)
        )

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # aiosmtpd would log a traceback for a client's failed STARTTLS; its caller closes the connection.
            self._log_tls_failure("starttls", error.__cause__ or error)
            return "454 4.7.0 TLS handshake failed"
        return await super().handle_exception(error)

    def _release_slot(self) -> None:
        # Once only: after a failed STARTTLS aiosmtpd may report the loss twice.
        if self._client is not None and not self._released:
            self._slots.release(self._client)
            self._released = True

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        self._end_passthrough()
        self._release_slot()
        if self.session is None:
            return  # implicit TLS that never finished its handshake: aiosmtpd's session never began
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        super().eof_received()  # aiosmtpd stops its command loop here
        # And the connection closes now. aiosmtpd leaves that to its command loop, which never runs when
        # the EOF comes in the same turn of the event loop as the connection (uvloop does that for a
        # client that connects and hangs up at once), and the connection slot stayed taken until
        # command_timeout.
        return False

    def _end_passthrough(self) -> None:
        """Credentials live only as long as the client's session: drop them and log out of the upstream."""
        passthrough = passthrough_of(self.session)
        if passthrough is not None:
            assert self.session is not None
            self.session.auth_data = None
            passthrough.end()

    async def _over_junk_limit(self) -> bool:
        """Postfix's smtpd_junk_command_limit: a client that holds a connection with NOOP, RSET, VRFY or HELP
        and sends no mail is told to go, so it does not keep a connection slot forever."""
        self._junk_commands += 1
        if self._junk_commands <= JUNK_COMMAND_LIMIT:
            return False
        structlog.get_logger("relay").warning("connection.junk_commands", client=self._client)
        await self.push("421 4.7.0 Too many commands without mail; closing the connection")
        assert self._handler_coroutine is not None and self.transport is not None
        self._handler_coroutine.cancel()
        self.transport.close()
        return True

    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str) -> None:
        if not await self._over_junk_limit():
            await super().smtp_NOOP(arg)

    @syntax("RSET")
    async def smtp_RSET(self, arg: str) -> None:
        if not await self._over_junk_limit():
            await super().smtp_RSET(arg)

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:
        if not await self._over_junk_limit():
            await super().smtp_VRFY(arg)

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str) -> None:
        if not await self._over_junk_limit():
            await super().smtp_HELP(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        # Postfix's smtpd_min_data_rate: the deadline grows with every byte received, so a large
        # message on a slow line gets through while a client dripping a byte at a time does not.
        self._data_deadline = self.loop.time() + self._command_timeout
        try:
            await self._data_in_blocks(arg)
        finally:
            self._data_deadline = None
            self._junk_commands = 0  # as Postfix does once mail was sent
            if self.transport is not None:
                self._reset_timeout()

    def data_received(self, data: bytes) -> None:
        if self._data_deadline is not None:
            self._data_deadline += len(data) / self._min_data_rate
            self._reset_timeout(max(self._data_deadline - self.loop.time(), 0.001))
        super().data_received(data)

    async def push(self, status: AnyStr) -> None:
        # aiosmtpd refuses over-size mail (at MAIL SIZE= and during DATA) with "552 Error: ..." texts
        # that do not say what the limit is: say it, with the RFC 3463 code for "message too big".
        if isinstance(status, str) and status.startswith("552 Error:"):
            limit = self.data_size_limit
            await super().push(f"552 5.3.4 Message too big: this relay takes at most {limit} bytes per message")
            return
        await super().push(status)

    async def _data_in_blocks(self, arg: str) -> None:
        """aiosmtpd's DATA with the same checks and replies, but reading the content in blocks (data_reader)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert envelope is not None
        if not envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            section = await read_data(self._reader, self.data_size_limit, self.line_length_limit)
        except asyncio.IncompleteReadError:
            return  # the client went away mid-message: nothing to answer
        if section.line_too_long or section.too_big:
            await self.push(
                "500 Line too long (see RFC5321 4.5.3.1.6)"
                if section.line_too_long
                else "552 Error: Too much mail data"
            )
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        envelope.content = section.content
        envelope.original_content = section.content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)
