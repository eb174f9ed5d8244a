"""policy.action: hold: messages kept unsent until a person releases them (as split, Bcc or written) or discards them.

The listener holds, the console and `privacy-relay held` decide, and every relay process returns to the
sender what waited longer than policy.hold_max_age. Each decision is taken once: the spool settles a held
message in one transaction, so a second release or discard finds it settled and changes nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import formatdate, make_msgid
from typing import Literal

import structlog

from relay.config.models import Config
from relay.core.activity import MessageRecord, header_section, message_record, subject_of
from relay.core.dsn import FailedRecipient, build_dsn
from relay.core.message import parse_message
from relay.core.pipeline import prepare
from relay.core.policy import Action, CopyKind, Envelope
from relay.core.replies import RelayError, Reply
from relay.core.rewrite import TraceInfo
from relay.core.routing import route_for
from relay.delivery.bounces import write_failed
from relay.spool.interface import HeldMessage, HeldState, NewMessage, Spool

ReleaseAs = Literal["split", "bcc", "written"]
RELEASE_CHOICES: tuple[ReleaseAs, ...] = ("split", "bcc", "written")
# Released as written, the message goes as policy.action: pass would send it.
_ACTION_FOR: dict[ReleaseAs, Literal["split", "bcc", "pass"]] = {"split": "split", "bcc": "bcc", "written": "pass"}
_LONGEST_EXPIRY_CHECK = 60.0


class NotHeld(Exception):
    """The message is not held: unknown (state None), or settled already (state says how: released, ...)."""

    def __init__(self, message_id: str, state: HeldState | None) -> None:
        self.message_id = message_id
        self.state = state
        if state is None:
            text = f"no held message {message_id}"
        else:
            text = f"{message_id} is not held any more: it was {state}"
        super().__init__(text)


class CannotRelease(Exception):
    """The copies asked for cannot be made (the privacy check refused them); the message stays held."""


@dataclass(frozen=True, slots=True)
class Settled:
    id: str
    state: HeldState
    copies: int = 0


def _days(seconds: float) -> str:
    days = seconds / 86_400
    return f"{days:g} day{'' if days == 1 else 's'}"


class Holding:
    """Holds, releases, discards and expires held messages in the spool; config is read at each call."""

    def __init__(self, spool: Spool, hostname: str, config: Callable[[], Config]) -> None:
        self._spool = spool
        self._hostname = hostname
        self._config = config
        self.log = structlog.get_logger("relay")

    async def hold(
        self, queue_id: str, envelope: Envelope, data: bytes, trace: TraceInfo, reason: str, received_at: float
    ) -> str:
        """Store the message unsent (and the notice to its sender); the client's 250 reply."""
        config = self._config()
        held = HeldMessage(
            id=queue_id,
            mail_from=envelope.mail_from,
            recipients=envelope.rcpt_tos,
            smtputf8=envelope.smtputf8,
            received_at=received_at,
            trace={
                "helo": trace.helo,
                "peer": trace.peer,
                "protocol": trace.protocol,
                "date": trace.date,
                "message_id": f"<{queue_id}.held@{self._hostname}>",
            },
            state=HeldState.HELD,
            data=data,
        )
        record = message_record(envelope.mail_from, envelope.rcpt_tos, data, Action.HOLD.value, reason)
        notice = None
        if config.policy.hold_notify and envelope.mail_from:
            notice = self._notice(held, record.subject, reason, received_at)
        await self._spool.hold(held, record, notice)
        return (
            f"250 2.0.0 Held for review as {queue_id}, not sent yet: {reason}. It waits in the relay's spool "
            "until someone releases it on the privacy-relay console's Held page or with "
            f"`privacy-relay held release {queue_id}`"
        )

    def _notice(self, held: HeldMessage, subject: str, reason: str, now: float) -> NewMessage:
        config = self._config()
        notice = EmailMessage(policy=SMTP_POLICY)
        # From is the sender's own address, as for delivery reports: providers refuse any other.
        notice["From"] = f'"privacy-relay" <{held.mail_from}>'
        notice["To"] = held.mail_from
        notice["Subject"] = f"Held for review, not sent yet: {subject or '(no subject)'}"
        notice["Date"] = formatdate(now, localtime=True)
        notice["Message-ID"] = make_msgid(f"{held.id}.notice", domain=self._hostname)
        notice["Auto-Submitted"] = "auto-replied"
        notice.set_content(
            f'Your message "{subject or "(no subject)"}" to {len(held.recipients)} recipient(s) has not been '
            f"sent yet.\n\nThe relay on {self._hostname} holds it for review because {reason}.\n\n"
            "Someone who runs the relay can send it (each recipient getting their own copy, or everyone in Bcc) "
            "or discard it on the privacy-relay console's Held page, or with:\n\n"
            f"    privacy-relay held release {held.id}\n\n"
            f"If nobody decides within {_days(config.policy.hold_max_age)}, it comes back to you unsent.\n"
        )
        raw = notice.as_bytes()
        end = raw.index(b"\r\n\r\n") + 4
        upstream = route_for(held.mail_from, config.routes)
        return NewMessage.to_sender(held.mail_from, raw[:end], raw[end:], now, upstream, CopyKind.NOTICE)

    async def _still_held(self, message_id: str) -> HeldMessage:
        held = await self._spool.held_message(message_id)
        if held is None or held.state is not HeldState.HELD:
            raise NotHeld(message_id, None if held is None else held.state)
        return held

    async def release(self, message_id: str, how: ReleaseAs) -> Settled:
        """Queue the copies the person chose; raises NotHeld or CannotRelease, changing nothing."""
        held = await self._still_held(message_id)
        config = self._config()
        policy = dataclasses.replace(config.policy.settings(), action=_ACTION_FOR[how])
        trace = held.trace
        trace_info = TraceInfo(trace["helo"], trace["peer"], self._hostname, trace["protocol"], held.id, trace["date"])
        envelope = Envelope(held.mail_from, held.recipients, held.smtputf8)
        try:
            message = await asyncio.to_thread(parse_message, held.data)
            prepared = await asyncio.to_thread(prepare, envelope, message, policy, trace_info, trace["message_id"])
        except RelayError as refusal:
            raise CannotRelease(f"cannot release {message_id} as {how}: {refusal.text}") from None
        now = time.time()
        copies = prepared.copies
        replacement = NewMessage(
            id=held.id,
            mail_from=held.mail_from,
            smtputf8=held.smtputf8,
            body=copies[0].body if copies else b"",
            copies=tuple(copies),
            received_at=now,
            upstream=route_for(held.mail_from, config.routes),
        )
        decision = prepared.decision
        record = MessageRecord(
            held.mail_from,
            subject_of(held.data),
            held.recipients,
            decision.action.value,
            f"held for review, then released as {how} ({decision.reason})",
        )
        if not await self._spool.settle_held(message_id, HeldState.RELEASED, replacement, record):
            raise NotHeld(message_id, await self._state_of(message_id))
        self.log.info("held.released", id=message_id, release_as=how, copies=len(copies))
        return Settled(message_id, HeldState.RELEASED, len(copies))

    async def _state_of(self, message_id: str) -> HeldState | None:
        held = await self._spool.held_message(message_id)
        return None if held is None else held.state

    async def discard(self, message_id: str) -> Settled:
        held = await self._still_held(message_id)
        record = MessageRecord(
            held.mail_from, subject_of(held.data), held.recipients, Action.HOLD.value, "held for review, then discarded"
        )
        if not await self._spool.settle_held(message_id, HeldState.DISCARDED, None, record):
            raise NotHeld(message_id, await self._state_of(message_id))
        self.log.info("held.discarded", id=message_id)
        return Settled(message_id, HeldState.DISCARDED)

    async def return_expired(self, now: float) -> int:
        """Send back to their senders, unsent, the messages held longer than policy.hold_max_age."""
        config = self._config()
        max_age = config.policy.hold_max_age
        returned = 0
        for held in await self._spool.held_messages():
            if held.received_at > now - max_age:
                break  # oldest first: the rest are younger
            why = Reply(550, "5.7.1", f"held for review for more than {_days(max_age)} and never released; not sent")
            dsn = build_dsn(
                sender=held.mail_from or "MAILER-DAEMON",
                queue_id=held.id,
                reporting_host=self._hostname,
                remote=self._hostname,
                arrival_date=formatdate(held.received_at, localtime=True),
                date=formatdate(now, localtime=True),
                failures=[FailedRecipient(recipient, why) for recipient in held.recipients],
                original_headers=header_section(held.data),
            )
            report = None
            if held.mail_from:
                upstream = route_for(held.mail_from, config.routes)
                report = NewMessage.to_sender(held.mail_from, dsn.headers, dsn.body, now, upstream, CopyKind.BOUNCE)
            else:
                # The null sender has no mailbox to return it to: a person finds it in outbox/failed/.
                path = await asyncio.to_thread(write_failed, config.outbox / "failed", held.id, (dsn.headers, dsn.body))
                self.log.warning("bounce.kept_as_file", id=held.id, path=str(path))
            record = MessageRecord(
                held.mail_from,
                subject_of(held.data),
                held.recipients,
                Action.HOLD.value,
                f"held for review for more than {_days(max_age)}; returned to the sender, not sent",
            )
            if await self._spool.settle_held(held.id, HeldState.RETURNED, report, record):
                returned += 1
                self.log.warning("held.returned", id=held.id, held_days=round((now - held.received_at) / 86_400, 1))
        return returned

    async def return_expired_forever(self) -> None:
        """Every relay process runs this; the spool settles each message once, whichever process gets there first."""
        while True:
            max_age = self._config().policy.hold_max_age
            try:
                await self.return_expired(time.time())
            except Exception:
                # Must outlive a full disk or a bug, like the scheduler: logged, and tried again next round.
                self.log.exception("held.return_failed")
            await asyncio.sleep(min(_LONGEST_EXPIRY_CHECK, max_age / 4))
