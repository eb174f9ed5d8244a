"""Who sends what, when: due copies from the spool, within the connections, the rate limits and the upstream's pace.

Each attempt's result goes to the Retirer (relay/delivery/retire.py), which decides what happens next.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable

import structlog

from relay.config.models import Config
from relay.core.pacing import Pacer, RateLimiter
from relay.core.replies import Reply
from relay.core.rewrite import OutgoingCopy
from relay.delivery.bodies import BodyCache
from relay.delivery.destinations import Destinations
from relay.delivery.retire import Retirer
from relay.delivery.watch import Watch
from relay.spool.interface import NewMessage, Progress, SchedulerSpool, SharedSends, SpooledCopy, SpoolWriteError
from relay.upstream.errors import UpstreamFailure, upstream_failure
from relay.upstream.pool import SendOutcome

# How often an idle scheduler looks at the spool, so `privacy-relay queue retry` takes effect soon.
POLL_INTERVAL = 2.0


class Scheduler:
    def __init__(
        self,
        spool: SchedulerSpool,
        destinations: Destinations,
        config: Config,
        clock: Callable[[], float],
        retirer: Retirer,
        wake: asyncio.Event,
    ) -> None:
        self._spool = spool
        self._destinations = destinations
        self._config = config
        self._clock = clock
        self._retirer = retirer
        self._wake = wake
        self.limiter = RateLimiter(config.upstream.rate_limit.per_minute, config.upstream.rate_limit.per_day)
        self.pacer = Pacer()
        self.bodies = BodyCache()
        # Hybrid-mode clients waiting for their message's first attempts, by message id.
        self.watches: dict[str, Watch] = {}
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        self._in_flight_messages: dict[int, tuple[str, int]] = {}
        # Started from memory, a message's copies take at most max_connections upstream connections at
        # a time, so that a 200-copy newsletter leaves room for a colleague's message (DirectDelivery too).
        self._gates: dict[str, asyncio.Semaphore] = {}
        # The scheduler last stopped short (no free connection, or a full batch): more may be due.
        self._more_due = False
        self.stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._capped_logged = False
        self.log = structlog.get_logger("relay")

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def reconfigure(self, config: Config) -> None:
        self._config = config
        self.limiter.configure(config.upstream.rate_limit.per_minute, config.upstream.rate_limit.per_day)
        self.pacer = Pacer()
        self._wake.set()

    @property
    def sends_in_flight(self) -> list[asyncio.Task[None]]:
        return list(self._in_flight.values())

    def first_attempts_now(self, copies: int, now: float, hybrid: bool) -> int:
        """How many copies of a new message start at once from memory, skipping a claim through the spool.

        Rate limits and throttling leave the pacing to the scheduler. In queue mode only free connections
        start at once, so a burst does not hold every queued body in memory; a hybrid client holds its
        body while it waits anyway.
        """
        if self.stopping or self.limiter.allowance(now) is not None or self.pacer.interval > 0:
            return 0
        if hybrid:
            return copies
        return max(0, min(copies, self._free_connections))

    @property
    def _free_connections(self) -> int:
        """Upstream connections not taken by a copy being sent (negative while hybrid first attempts queue)."""
        return self._config.upstream.max_connections - len(self._in_flight)

    def launch_first_attempts(self, message: NewMessage, copy_ids: tuple[int, ...], now: float) -> None:
        """Send the copies a new message stored as claimed, from the body in memory."""
        if self.stopping:
            return
        if message.claimed > 1:
            self._gates[message.id] = asyncio.Semaphore(self._config.upstream.max_connections)
        for position in range(message.claimed):
            copy = message.copies[position]
            claimed = SpooledCopy(
                id=copy_ids[position],
                message_id=message.id,
                position=position,
                kind=copy.kind,
                recipients=copy.recipients,
                headers=copy.headers,
                mail_from=message.mail_from,
                smtputf8=message.smtputf8,
                upstream=message.upstream,
                received_at=message.received_at,
                attempts=0,
            )
            self._launch(claimed, message.body, now)

    def release_body(self, message_id: str) -> None:
        if self.bodies.release(message_id):
            self._gates.pop(message_id, None)

    def _launch(self, copy: SpooledCopy, body: bytes, now: float) -> None:
        """Start one attempt of a claimed copy."""
        self.limiter.record(now, len(copy.recipients))
        self.pacer.started(now)
        self.bodies.hold(copy.message_id, body)
        task = asyncio.get_running_loop().create_task(self._attempt(copy, body))
        self._in_flight[copy.id] = task
        self._in_flight_messages[copy.id] = (copy.message_id, copy.position)
        task.add_done_callback(functools.partial(self._finished, copy.id, copy.message_id))

    async def _run(self) -> None:
        while not self.stopping:
            try:
                await self._dispatch()
            except SpoolWriteError as exc:
                self.log.error("spool.write_failed", error=exc.text)
                await self._sleep(POLL_INTERVAL)
            except Exception:
                # The scheduler must outlive a bug: logged, and the spool is looked at again shortly.
                self.log.exception("delivery.scheduler_error")
                await self._sleep(POLL_INTERVAL)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(seconds, 0.0)):
                await self._wake.wait()

    async def _dispatch(self) -> None:
        # Cleared before looking at the spool, so a message stored meanwhile cuts the next sleep short.
        self._wake.clear()
        self._more_due = False
        if self._retirer.pending:
            self._retirer.pending = False
            await self._retirer.retire_settled(None)
        now = self._clock()
        free = self._free_connections
        if free <= 0:
            self._more_due = True
            await self._sleep(POLL_INTERVAL)
            return
        allowance = self.limiter.allowance(now)
        wait = max(self.limiter.wait(now, 1), self.pacer.wait(now))
        if allowance == 0 or wait > 0:
            self._log_daily_cap(now, 1)
            for message_id in self.watches:
                self._stop_waiting_for_held_copies(message_id)
            if wait > POLL_INTERVAL:
                # So that `queue list` shows when the waiting copies will really go.
                await self._spool.postpone(now, now + wait)
            await self._sleep(wait)
            return
        limit = min(free, allowance) if allowance is not None else free
        if self.pacer.interval > 0:
            limit = 1
        # Held for spool.lease: not settled by then (its result could not be stored, the relay died), it goes again.
        batch = await self._spool.claim_due(now, limit, self._config.spool.lease)
        self._more_due = len(batch) >= limit
        if not batch:
            due = await self._spool.next_due()
            await self._sleep(POLL_INTERVAL if due is None else min(POLL_INTERVAL, due - now))
            return
        # A body already in memory (copies of its message are being sent) is not read again.
        read = await self._spool.bodies(self.bodies.missing(copy.message_id for copy in batch))
        sendable: list[tuple[SpooledCopy, bytes]] = []
        for copy in batch:
            if copy.id in self._in_flight:
                continue
            body = self.bodies.get(copy.message_id) or read.get(copy.message_id)
            if body is not None:  # else deleted (`queue delete`) since the claim, its copies with it
                sendable.append((copy, body))
        granted, shared_wait = await self._take_shared_sends(now, [copy for copy, _ in sendable])
        for index, (copy, body) in enumerate(sendable):
            now = self._clock()
            wait = max(self.limiter.wait(now, len(copy.recipients)), self.pacer.wait(now))
            if index >= granted:
                # Other relays sharing the spool used the rate limit's room.
                wait = max(wait, shared_wait)
            if wait > 0:
                self._log_daily_cap(now, len(copy.recipients))
                await self._spool.release(copy.id, now + wait)
                self._stop_waiting_for_held_copies(copy.message_id)
                continue
            self._capped_logged = False
            self._launch(copy, body, now)

    async def _take_shared_sends(self, now: float, copies: list[SpooledCopy]) -> tuple[int, float]:
        """With a spool several relays share and a rate limit, how many copies the limit leaves room for
        across all of them, and how long the rest wait; otherwise all of them (this relay's limiter decides)."""
        limit = self._config.upstream.rate_limit
        if not isinstance(self._spool, SharedSends) or (limit.per_minute is None and limit.per_day is None):
            return len(copies), 0.0
        return await self._spool.take_sends(now, copies, limit.per_minute, limit.per_day)

    def _stop_waiting_for_held_copies(self, message_id: str) -> None:
        """A client waiting in hybrid mode hears about the copies in flight, not those a rate limit holds back."""
        watch = self.watches.get(message_id)
        if watch is None:
            return
        watch.hold_back(
            sum(
                1
                for m, position in self._in_flight_messages.values()
                if m == message_id and position not in watch.attempted
            )
        )

    def _finished(self, copy_id: int, message_id: str, _task: asyncio.Task[None]) -> None:
        self.release_body(message_id)
        self._in_flight.pop(copy_id, None)
        self._in_flight_messages.pop(copy_id, None)
        if self._more_due:
            self._wake.set()  # a connection is free for a copy that is waiting in the spool

    def _log_daily_cap(self, now: float, recipients: int) -> None:
        if self._capped_logged or not self.limiter.daily_capped(now, recipients):
            return
        self._capped_logged = True
        per_day = self._config.upstream.rate_limit.per_day
        self.log.warning(
            "delivery.daily_cap_reached",
            per_day=per_day,
            resumes_in_hours=round(self.limiter.wait(now, recipients) / 3600, 1),
            hint="queued copies wait in the spool; they will take hours to drain",
        )

    async def _attempt(self, copy: SpooledCopy, body: bytes) -> None:
        destination = self._destinations.get(copy.upstream)
        outgoing = OutgoingCopy(copy.recipients, copy.kind, copy.headers, body)
        started = self._clock()
        try:
            async with self._gates.get(copy.message_id) or contextlib.nullcontext():
                outcome = await destination.send_copy(
                    copy.message_id, copy.position, copy.mail_from, outgoing, copy.smtputf8
                )
        except Exception as exc:
            try:
                failure = upstream_failure(exc, destination.label)
            except Exception:
                self.log.exception("delivery.internal_error", id=copy.message_id)
                failure = UpstreamFailure(Reply(451, "4.3.0", f"internal error in the relay: {exc!r}"))
            reply = failure.reply
            if failure.login_refused and copy.message_id not in self.watches:
                # A wrong password is the relay's problem, not the mail's: keep it until the login is fixed
                # (Postfix's smtp_sasl_auth_soft_bounce). A client still waiting in hybrid mode gets the 5xx.
                reply = Reply(454, "4.7.0", f"{reply.text} (the relay keeps the mail and tries again)")
            outcome = SendOutcome(refused=dict.fromkeys(copy.recipients, reply), reached_upstream=failure.answered)
        verdict, progress = await self._retirer.record_attempt(copy, outcome, self.pacer)
        self.log.info(
            "copy.attempted",
            id=copy.message_id,
            copy=copy.position,
            delivered=len(verdict.delivered),
            failed=len(verdict.failed),
            retry=len(verdict.retry),
            # Codes only: reply texts often quote the recipient's address, which the log must mask.
            reply=None if verdict.last_reply is None else f"{verdict.last_reply.code} {verdict.last_reply.enhanced}",
            ms=round((self._clock() - started) * 1000, 1),
        )
        watch = self.watches.get(copy.message_id)
        if watch is not None:
            watch.record(copy.position, verdict, progress)
            return
        if progress is Progress.SETTLED:
            await self._retirer.retire_settled(copy.message_id)

    async def stop(self, grace: float) -> None:
        """Stop taking copies from the spool; let sends in flight finish within grace seconds; leave the rest."""
        self.stopping = True
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
        in_flight = list(self._in_flight.values())
        if in_flight:
            _, unfinished = await asyncio.wait(in_flight, timeout=grace)
            cut_short = [copy_id for copy_id, task in self._in_flight.items() if task in unfinished]
            for task in unfinished:
                task.cancel()
            if unfinished:
                await asyncio.wait(unfinished)
            # Due again at once, for another relay sharing the spool (or this one's next start) to send,
            # rather than after their leases; they may have arrived: at least once.
            with contextlib.suppress(SpoolWriteError):
                for copy_id in cut_short:
                    await self._spool.release(copy_id, self._clock())
            self.log.info("delivery.stopped", finished=len(in_flight) - len(unfinished), left=len(unfinished))
