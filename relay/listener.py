"""The aiosmtpd side: SMTP in, a checked list of copies out to a Delivery, and the reply back.

No policy logic lives here: the hooks translate SMTP into calls on relay.pipeline, relay.auth and the
delivery, and their results (or SmtpReply errors) back into replies. RelaySMTP adds what aiosmtpd
lacks at the connection level: who may connect, how many at once, and how long a client may dawdle.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import ipaddress
import re
import secrets
import ssl
import time
from asyncio import sslproto
from base64 import b64decode
from collections import Counter
from collections.abc import Sequence
from email.utils import formatdate
from typing import Any, AnyStr, Protocol, cast

import structlog
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session, TLSSetupException, syntax

from relay.addresses import validate_envelope_address
from relay.auth import Authenticator, from_header_refusal, sender_refusal
from relay.config import Config
from relay.data_reader import read_data
from relay.delivery import DeliveryReport
from relay.errors import SmtpReply
from relay.message import parse_message
from relay.passthrough import PassthroughSession, own_login_refusal
from relay.pipeline import PrivacyCheckFailed, prepare
from relay.policy import Action
from relay.policy import Envelope as PolicyEnvelope
from relay.rewrite import OutgoingCopy, TraceInfo
from relay.spool import new_queue_id
from relay.users import Account, AccountsFile

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# Small messages are prepared on the event loop: handing them to a thread costs more than the work
# (a fraction of a millisecond). Large ones go to a thread so other sessions are not held up.
INLINE_PREPARE_BYTES = 65_536
INLINE_PREPARE_RECIPIENTS = 50


class Delivery(Protocol):
    async def deliver(
        self, queue_id: str, mail_from: str, copies: Sequence[OutgoingCopy], smtputf8: bool
    ) -> DeliveryReport: ...


def peer_ip(peer: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's IP address from a peername, IPv4-mapped IPv6 addresses as plain IPv4."""
    try:
        address = ipaddress.ip_address(peer[0])
    except (TypeError, ValueError, IndexError):
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def peer_allowed(peer: Any, networks: Sequence[IpNetwork]) -> bool:
    if not networks:
        return True
    address = peer_ip(peer)
    return address is not None and any(address in network for network in networks)


def client_of(session: Session) -> str:
    address = peer_ip(session.peer)
    return str(address) if address is not None else "unknown"


_LINE_ENDING = re.compile(rb"\r\n|\n|\r")


def crlf_line_endings(data: bytes) -> bytes:
    """Every line ending as CRLF: bare LF and bare CR become CRLF (the same object if there are none).

    Only <CRLF>.<CRLF> ends DATA here, but a bare <LF>.<LF> or <CR>.<CR> left in a copy could end it
    at a laxer upstream and smuggle a second message; after this, the relay checks and sends the same
    lines any upstream will see.
    """
    crlf = data.count(b"\r\n")
    if data.count(b"\n") == crlf and data.count(b"\r") == crlf:
        return data
    return _LINE_ENDING.sub(b"\r\n", data)


class ConnectionSlots:
    """Open client connections, for listen.max_connections and listen.max_connections_per_ip."""

    def __init__(self, max_total: int, max_per_client: int) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.per_client: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return self.per_client.total()

    def acquire(self, client: str) -> SmtpReply | None:
        """Take a slot for the client, or the 421 reply that refuses it (others are still served)."""
        if self.total >= self.max_total:
            return SmtpReply(421, "4.7.0", "Too many connections to this relay; try again later")
        if self.per_client[client] >= self.max_per_client:
            return SmtpReply(421, "4.7.0", f"Too many connections from {client}; try again later")
        self.per_client[client] += 1
        return None

    def release(self, client: str) -> None:
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]


async def _first_response(server: SMTP, args: list[str], prompt: str) -> bytes | None:
    """The mechanism's first client response: the initial response given with AUTH, or the answer to a
    challenge. None when the exchange already ended (undecodable base64, answered here; or a cancel)."""
    if len(args) > 1:
        response = _decode_base64(args[1])
        if response is None:
            await server.push("501 5.5.2 Cannot decode the base64 response")
        return response
    challenged = await server.challenge_auth(prompt)
    return None if challenged is MISSING else bytes(challenged)


def _decode_base64(text: str) -> bytes | None:
    try:
        return b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


def _is_encrypted(server: SMTP) -> bool:
    """True after STARTTLS and on an implicit-TLS port alike (aiosmtpd's session.ssl knows only the former)."""
    return server.transport is not None and server.transport.get_extra_info("ssl_object") is not None


def _logged_in(session: Session) -> Account | None:
    account = session.auth_data if session.authenticated else None
    return account if isinstance(account, Account) else None


def _passthrough_of(session: Session | None) -> PassthroughSession | None:
    login = session.auth_data if session is not None and session.authenticated else None
    return login if isinstance(login, PassthroughSession) else None


class RelayHandler:
    """aiosmtpd hooks. Holds the config and delivery it was built with."""

    def __init__(
        self, config: Config, delivery: Delivery, hostname: str, authenticator: Authenticator | None = None
    ) -> None:
        self.config = config
        self.delivery = delivery
        self.hostname = hostname
        self.authenticator = authenticator
        self.log = structlog.get_logger("relay")

    def _may_authenticate(self, server: SMTP, session: Session) -> bool:
        """Passwords only over TLS, except from this machine itself (RFC 4954 section 4)."""
        address = peer_ip(session.peer)
        loopback = address is not None and address.is_loopback
        return self.authenticator is not None and (_is_encrypted(server) or loopback)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if not self._may_authenticate(server, session):
            responses = [line for line in responses if not line.startswith("250-AUTH")]
        # aiosmtpd reads pipelined commands correctly but does not say so (RFC 2920).
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_AUTH(self, server: SMTP, session: Session, envelope: Envelope, args: list[str]) -> object:
        """Whether this client may try AUTH now: a refusal reply, or MISSING to run the mechanism."""
        if self.authenticator is None:
            return "503 5.5.1 Error: authentication not enabled"
        if envelope.mail_from is not None:
            return "503 5.5.1 AUTH is not allowed during a mail transaction (RFC 4954)"
        if not self._may_authenticate(server, session):
            return "538 5.7.11 Encryption required for requested authentication mechanism: use STARTTLS first"
        refusal = self.authenticator.refusal_for(client_of(session))
        return refusal.render() if refusal is not None else MISSING

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        """RFC 4616: [authzid] NUL authcid NUL passwd, as an initial response or after an empty challenge."""
        response = await _first_response(server, args, "")
        if response is None:
            return AuthResult(success=False, handled=True)
        parts = response.split(b"\x00")
        # Acting for another user (an authzid that differs) is not something this relay grants.
        if len(parts) != 3 or parts[0] not in (b"", parts[1]):
            await server.push("501 5.5.2 Malformed AUTH PLAIN response")
            return AuthResult(success=False, handled=True)
        return await self._login(server, parts[1], parts[2])

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        """The de facto LOGIN mechanism (draft-murchison-sasl-login): user name, then password."""
        name = await _first_response(server, args, "Username:")
        if name is None:
            return AuthResult(success=False, handled=True)
        password = await server.challenge_auth("Password:")
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._login(server, name, password)

    async def _login(self, server: SMTP, name: bytes, password: bytes) -> AuthResult:
        assert self.authenticator is not None and server.session is not None
        try:
            account = await self.authenticator.login(client_of(server.session), name, password)
        except SmtpReply as refusal:
            return AuthResult(success=False, handled=False, message=refusal.render())
        return AuthResult(success=True, auth_data=account)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.config.listen.auth == "required" and not session.authenticated:
            return "530 5.7.0 Authentication required"
        if address != "<>":
            try:
                validate_envelope_address(address, smtputf8=envelope.smtp_utf8)
            except SmtpReply as reply:
                return reply.render()
        refusal = self._sender_refusal(session, "" if address == "<>" else address)
        if refusal is not None:
            return refusal.render()
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Sender OK"

    @property
    def _accounts_file(self) -> AccountsFile | None:
        """The accounts for client AUTH; None when AUTH is off or offered only for passthrough."""
        return self.authenticator.accounts if self.authenticator is not None else None

    def _sender_refusal(self, session: Session, address: str) -> SmtpReply | None:
        passthrough = _passthrough_of(session)
        if passthrough is not None:
            return passthrough.sender_refusal(self.config, address, "MAIL FROM")
        refusal = own_login_refusal(self.config, address, bool(session.authenticated))
        accounts = self._accounts_file
        if refusal is None and address and accounts is not None:
            refusal = sender_refusal(accounts.current(), _logged_in(session), address, "MAIL FROM")
        return refusal

    def _from_header_refusal(
        self, passthrough: PassthroughSession | None, login: Account | None, data: bytes
    ) -> SmtpReply | None:
        """The From check that goes with the session's login: its passthrough upstream's, or the accounts file's."""
        accounts = self._accounts_file
        if passthrough is None and accounts is None:
            return None
        try:
            message = parse_message(data)
            if passthrough is not None:
                return passthrough.from_header_refusal(self.config, message)
            assert accounts is not None
            return from_header_refusal(accounts.current(), login, message)
        except SmtpReply as malformed:
            return malformed

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        limit = self.config.listen.max_recipients
        if len(envelope.rcpt_tos) >= limit:
            return (
                f"452 4.5.3 Too many recipients: this relay takes at most {limit} per message; "
                "send the rest in another message"
            )
        try:
            validate_envelope_address(address, smtputf8=envelope.smtp_utf8)
        except SmtpReply as reply:
            return reply.render()
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        started = time.monotonic()
        queue_id = new_queue_id()
        data = crlf_line_endings(envelope.original_content or b"")
        mail_from = "" if envelope.mail_from == "<>" else str(envelope.mail_from)
        login = _logged_in(session)
        passthrough = _passthrough_of(session)
        log = self.log.bind(id=queue_id, client=session.peer[0] if session.peer else None)
        log.info(
            "message.accepted",
            size=len(data),
            mail_from=mail_from,
            recipients=len(envelope.rcpt_tos),
            user=login.name if login else None,
            login=passthrough.user if passthrough else None,
        )
        if b"\x00" in data:
            # An upstream that drops NUL bytes would read <CRLF><NUL>.<CRLF> as the end of the message.
            log.info("message.refused", code=550, reason="NUL byte")
            return "550 5.6.0 The message contains a NUL byte, which SMTP does not allow; fix the sending program"
        from_refusal = self._from_header_refusal(passthrough, login, data)
        if from_refusal is not None:
            log.info("message.refused", code=from_refusal.code, reason=from_refusal.text)
            return from_refusal.render()
        # RFC 3848: S for TLS, A for an authenticated client.
        protocol = "UTF8SMTP" if envelope.smtp_utf8 else "ESMTP"
        protocol += ("S" if _is_encrypted(server) else "") + ("A" if session.authenticated else "")
        trace = TraceInfo(
            helo=session.host_name or "unknown",
            peer=f"[{session.peer[0]}]" if session.peer else "unknown",
            hostname=self.hostname,
            protocol=protocol,
            queue_id=queue_id,
            date=formatdate(localtime=True),
        )
        policy_envelope = PolicyEnvelope(mail_from, tuple(envelope.rcpt_tos), envelope.smtp_utf8)
        arguments = (
            policy_envelope,
            data,
            self.config.policy,
            trace,
            f"<{queue_id}.{secrets.token_hex(8)}@{self.hostname}>",
        )
        try:
            if len(data) <= INLINE_PREPARE_BYTES and len(envelope.rcpt_tos) <= INLINE_PREPARE_RECIPIENTS:
                prepared = prepare(*arguments)
            else:
                prepared = await asyncio.to_thread(prepare, *arguments)
        except PrivacyCheckFailed as failure:
            log.error(
                "policy.failure",
                decision=failure.decision.action.value,
                header=failure.leak.field,
                leaked=failure.leak.address,
            )
            return failure.render()
        except SmtpReply as refusal:
            log.info("message.refused", code=refusal.code, reason=refusal.text)
            return refusal.render()

        decision = prepared.decision
        if decision.action is Action.PASS:
            log.warning("policy.exposed_passed", reason=decision.reason)
        elif decision.action is Action.OVERRIDE:
            # Every deliberate exposure leaves a trace: who could see whom is in exposed_fields.
            log.warning(
                "policy.override",
                tag=decision.override_tag,
                exposed_fields=list(decision.exposed_fields),
                protected=len(decision.protected),
            )
        # A passthrough session's mail goes out now, logged in as the client, and is never spooled.
        delivery = passthrough or self.delivery
        try:
            report = await delivery.deliver(queue_id, mail_from, prepared.copies, envelope.smtp_utf8)
        except SmtpReply as refusal:
            # The spool could not commit the message: the client keeps it and tries again later.
            log.error("message.not_stored", code=refusal.code, reason=refusal.text)
            return refusal.render()
        reply = report.client_reply(queue_id)
        log.info(
            "message.queued" if report.queued else "message.relayed" if report.ok else "message.not_relayed",
            decision=decision.action.value,
            reason=decision.reason,
            copies=len(prepared.copies),
            size=len(data),
            destination=report.destination,
            reply=reply[:3],
            failed=list(report.failures),
            queued=report.queued,
            ms=round((time.monotonic() - started) * 1000, 1),
        )
        return reply


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

    # Postfix accepts long lines too; many scripts send HTML on one line.
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
        refusal: SmtpReply | None = None
        if not peer_allowed(peer, self._networks):
            log.warning("connection.refused", client=client)
            refusal = SmtpReply(
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
        passthrough = _passthrough_of(self.session)
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
