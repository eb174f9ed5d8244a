"""The aiosmtpd handler: SMTP in, a checked list of copies out to a Delivery, and the reply back.

No policy logic lives here: the hooks translate SMTP into calls on relay.core.pipeline, relay.smtp.auth and the
delivery, and their results (or RelayError errors) back into replies. RelaySMTP (relay/smtp/protocol.py) adds
what aiosmtpd lacks at the connection level: who may connect, how many at once, and how long a client may dawdle.
"""

from __future__ import annotations

import asyncio
import binascii
import ipaddress
import secrets
import time
from base64 import b64decode
from collections import Counter
from collections.abc import Sequence
from email.utils import formatdate
from typing import Any, Protocol

import structlog
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session

from relay.config.models import Config
from relay.core.activity import REFUSED, MessageRecord, message_record
from relay.core.addresses import validate_envelope_address
from relay.core.message import ParsedMessage, parse_message
from relay.core.pipeline import PrivacyCheckFailed, prepare
from relay.core.policy import Action
from relay.core.policy import Envelope as PolicyEnvelope
from relay.core.replies import RelayError
from relay.core.rewrite import OutgoingCopy, TraceInfo
from relay.core.senders import Account, from_header_refusal, sender_refusal
from relay.delivery.holding import Holding
from relay.delivery.passthrough import PassthroughSession, own_login_refusal
from relay.delivery.report import DeliveryReport
from relay.smtp.accounts import AccountsFile
from relay.smtp.auth import Authenticator
from relay.spool.interface import SchedulerSpool, new_queue_id

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# Small messages are parsed and prepared on the event loop: handing them to a thread costs more than the work
# (a fraction of a millisecond). Large ones go to a thread so other sessions are not held up.
INLINE_PREPARE_BYTES = 65_536
INLINE_PREPARE_RECIPIENTS = 50


class Delivery(Protocol):
    async def deliver(
        self,
        queue_id: str,
        mail_from: str,
        copies: Sequence[OutgoingCopy],
        smtputf8: bool,
        record: MessageRecord | None = None,
    ) -> DeliveryReport:
        """record: what the console's history keeps of the message, when this delivery stores it."""


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


class ConnectionSlots:
    """Open client connections, for listen.max_connections and listen.max_connections_per_ip."""

    def __init__(self, max_total: int, max_per_client: int) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.per_client: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return self.per_client.total()

    def acquire(self, client: str) -> RelayError | None:
        """Take a slot for the client, or the 421 reply that refuses it (others are still served)."""
        if self.total >= self.max_total:
            return RelayError(421, "4.7.0", "Too many connections to this relay; try again later")
        if self.per_client[client] >= self.max_per_client:
            return RelayError(421, "4.7.0", f"Too many connections from {client}; try again later")
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


def passthrough_of(session: Session | None) -> PassthroughSession | None:
    login = session.auth_data if session is not None and session.authenticated else None
    return login if isinstance(login, PassthroughSession) else None


class RelayHandler:
    """aiosmtpd hooks. Holds the config and delivery it was built with."""

    def __init__(
        self,
        config: Config,
        delivery: Delivery,
        hostname: str,
        authenticator: Authenticator | None = None,
        history: SchedulerSpool | None = None,
        holding: Holding | None = None,
    ) -> None:
        """history: the spool that keeps refused messages for the console too; holding: policy.action hold.

        Both exist with spooled delivery only.
        """
        self.config = config
        self.delivery = delivery
        self.history = history
        self.holding = holding
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
        except RelayError as refusal:
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
            except RelayError as reply:
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

    def _sender_refusal(self, session: Session, address: str) -> RelayError | None:
        passthrough = passthrough_of(session)
        if passthrough is not None:
            return passthrough.sender_refusal(self.config, address, "MAIL FROM")
        refusal = own_login_refusal(self.config, address, bool(session.authenticated))
        accounts = self._accounts_file
        if refusal is None and address and accounts is not None:
            refusal = sender_refusal(accounts.current(), _logged_in(session), address, "MAIL FROM")
        return refusal

    def _from_header_refusal(
        self, passthrough: PassthroughSession | None, login: Account | None, message: ParsedMessage
    ) -> RelayError | None:
        """The From check that goes with the session's login: its passthrough upstream's, or the accounts file's."""
        if passthrough is not None:
            return passthrough.from_header_refusal(self.config, message)
        accounts = self._accounts_file
        if accounts is None:
            return None
        return from_header_refusal(accounts.current(), login, message)

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
        except RelayError as reply:
            return reply.render()
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        started = time.monotonic()
        queue_id = new_queue_id()
        # Line endings are read (and made CRLF in every copy) by parse_message, the one reading of a message.
        data = envelope.original_content or b""
        mail_from = "" if envelope.mail_from == "<>" else str(envelope.mail_from)
        login = _logged_in(session)
        passthrough = passthrough_of(session)
        log = self.log.bind(id=queue_id, client=session.peer[0] if session.peer else None)
        log.info(
            "message.accepted",
            size=len(data),
            mail_from=mail_from,
            recipients=len(envelope.rcpt_tos),
            user=login.name if login else None,
            login=passthrough.user if passthrough else None,
        )
        received_at = time.time()

        async def refuse(refusal: RelayError) -> str:
            if self.history is not None:
                record = message_record(mail_from, envelope.rcpt_tos, data, REFUSED, refusal.render())
                try:
                    await self.history.remember(queue_id, received_at, record)
                except RelayError as exc:  # the spool is full: the refusal stands, only its trace is lost
                    log.error("history.not_stored", reason=exc.text)
            return refusal.render()

        if b"\x00" in data:
            # An upstream that drops NUL bytes would read <CRLF><NUL>.<CRLF> as the end of the message.
            log.info("message.refused", code=550, reason="NUL byte")
            return await refuse(
                RelayError(
                    550, "5.6.0", "The message contains a NUL byte, which SMTP does not allow; fix the sending program"
                )
            )
        # Parsed once, here; a big message in a thread, so the event loop keeps serving other clients.
        inline = len(data) <= INLINE_PREPARE_BYTES and len(envelope.rcpt_tos) <= INLINE_PREPARE_RECIPIENTS
        try:
            message = parse_message(data) if inline else await asyncio.to_thread(parse_message, data)
        except RelayError as malformed:
            log.info("message.refused", code=malformed.code, reason=malformed.text)
            return await refuse(malformed)
        from_refusal = self._from_header_refusal(passthrough, login, message)
        if from_refusal is not None:
            log.info("message.refused", code=from_refusal.code, reason=from_refusal.text)
            return await refuse(from_refusal)
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
            message,
            self.config.policy.settings(),
            trace,
            f"<{queue_id}.{secrets.token_hex(8)}@{self.hostname}>",
        )
        try:
            if inline:
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
            return await refuse(failure)
        except RelayError as refusal:
            log.info("message.refused", code=refusal.code, reason=refusal.text)
            return await refuse(refusal)

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
        if decision.action is Action.HOLD:
            return await self._hold(log, queue_id, policy_envelope, data, trace, decision.reason, received_at)
        # A passthrough session's mail goes out now, logged in as the client, and is never spooled.
        delivery = passthrough or self.delivery
        try:
            record = message_record(mail_from, envelope.rcpt_tos, data, decision.action.value, decision.reason)
            report = await delivery.deliver(queue_id, mail_from, prepared.copies, envelope.smtp_utf8, record)
        except RelayError as refusal:
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

    async def _hold(
        self,
        log: Any,
        queue_id: str,
        envelope: PolicyEnvelope,
        data: bytes,
        trace: TraceInfo,
        reason: str,
        received_at: float,
    ) -> str:
        if self.holding is None:
            # policy.action became hold at a reload while delivery.mode is still direct (a restart-only setting).
            log.error("message.not_held", reason="policy.action hold needs spooled delivery; restart the relay")
            return "451 4.3.5 The relay cannot hold mail for review until it is restarted; try again later"
        try:
            reply = await self.holding.hold(queue_id, envelope, data, trace, reason, received_at)
        except RelayError as refusal:
            log.error("message.not_stored", code=refusal.code, reason=refusal.text)
            return refusal.render()
        log.info("message.held", reason=reason, size=len(data), recipients=len(envelope.rcpt_tos))
        return reply
