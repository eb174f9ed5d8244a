"""After an attempt: record its result, retry or fail each recipient (the core's retry rule), bounce and forget.

A message with nothing left to send is retired: its failures become a delivery report to the sender (or a file
in outbox/failed/ when no mail can carry one), and the spool forgets it in the same transaction.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from email.utils import formatdate
from pathlib import Path

import structlog

from relay.config.models import Config
from relay.core.dsn import FailedRecipient, build_dsn
from relay.core.pacing import Pacer
from relay.core.policy import CopyKind
from relay.core.retry import Verdict, judge_attempt
from relay.delivery.bounces import write_failed
from relay.delivery.destinations import Destinations
from relay.spool.interface import (
    CopyResult,
    NewMessage,
    Progress,
    SchedulerSpool,
    SettledMessage,
    SpooledCopy,
    SpoolWriteError,
)
from relay.upstream.pool import SendOutcome

# How long to wait before trying again to store a result the spool refused (disk full).
RECORD_RETRY_INTERVAL = 2.0


class Retirer:
    def __init__(
        self,
        spool: SchedulerSpool,
        config: Config,
        hostname: str,
        clock: Callable[[], float],
        destinations: Destinations,
        wake: asyncio.Event,
    ) -> None:
        self._spool = spool
        self._config = config
        self._hostname = hostname
        self._clock = clock
        self._destinations = destinations
        self._wake = wake
        self._rng = random.Random()  # noqa: S311 (jitter, not a secret)
        # A retire the spool or the disk refused: the scheduler tries again on its next round.
        self.pending = False
        self.log = structlog.get_logger("relay")

    def reconfigure(self, config: Config) -> None:
        self._config = config

    async def record_attempt(self, copy: SpooledCopy, outcome: SendOutcome, pacer: Pacer) -> tuple[Verdict, Progress]:
        """Store what an attempt did to each recipient, and say where its message stands."""
        now = self._clock()
        verdict = judge_attempt(
            copy.recipients,
            outcome.accepted,
            outcome.refused,
            attempts=copy.attempts,
            received_at=copy.received_at,
            now=now,
            settings=self._config.delivery.retry_settings(),
            pacer=pacer,
            rng=self._rng,
        )
        if verdict.throttled and verdict.last_reply is not None:
            last = verdict.last_reply
            self.log.warning("upstream.throttling", reply=f"{last.code} {last.enhanced}", pace_seconds=pacer.interval)
        result = CopyResult(
            copy_id=copy.id,
            delivered=verdict.delivered,
            failed=verdict.failed,
            retry=verdict.retry,
            next_attempt=verdict.next_attempt,
            # All delivered: the upstream's 250, which the console shows (its queue id helps find the copy).
            last_reply=verdict.last_reply or outcome.accepted_reply,
            sent_at=now,
            reached_upstream=outcome.reached_upstream,
        )
        return verdict, await self._record(result, copy.message_id)

    async def _record(self, result: CopyResult, message_id: str) -> Progress:
        """Store an attempt's outcome, trying again while the spool can't be written (disk full)."""
        while True:
            try:
                return await self._spool.record(result)
            except SpoolWriteError as exc:
                # Sending the copy again would repeat it: keep the result and wait for the disk.
                self.log.error("spool.write_failed", id=message_id, error=exc.text)
                await asyncio.sleep(RECORD_RETRY_INTERVAL)

    async def forget(self, message_id: str) -> None:
        """Forget a message whose client heard of its failures in its own reply: no delivery report for them."""
        try:
            await self._spool.retire(message_id, None)
        except SpoolWriteError as exc:
            # Left in the spool, it is bounced later: a second notice, but the client's reply stays true.
            self.log.error("spool.retire_failed", id=message_id, error=exc.text)
            self.pending = True

    async def retire_settled(self, message_id: str | None) -> None:
        """Bounce and forget finished messages; if the spool or disk refuses, the scheduler tries again later."""
        try:
            for message in await self._spool.settled(message_id):
                await self._retire(message)
        except (SpoolWriteError, OSError) as exc:
            self.log.error("spool.retire_failed", id=message_id, error=str(exc))
            self.pending = True

    @property
    def _failed_folder(self) -> Path:
        return self._config.outbox / "failed"

    async def _retire(self, message: SettledMessage) -> None:
        """A message with nothing left to send: bounce its failures (or keep them as a file), then forget it."""
        replacement: NewMessage | None = None
        if message.failures:
            now = self._clock()
            dsn = build_dsn(
                sender=message.mail_from or "MAILER-DAEMON",
                queue_id=message.id,
                reporting_host=self._hostname,
                remote=self._destinations.get(message.upstream).label,
                arrival_date=formatdate(message.received_at, localtime=True),
                date=formatdate(now, localtime=True),
                failures=[
                    # A failure with a temporary reply is one that was retried until delivery.max_age.
                    FailedRecipient(f.recipient, f.reply, expired=not f.reply.is_permanent)
                    for f in message.failures
                ],
                original_headers=message.failures[0].headers,
            )
            if message.is_bounce or not message.mail_from:
                # Never a bounce to a bounce or to the null sender: a person finds it in outbox/failed/.
                parts = (message.failures[0].headers, message.body) if message.is_bounce else (dsn.headers, dsn.body)
                path = await asyncio.to_thread(write_failed, self._failed_folder, message.id, parts)
                self.log.warning("bounce.kept_as_file", id=message.id, path=str(path))
            else:
                replacement = NewMessage.to_sender(
                    message.mail_from, dsn.headers, dsn.body, now, message.upstream, CopyKind.BOUNCE
                )
                self.log.info(
                    "bounce.queued",
                    id=message.id,
                    bounce_id=replacement.id,
                    failed=[f.recipient for f in message.failures],
                )
        await self._spool.retire(message.id, replacement)
        if replacement is not None:
            self._wake.set()
