"""The aiosmtpd side: SMTP in, a checked list of copies out to a Delivery, and the reply back.

No policy logic lives here: the hooks translate SMTP into calls on relay.pipeline and the delivery,
and their results (or SmtpReply errors) back into replies.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import time
from collections.abc import Sequence
from email.utils import formatdate
from typing import Any, AnyStr, Protocol

import structlog
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.addresses import validate_envelope_address
from relay.config import Config
from relay.delivery import DeliveryReport
from relay.errors import SmtpReply
from relay.pipeline import PrivacyCheckFailed, prepare
from relay.policy import Action
from relay.policy import Envelope as PolicyEnvelope
from relay.rewrite import OutgoingCopy, TraceInfo

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Delivery(Protocol):
    async def deliver(
        self, queue_id: str, mail_from: str, copies: Sequence[OutgoingCopy], smtputf8: bool
    ) -> DeliveryReport: ...


def new_queue_id() -> str:
    return secrets.token_hex(6).upper()


def peer_allowed(peer: Any, networks: Sequence[IpNetwork]) -> bool:
    if not networks:
        return True
    try:
        address = ipaddress.ip_address(peer[0])
    except (TypeError, ValueError, IndexError):
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


class RelayHandler:
    """aiosmtpd hooks. Holds the config and delivery it was built with."""

    def __init__(self, config: Config, delivery: Delivery, hostname: str) -> None:
        self.config = config
        self.delivery = delivery
        self.hostname = hostname
        self.log = structlog.get_logger("relay")

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # aiosmtpd reads pipelined commands correctly but does not say so (RFC 2920).
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address != "<>":
            try:
                validate_envelope_address(address, smtputf8=envelope.smtp_utf8)
            except SmtpReply as reply:
                return reply.render()
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Sender OK"

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
        data = envelope.original_content or b""
        mail_from = "" if envelope.mail_from == "<>" else str(envelope.mail_from)
        log = self.log.bind(id=queue_id, client=session.peer[0] if session.peer else None)
        log.info(
            "message.accepted",
            size=len(data),
            mail_from=mail_from,
            recipients=len(envelope.rcpt_tos),
        )
        trace = TraceInfo(
            helo=session.host_name or "unknown",
            peer=f"[{session.peer[0]}]" if session.peer else "unknown",
            hostname=self.hostname,
            protocol=("UTF8SMTP" if envelope.smtp_utf8 else "ESMTP") + ("S" if session.ssl else ""),
            queue_id=queue_id,
            date=formatdate(localtime=True),
        )
        policy_envelope = PolicyEnvelope(mail_from, tuple(envelope.rcpt_tos), envelope.smtp_utf8)
        try:
            prepared = await asyncio.to_thread(
                prepare,
                policy_envelope,
                data,
                self.config.policy,
                trace,
                f"<{queue_id}.{secrets.token_hex(8)}@{self.hostname}>",
            )
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
        report = await self.delivery.deliver(queue_id, mail_from, prepared.copies, envelope.smtp_utf8)
        reply = report.client_reply(queue_id)
        log.info(
            "message.relayed" if report.ok else "message.not_relayed",
            decision=decision.action.value,
            reason=decision.reason,
            copies=len(prepared.copies),
            size=len(data),
            destination=report.destination,
            reply=reply[:3],
            failed=list(report.failures),
            ms=round((time.monotonic() - started) * 1000, 1),
        )
        return reply


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP, refusing connections from outside listen.allowed_networks."""

    # Postfix accepts long lines too; many scripts send HTML on one line.
    line_length_limit = 65_536

    def __init__(self, handler: RelayHandler, networks: Sequence[IpNetwork], **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._networks = networks
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        if not peer_allowed(peer, self._networks):
            structlog.get_logger("relay").warning("connection.refused", client=peer[0] if peer else None)
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(
                b"554 5.7.1 This relay does not accept mail from your address (not in listen.allowed_networks)\r\n"
            )
            transport.close()
            self._refused = True
            return
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if not self._refused:
            super().connection_lost(error)

    async def push(self, status: AnyStr) -> None:
        # aiosmtpd refuses over-size mail (at MAIL SIZE= and during DATA) with "552 Error: ..." texts
        # that do not say what the limit is: say it, with the RFC 3463 code for "message too big".
        if isinstance(status, str) and status.startswith("552 Error:"):
            limit = self.data_size_limit
            await super().push(f"552 5.3.4 Message too big: this relay takes at most {limit} bytes per message")
            return
        await super().push(status)
