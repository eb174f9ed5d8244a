"""Delivery: where each copy goes and what the client is told about it.

The listener hands a finished, checked list of copies to a Delivery. This issue's mode is direct:
the client's DATA gets 250 only once the destination took every copy. The destination of a message is
chosen in one place, Delivery.destination_for(), so per-sender upstreams can slot in there.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiosmtplib

from relay.forwarder import SendOutcome, UpstreamPool, UpstreamReply
from relay.outbox import Outbox
from relay.rewrite import OutgoingCopy


class Destination(Protocol):
    @property
    def label(self) -> str: ...

    async def send_copy(
        self, queue_id: str, index: int, mail_from: str, copy: OutgoingCopy, smtputf8: bool
    ) -> SendOutcome: ...

    async def close(self) -> None: ...


class OutboxDestination:
    def __init__(self, folder: Path) -> None:
        self._outbox = Outbox(folder)
        self.written: list[Path] = []

    @property
    def label(self) -> str:
        return self._outbox.label

    async def send_copy(
        self, queue_id: str, index: int, mail_from: str, copy: OutgoingCopy, smtputf8: bool
    ) -> SendOutcome:
        await self._outbox.write(queue_id, index, copy)
        return SendOutcome(accepted=list(copy.recipients))

    async def close(self) -> None:
        return None


class UpstreamDestination:
    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool

    @property
    def label(self) -> str:
        return f"upstream {self._pool.label}"

    async def send_copy(
        self, queue_id: str, index: int, mail_from: str, copy: OutgoingCopy, smtputf8: bool
    ) -> SendOutcome:
        return await self._pool.send(mail_from, copy, smtputf8)

    async def close(self) -> None:
        await self._pool.close()


def reply_for_exception(exc: BaseException, where: str) -> UpstreamReply:
    """What a failure to talk to the destination means for the client, as an SMTP reply."""
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return UpstreamReply(
            exc.code,
            "5.7.8" if exc.code >= 500 else "4.7.0",
            f"{where} refused the relay's login ({' '.join(exc.message.split())}); "
            "check upstream.username and the password",
        )
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code >= 400:
        return UpstreamReply.parse(exc.code, f"{where}: {exc.message}")
    if isinstance(exc, ssl.SSLError) or "CERTIFICATE" in str(exc).upper():
        return UpstreamReply(451, "4.7.5", f"TLS with {where} failed: {exc}; try again later")
    if isinstance(exc, aiosmtplib.SMTPException | OSError | asyncio.TimeoutError):
        detail = str(exc) or type(exc).__name__
        return UpstreamReply(451, "4.4.1", f"cannot reach {where} ({detail}); try again later")
    raise exc


@dataclass(slots=True)
class DeliveryReport:
    destination: str
    copies: int
    delivered_recipients: int = 0
    failures: dict[str, UpstreamReply] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    def client_reply(self, queue_id: str) -> str:
        if not self.failures:
            return f"250 2.0.0 OK: relayed as {self.copies} cop{'y' if self.copies == 1 else 'ies'} (id {queue_id})"
        replies = list(self.failures.values())
        temporary = [r for r in replies if not r.is_permanent]
        chosen = temporary[0] if temporary else replies[0]
        # The upstream's 421 closed the upstream's session; passed on, it would tell the client that
        # the relay is closing this one (RFC 5321 3.8), so clients would drop it mid-session.
        code = 451 if chosen.code == 421 else chosen.code
        failed = ", ".join(self.failures)
        text = f"{chosen.text} (not delivered to: {failed}"
        if self.delivered_recipients:
            text += f"; {self.delivered_recipients} other recipient(s) already received it"
        return f"{code} {chosen.enhanced} {' '.join((text + ')').split())}"


class DirectDelivery:
    """Sends every copy while the client waits, at most max_connections at a time."""

    def __init__(self, default: Destination, concurrency: int) -> None:
        self._default = default
        self._concurrency = concurrency

    def destination_for(self, mail_from: str) -> Destination:
        return self._default

    async def deliver(
        self, queue_id: str, mail_from: str, copies: Sequence[OutgoingCopy], smtputf8: bool
    ) -> DeliveryReport:
        destination = self.destination_for(mail_from)
        report = DeliveryReport(destination.label, len(copies))
        pending = list(enumerate(copies))
        pending.reverse()
        unreachable: UpstreamReply | None = None

        async def worker() -> None:
            nonlocal unreachable
            while pending:
                index, copy = pending.pop()
                if unreachable is not None:
                    report.failures.update(dict.fromkeys(copy.recipients, unreachable))
                    continue
                try:
                    outcome = await destination.send_copy(queue_id, index, mail_from, copy, smtputf8)
                except Exception as exc:
                    reply = reply_for_exception(exc, destination.label)
                    # The destination is down or refuses us: don't try it once per copy.
                    unreachable = reply
                    report.failures.update(dict.fromkeys(copy.recipients, reply))
                    continue
                report.delivered_recipients += len(outcome.accepted)
                report.failures.update(outcome.refused)

        workers = min(self._concurrency, len(copies))
        await asyncio.gather(*(worker() for _ in range(workers)))
        return report

    async def close(self) -> None:
        await self._default.close()
