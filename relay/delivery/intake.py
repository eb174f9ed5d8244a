"""hybrid and queue modes: a new message is stored, its first attempts start, and the client hears the outcome.

The listener hands a finished, checked list of copies to a delivery (delivery.mode):
- direct (relay/delivery/direct.py): the client's DATA gets 250 only once the destination took every copy.
- hybrid and queue (SpooledDelivery, here): the message and its copy plan are committed to the spool first;
  hybrid then tries the upstream for up to delivery.sync_timeout while the client waits, queue answers at once.
  The scheduler (scheduler.py) sends due copies within the rate limits and the upstream's pace; retire.py
  records each attempt, retries temporary failures with backoff until delivery.max_age, and bounces the rest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence

import structlog

from relay.config.models import Config
from relay.core.activity import MessageRecord
from relay.core.rewrite import OutgoingCopy
from relay.core.routing import route_for
from relay.delivery.destinations import Destination, Destinations
from relay.delivery.report import DeliveryReport
from relay.delivery.retire import Retirer
from relay.delivery.scheduler import Scheduler
from relay.delivery.watch import Watch
from relay.spool.interface import NewMessage, SchedulerSpool

_DAY = 86_400.0


async def recover_spool(spool: SchedulerSpool) -> int:
    """Requeue the copies a stopped or killed relay was sending; they may have arrived: at least once."""
    in_flight = await spool.recover()
    if in_flight:
        structlog.get_logger("relay").warning("spool.recovered", in_flight=in_flight)
    return in_flight


class SpooledDelivery:
    """hybrid and queue modes: the spool first, then a scheduler that sends, retries and bounces."""

    def __init__(
        self,
        spool: SchedulerSpool,
        destination: Destination,
        config: Config,
        hostname: str,
        clock: Callable[[], float] = time.time,
        named: Mapping[str, Destination] | None = None,
    ) -> None:
        self._spool = spool
        self._config = config
        self._clock = clock
        self._destinations = Destinations(destination, named)
        wake = asyncio.Event()
        self._wake = wake
        self._retirer = Retirer(spool, config, hostname, clock, self._destinations, wake)
        self._scheduler = Scheduler(spool, self._destinations, config, clock, self._retirer, wake)

    def wake(self) -> None:
        """Look at the spool now: another relay sharing it stored mail that is due."""
        self._wake.set()

    def destination_for(self, upstream: str | None) -> Destination:
        """The upstream the message's route chose when it arrived; one a reload removed falls back to the default."""
        return self._destinations.get(upstream)

    async def start(self, recover: bool = True) -> None:
        """Pick up where the last run stopped: resend what was in flight, finish settled messages.

        recover=False is for worker processes: the supervisor recovered the shared spool before forking,
        and a worker must not requeue copies that another worker is sending.
        """
        if recover:
            await recover_spool(self._spool)
        now = self._clock()
        for sent_at, recipients in await self._spool.recent_sends(now - _DAY):
            self._scheduler.limiter.record(sent_at, recipients)
        await self._retirer.retire_settled(None)
        self._scheduler.start()

    def reconfigure(
        self, config: Config, destination: Destination, named: Mapping[str, Destination] | None = None
    ) -> None:
        self._config = config
        self._destinations.replace(destination, named, self._scheduler.sends_in_flight)
        self._retirer.reconfigure(config)
        self._scheduler.reconfigure(config)

    async def deliver(
        self,
        queue_id: str,
        mail_from: str,
        copies: Sequence[OutgoingCopy],
        smtputf8: bool,
        record: MessageRecord | None = None,
    ) -> DeliveryReport:
        # Decided once, here, and kept with the message: a retry leaves through the same account.
        upstream = route_for(mail_from, self._config.routes)
        report = DeliveryReport(self.destination_for(upstream).label, len(copies))
        if not copies:
            return report
        body = copies[0].body
        if any(copy.body != body for copy in copies):
            raise ValueError("the copies of one message must share its body")
        hybrid = self._config.delivery.mode == "hybrid"
        now = self._clock()
        starting = self._scheduler.first_attempts_now(len(copies), now, hybrid)
        message = NewMessage(
            id=queue_id,
            mail_from=mail_from,
            smtputf8=smtputf8,
            body=body,
            copies=tuple(copies),
            received_at=now,
            upstream=upstream,
            claimed=starting,
            claimed_until=now + self._config.spool.lease if starting else 0.0,
            record=record,
        )
        watch = Watch(len(copies), expected=len(copies))
        if hybrid:
            self._scheduler.watches[queue_id] = watch
            # The first copies go out with the body already in memory, not read back from the spool.
            self._scheduler.bodies.hold(queue_id, body)

        def start_first_attempts(copy_ids: tuple[int, ...]) -> None:
            # Stored as claimed, so no scheduler (of this process or another worker) takes them too; if the
            # relay stops before they go, the next start's recovery makes them due again. They start while
            # the commit is being fsynced: the client hears 250 only once it is on disk, and if that fails
            # (451) the copies may have gone already: the client's resend repeats them, nothing is lost.
            self._scheduler.launch_first_attempts(message, copy_ids, now)

        try:
            try:
                await self._spool.store(message, start_first_attempts if starting else None)
            except BaseException:
                self._scheduler.watches.pop(queue_id, None)
                raise
            if starting < len(copies):
                self._wake.set()
            if not hybrid:
                report.queued = len(copies)
                return report
            try:
                async with asyncio.timeout(self._config.delivery.sync_timeout):
                    await watch.done.wait()
            except TimeoutError:
                pass
            finally:
                self._scheduler.watches.pop(queue_id, None)
        finally:
            if hybrid:
                self._scheduler.release_body(queue_id)
        return await self._hybrid_report(queue_id, watch, report)

    async def _hybrid_report(self, queue_id: str, watch: Watch, report: DeliveryReport) -> DeliveryReport:
        report.delivered_recipients = watch.delivered
        if not watch.settled:
            report.queued = max(1, watch.copies - len(watch.attempted) + watch.deferred)
            return report
        if watch.failed and not watch.delivered:
            # Refused for good before the client got an answer: the client hears it now, not by a DSN.
            report.failures = watch.failed
            await self._retirer.forget(queue_id)
            return report
        report.bounced = len(watch.failed)
        if not watch.forgotten:
            await self._retirer.retire_settled(queue_id)
        return report

    async def stop(self, grace: float) -> None:
        """Stop taking copies from the spool; let sends in flight finish within grace seconds; leave the rest."""
        await self._scheduler.stop(grace)
        await self._destinations.close()
        await self._spool.close()
