"""Delivery: where each copy goes, when it is sent again, and what the client is told about it.

The listener hands a finished, checked list of copies to a Delivery. Modes (delivery.mode):
- direct (DirectDelivery): the client's DATA gets 250 only once the destination took every copy.
- hybrid and queue (SpooledDelivery): the message and its copy plan are committed to the spool first; hybrid
  then tries the upstream for up to delivery.sync_timeout while the client waits, queue answers at once.
  A scheduler sends due copies, retries temporary failures with backoff until delivery.max_age, keeps to
  the rate limits, slows down when the upstream throttles, and bounces permanent failures to the sender.
The destination of a message is chosen in one place, destination_for(), so per-sender upstreams slot in there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import random
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Protocol

import aiosmtplib
import structlog

from relay.bounce import FailedRecipient, build_dsn, write_failed
from relay.config import Config, RouteConfig
from relay.forwarder import SendOutcome, UpstreamPool, UpstreamReply
from relay.oauth import OAuth2Error
from relay.outbox import Outbox
from relay.pacing import Pacer, RateLimiter, is_throttling, retry_delay
from relay.rewrite import OutgoingCopy
from relay.routing import route_for
from relay.spool import (
    CopyResult,
    NewCopy,
    NewMessage,
    Progress,
    SettledMessage,
    Spool,
    SpooledCopy,
    SpoolWriteError,
    new_queue_id,
)

# How often an idle scheduler looks at the spool, so `privacy-relay queue retry` takes effect soon.
POLL_INTERVAL = 2.0


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
    """An upstream pool; a copy with more recipients than the provider takes goes as several transactions."""

    def __init__(self, pool: UpstreamPool, max_recipients_per_message: int) -> None:
        self._pool = pool
        self._max_recipients = max_recipients_per_message

    @property
    def label(self) -> str:
        return f"upstream {self._pool.label}"

    async def send_copy(
        self, queue_id: str, index: int, mail_from: str, copy: OutgoingCopy, smtputf8: bool
    ) -> SendOutcome:
        if len(copy.recipients) <= self._max_recipients:
            return await self._pool.send(mail_from, copy, smtputf8)
        outcome = SendOutcome()
        for start in range(0, len(copy.recipients), self._max_recipients):
            chunk = copy.recipients[start : start + self._max_recipients]
            try:
                part = await self._pool.send(mail_from, dataclasses.replace(copy, recipients=chunk), smtputf8)
            except Exception as exc:
                if start == 0:
                    raise
                # Earlier transactions went through: only this one's recipients are left to retry.
                outcome.refused.update(dict.fromkeys(chunk, reply_for_exception(exc, self.label)))
                continue
            outcome.accepted.extend(part.accepted)
            outcome.refused.update(part.refused)
        return outcome

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
    if isinstance(exc, OAuth2Error):
        # Temporary: mail waits (the client retries) while someone signs in again.
        return UpstreamReply(454, "4.7.0", f"OAuth2 login to {where} failed: {exc}")
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code >= 400:
        return UpstreamReply.parse(exc.code, f"{where}: {exc.message}")
    if isinstance(exc, ssl.SSLError) or "CERTIFICATE" in str(exc).upper():
        return UpstreamReply(451, "4.7.5", f"TLS with {where} failed: {exc}; try again later")
    if isinstance(exc, aiosmtplib.SMTPException | OSError | asyncio.TimeoutError):
        detail = str(exc) or type(exc).__name__
        return UpstreamReply(451, "4.4.1", f"cannot reach {where} ({detail}); try again later")
    raise exc


def _copies(count: int) -> str:
    return f"{count} cop{'y' if count == 1 else 'ies'}"


@dataclass(slots=True)
class DeliveryReport:
    destination: str
    copies: int
    delivered_recipients: int = 0
    failures: dict[str, UpstreamReply] = field(default_factory=dict)
    # Spooled modes: copies left in the spool for later, and failed recipients the sender hears of by a DSN.
    queued: int = 0
    bounced: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures

    def client_reply(self, queue_id: str) -> str:
        if self.queued or self.bounced:
            parts = []
            if self.queued:
                parts.append(f"{self.queued} of {_copies(self.copies)} will be sent from the queue")
            if self.bounced:
                parts.append(f"{self.bounced} recipient(s) refused; a delivery report goes to the sender")
            return f"250 2.0.0 OK: queued as {queue_id} ({'; '.join(parts)})"
        if not self.failures:
            return f"250 2.0.0 OK: relayed as {_copies(self.copies)} (id {queue_id})"
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

    def __init__(
        self,
        default: Destination,
        concurrency: int,
        named: Mapping[str, Destination] | None = None,
        routes: Sequence[RouteConfig] = (),
    ) -> None:
        self._default = default
        self._concurrency = concurrency
        self._named = dict(named or {})
        self._routes = tuple(routes)

    def reconfigure(
        self, config: Config, destination: Destination, named: Mapping[str, Destination] | None = None
    ) -> None:
        old = [self._default, *self._named.values()]
        self._default, self._named, self._routes = destination, dict(named or {}), config.routes
        self._concurrency = config.upstream.max_connections
        for replaced in old:
            _close_later(replaced)

    def destination_for(self, mail_from: str) -> Destination:
        name = route_for(mail_from, self._routes)
        return self._default if name is None else self._named[name]

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

    async def stop(self, grace: float) -> None:
        await self._default.close()
        for destination in self._named.values():
            await destination.close()


_background: set[asyncio.Task[None]] = set()


def _close_later(destination: Destination, wait_for: Sequence[asyncio.Task[None]] = ()) -> None:
    """Close a replaced destination once the sends still using it are over."""

    async def close() -> None:
        if wait_for:
            await asyncio.wait(wait_for)
        await destination.close()

    task = asyncio.get_running_loop().create_task(close())
    _background.add(task)
    task.add_done_callback(_background.discard)


def _claimed_copy(message: NewMessage, position: int, copy_id: int) -> SpooledCopy:
    copy = message.copies[position]
    return SpooledCopy(
        id=copy_id,
        message_id=message.id,
        position=position,
        kind=copy.kind,
        recipients=copy.recipients,
        headers=copy.headers,
        body=message.body,
        mail_from=message.mail_from,
        smtputf8=message.smtputf8,
        upstream=message.upstream,
        received_at=message.received_at,
        attempts=0,
    )


def _reply_text(reply: UpstreamReply) -> str:
    return f"{reply.code} {reply.enhanced} {reply.text}"


@dataclass(slots=True)
class _Watch:
    """What the client of a hybrid-mode message waits for: the first attempt of each copy."""

    copies: int
    # The copies the client waits for: all of them, until a rate limit holds the rest back.
    expected: int = 0
    attempted: set[int] = field(default_factory=set)
    delivered: int = 0
    failed: dict[str, UpstreamReply] = field(default_factory=dict)
    deferred: int = 0
    settled: bool = False
    # Every copy delivered: the spool has already forgotten the message, nothing is left to retire.
    forgotten: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


async def recover_spool(spool: Spool) -> int:
    """Requeue the copies a stopped or killed relay was sending; they may have arrived: at least once."""
    in_flight = await spool.recover()
    if in_flight:
        structlog.get_logger("relay").warning("spool.recovered", in_flight=in_flight)
    return in_flight


class SpooledDelivery:
    """hybrid and queue modes: the spool first, then a scheduler that sends, retries and bounces."""

    def __init__(
        self,
        spool: Spool,
        destination: Destination,
        config: Config,
        hostname: str,
        clock: Callable[[], float] = time.time,
        named: Mapping[str, Destination] | None = None,
    ) -> None:
        self._spool = spool
        self._destination = destination
        self._named = dict(named or {})
        self._config = config
        self._hostname = hostname
        self._clock = clock
        self._rng = random.Random()  # noqa: S311 (jitter, not a secret)
        self._limiter = RateLimiter(config.upstream.rate_limit.per_minute, config.upstream.rate_limit.per_day)
        self._pacer = Pacer()
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        self._in_flight_messages: dict[int, tuple[str, int]] = {}
        self._watches: dict[str, _Watch] = {}
        self._bodies: dict[str, tuple[bytes, int]] = {}  # message id -> (body, copies using it)
        # Started from memory, a message's copies take at most max_connections upstream connections at
        # a time, so that a 200-copy newsletter leaves room for a colleague's message (DirectDelivery too).
        self._gates: dict[str, asyncio.Semaphore] = {}
        self._wake = asyncio.Event()
        # The scheduler last stopped short (no free connection, or a full batch): more may be due.
        self._more_due = False
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._capped_logged = False
        self._retire_pending = False
        self.log = structlog.get_logger("relay")

    def destination_for(self, upstream: str | None) -> Destination:
        """The upstream the message's route chose when it arrived; one a reload removed falls back to the default."""
        if upstream is None:
            return self._destination
        return self._named.get(upstream, self._destination)

    @property
    def _failed_folder(self) -> Path:
        return self._config.outbox / "failed"

    async def start(self, recover: bool = True) -> None:
        """Pick up where the last run stopped: resend what was in flight, finish settled messages.

        recover=False is for worker processes: the supervisor recovered the shared spool before forking,
        and a worker must not requeue copies that another worker is sending.
        """
        if recover:
            await recover_spool(self._spool)
        now = self._clock()
        for sent_at, recipients in await self._spool.recent_sends(now - 86_400):
            self._limiter.record(sent_at, recipients)
        await self._retire_settled(None)
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def reconfigure(
        self, config: Config, destination: Destination, named: Mapping[str, Destination] | None = None
    ) -> None:
        old = [self._destination, *self._named.values()]
        self._config = config
        self._destination = destination
        self._named = dict(named or {})
        self._limiter.configure(config.upstream.rate_limit.per_minute, config.upstream.rate_limit.per_day)
        self._pacer = Pacer()
        for replaced in old:
            _close_later(replaced, list(self._in_flight.values()))
        self._wake.set()

    def wake(self) -> None:
        """Look at the spool now: another relay sharing it stored mail that is due."""
        self._wake.set()

    async def deliver(
        self, queue_id: str, mail_from: str, copies: Sequence[OutgoingCopy], smtputf8: bool
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
        starting = self._first_attempts_now(len(copies), now, hybrid)
        lease_until = now + self._config.spool.lease
        message = NewMessage(
            id=queue_id,
            mail_from=mail_from,
            smtputf8=smtputf8,
            body=body,
            copies=tuple(
                NewCopy(c.recipients, c.kind, c.headers, lease_until if position < starting else 0.0)
                for position, c in enumerate(copies)
            ),
            received_at=now,
            upstream=upstream,
        )
        watch = _Watch(len(copies), expected=len(copies))
        if hybrid:
            self._watches[queue_id] = watch
            # The first copies go out with the body already in memory, not read back from the spool.
            self._hold_body(queue_id, body)

        def start_first_attempts(copy_ids: tuple[int, ...]) -> None:
            # Stored as claimed, so no scheduler (of this process or another worker) takes them too; if the
            # relay stops before they go, the next start's recovery makes them due again. They start while
            # the commit is being fsynced: the client hears 250 only once it is on disk, and if that fails
            # (451) the copies may have gone already: the client's resend repeats them, nothing is lost.
            if not self._stopping:
                if starting > 1:
                    self._gates[queue_id] = asyncio.Semaphore(self._config.upstream.max_connections)
                for position in range(starting):
                    self._launch(_claimed_copy(message, position, copy_ids[position]), now)

        try:
            try:
                await self._spool.store(message, start_first_attempts if starting else None)
            except BaseException:
                self._watches.pop(queue_id, None)
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
                self._watches.pop(queue_id, None)
        finally:
            if hybrid:
                self._drop_body(queue_id)
        return await self._hybrid_report(queue_id, watch, report)

    def _first_attempts_now(self, copies: int, now: float, hybrid: bool) -> int:
        """How many copies of a new message start at once from memory, skipping a claim through the spool.

        Rate limits and throttling leave the pacing to the scheduler. In queue mode only free connections
        start at once, so a burst does not hold every queued body in memory; a hybrid client holds its
        body while it waits anyway.
        """
        if self._stopping or self._limiter.allowance(now) is not None or self._pacer.interval > 0:
            return 0
        if hybrid:
            return copies
        return max(0, min(copies, self._free_connections))

    @property
    def _free_connections(self) -> int:
        """Upstream connections not taken by a copy being sent (negative while hybrid first attempts queue)."""
        return self._config.upstream.max_connections - len(self._in_flight)

    def _launch(self, copy: SpooledCopy, now: float) -> None:
        """Start one attempt of a claimed copy."""
        self._limiter.record(now, len(copy.recipients))
        self._pacer.started(now)
        self._hold_body(copy.message_id, copy.body)
        task = asyncio.get_running_loop().create_task(self._attempt(copy))
        self._in_flight[copy.id] = task
        self._in_flight_messages[copy.id] = (copy.message_id, copy.position)
        task.add_done_callback(functools.partial(self._finished, copy.id, copy.message_id))

    def _hold_body(self, message_id: str, body: bytes) -> None:
        """Keep a message's body in memory while copies of it are being sent: one object, shared by all."""
        held, users = self._bodies.get(message_id, (body, 0))
        self._bodies[message_id] = (held, users + 1)

    def _drop_body(self, message_id: str) -> None:
        held, users = self._bodies[message_id]
        if users <= 1:
            del self._bodies[message_id]
            self._gates.pop(message_id, None)
        else:
            self._bodies[message_id] = (held, users - 1)

    async def _hybrid_report(self, queue_id: str, watch: _Watch, report: DeliveryReport) -> DeliveryReport:
        report.delivered_recipients = watch.delivered
        if not watch.settled:
            report.queued = max(1, watch.copies - len(watch.attempted) + watch.deferred)
            return report
        if watch.failed and not watch.delivered:
            # Refused for good before the client got an answer: the client hears it now, not by a DSN.
            report.failures = watch.failed
            try:
                await self._spool.retire(queue_id, None)
            except SpoolWriteError as exc:
                # Left in the spool, it is bounced later: a second notice, but the client's reply stays true.
                self.log.error("spool.retire_failed", id=queue_id, error=exc.text)
                self._retire_pending = True
            return report
        report.bounced = len(watch.failed)
        if not watch.forgotten:
            await self._retire_settled(queue_id)
        return report

    async def _run(self) -> None:
        while not self._stopping:
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
        if self._retire_pending:
            self._retire_pending = False
            await self._retire_settled(None)
        now = self._clock()
        free = self._free_connections
        if free <= 0:
            self._more_due = True
            await self._sleep(POLL_INTERVAL)
            return
        allowance = self._limiter.allowance(now)
        wait = max(self._limiter.wait(now, 1), self._pacer.wait(now))
        if allowance == 0 or wait > 0:
            self._log_daily_cap(now, 1)
            for message_id in self._watches:
                self._stop_waiting_for_held_copies(message_id)
            if wait > POLL_INTERVAL:
                # So that `queue list` shows when the waiting copies will really go.
                await self._spool.postpone(now, now + wait)
            await self._sleep(wait)
            return
        limit = min(free, allowance) if allowance is not None else free
        if self._pacer.interval > 0:
            limit = 1
        known = {message_id: body for message_id, (body, _) in self._bodies.items()}
        batch = await self._spool.claim_due(now, limit, self._config.spool.lease, known)
        self._more_due = len(batch) >= limit
        if not batch:
            due = await self._spool.next_due()
            await self._sleep(POLL_INTERVAL if due is None else min(POLL_INTERVAL, due - now))
            return
        for copy in batch:
            if copy.id in self._in_flight:
                continue
            now = self._clock()
            wait = max(self._limiter.wait(now, len(copy.recipients)), self._pacer.wait(now))
            if wait > 0:
                self._log_daily_cap(now, len(copy.recipients))
                await self._spool.release(copy.id, now + wait)
                self._stop_waiting_for_held_copies(copy.message_id)
                continue
            self._capped_logged = False
            self._launch(copy, now)

    def _stop_waiting_for_held_copies(self, message_id: str) -> None:
        """A client waiting in hybrid mode hears about the copies in flight, not those a rate limit holds back."""
        watch = self._watches.get(message_id)
        if watch is None:
            return
        sending = sum(
            1
            for m, position in self._in_flight_messages.values()
            if m == message_id and position not in watch.attempted
        )
        watch.expected = min(watch.expected, len(watch.attempted) + sending)
        if len(watch.attempted) >= watch.expected:
            watch.done.set()

    def _finished(self, copy_id: int, message_id: str, _task: asyncio.Task[None]) -> None:
        self._drop_body(message_id)
        self._in_flight.pop(copy_id, None)
        self._in_flight_messages.pop(copy_id, None)
        if self._more_due:
            self._wake.set()  # a connection is free for a copy that is waiting in the spool

    def _log_daily_cap(self, now: float, recipients: int) -> None:
        if self._capped_logged or not self._limiter.daily_capped(now, recipients):
            return
        self._capped_logged = True
        per_day = self._config.upstream.rate_limit.per_day
        self.log.warning(
            "delivery.daily_cap_reached",
            per_day=per_day,
            resumes_in_hours=round(self._limiter.wait(now, recipients) / 3600, 1),
            hint="queued copies wait in the spool; they will take hours to drain",
        )

    async def _attempt(self, copy: SpooledCopy) -> None:
        destination = self.destination_for(copy.upstream)
        outgoing = OutgoingCopy(copy.recipients, copy.kind, copy.headers, copy.body)
        started = self._clock()
        try:
            async with self._gates.get(copy.message_id) or contextlib.nullcontext():
                outcome = await destination.send_copy(
                    copy.message_id, copy.position, copy.mail_from, outgoing, copy.smtputf8
                )
        except Exception as exc:
            try:
                reply = reply_for_exception(exc, destination.label)
            except Exception:
                self.log.exception("delivery.internal_error", id=copy.message_id)
                reply = UpstreamReply(451, "4.3.0", f"internal error in the relay: {exc!r}")
            if isinstance(exc, aiosmtplib.SMTPAuthenticationError) and copy.message_id not in self._watches:
                # A wrong password is the relay's problem, not the mail's: keep it until the login is fixed
                # (Postfix's smtp_sasl_auth_soft_bounce). A client still waiting in hybrid mode gets the 5xx.
                reply = UpstreamReply(454, "4.7.0", f"{reply.text} (the relay keeps the mail and tries again)")
            outcome = SendOutcome(refused=dict.fromkeys(copy.recipients, reply))
        result, watch_failed = self._result(copy, outcome, self._clock())
        progress = await self._record(result, copy.message_id)
        self.log.info(
            "copy.attempted",
            id=copy.message_id,
            copy=copy.position,
            delivered=len(result.delivered),
            failed=len(result.failed),
            retry=len(result.retry),
            # Codes only: reply texts often quote the recipient's address, which the log must mask.
            reply=" ".join((result.last_reply or "").split()[:2]) or None,
            ms=round((self._clock() - started) * 1000, 1),
        )
        watch = self._watches.get(copy.message_id)
        if watch is not None:
            if copy.position not in watch.attempted:
                watch.attempted.add(copy.position)
                watch.delivered += len(result.delivered)
                watch.failed.update(watch_failed)
                watch.deferred += int(bool(result.retry))
            # Once settled, a message stays settled: an earlier copy's result may be handled after a later one's.
            watch.settled = watch.settled or progress is not Progress.SENDING
            watch.forgotten = watch.forgotten or progress is Progress.DELIVERED
            if watch.settled or len(watch.attempted) >= watch.expected:
                watch.done.set()
            return
        if progress is Progress.SETTLED:
            await self._retire_settled(copy.message_id)

    async def _retire_settled(self, message_id: str | None) -> None:
        """Bounce and forget finished messages; if the spool or disk refuses, the scheduler tries again later."""
        try:
            for message in await self._spool.settled(message_id):
                await self._retire(message)
        except (SpoolWriteError, OSError) as exc:
            self.log.error("spool.retire_failed", id=message_id, error=str(exc))
            self._retire_pending = True

    async def _record(self, result: CopyResult, message_id: str) -> Progress:
        """Store an attempt's outcome, trying again while the spool can't be written (disk full)."""
        while True:
            try:
                return await self._spool.record(result)
            except SpoolWriteError as exc:
                # Sending the copy again would repeat it: keep the result and wait for the disk.
                self.log.error("spool.write_failed", id=message_id, error=exc.text)
                await asyncio.sleep(POLL_INTERVAL)

    def _result(
        self, copy: SpooledCopy, outcome: SendOutcome, now: float
    ) -> tuple[CopyResult, dict[str, UpstreamReply]]:
        delivery = self._config.delivery
        failed: dict[str, UpstreamReply] = {}
        retry: list[str] = []
        last: UpstreamReply | None = None
        for recipient in copy.recipients:
            if recipient in outcome.accepted:
                continue
            reply = outcome.refused.get(recipient) or UpstreamReply(451, "4.4.0", "no reply for this recipient")
            last = reply
            if reply.is_permanent:
                failed[recipient] = reply
            else:
                retry.append(recipient)
        throttled = last is not None and not last.is_permanent and is_throttling(last.code, last.enhanced, last.text)
        if throttled and last is not None:
            self._pacer.throttled(now)
            self.log.warning(
                "upstream.throttling", reply=f"{last.code} {last.enhanced}", pace_seconds=self._pacer.interval
            )
        elif outcome.accepted:
            self._pacer.succeeded()
        deadline = copy.received_at + delivery.max_age
        failures = [(recipient, _reply_text(reply)) for recipient, reply in failed.items()]
        if retry and now >= deadline:
            assert last is not None
            gave_up = f"{_reply_text(last)} (gave up after {delivery.max_age / 86400:g} days of retries)"
            failures += [(recipient, gave_up) for recipient in retry]
            retry = []
        next_attempt = 0.0
        if retry:
            delay = retry_delay(copy.attempts + 1, delivery.min_backoff, delivery.max_backoff, self._rng)
            next_attempt = min(now + max(delay, self._pacer.interval), deadline)
        result = CopyResult(
            copy_id=copy.id,
            delivered=tuple(r for r in copy.recipients if r in outcome.accepted),
            failed=tuple(failures),
            retry=tuple(retry),
            next_attempt=next_attempt,
            last_reply=None if last is None else _reply_text(last),
            sent_at=now,
        )
        return result, failed

    async def _retire(self, message: SettledMessage) -> None:
        """A message with nothing left to send: bounce its failures (or keep them as a file), then forget it."""
        replacement: NewMessage | None = None
        if message.failures:
            now = self._clock()
            dsn = build_dsn(
                sender=message.mail_from or "MAILER-DAEMON",
                queue_id=message.id,
                reporting_host=self._hostname,
                remote=self.destination_for(message.upstream).label,
                arrival_date=formatdate(message.received_at, localtime=True),
                date=formatdate(now, localtime=True),
                failures=[
                    # A failure with a temporary reply is one that was retried until delivery.max_age.
                    FailedRecipient(f.recipient, f.reply, expired=f.reply.startswith("4"))
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
                replacement = NewMessage(
                    id=new_queue_id(),
                    mail_from=message.mail_from,
                    smtputf8=not message.mail_from.isascii(),
                    body=dsn.body,
                    copies=(NewCopy((message.mail_from,), "bounce", dsn.headers),),
                    received_at=now,
                    upstream=message.upstream,
                    is_bounce=True,
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

    async def stop(self, grace: float) -> None:
        """Stop taking copies from the spool; let sends in flight finish within grace seconds; leave the rest."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
        in_flight = list(self._in_flight.values())
        if in_flight:
            _, unfinished = await asyncio.wait(in_flight, timeout=grace)
            for task in unfinished:
                task.cancel()
            if unfinished:
                await asyncio.wait(unfinished)
            self.log.info("delivery.stopped", finished=len(in_flight) - len(unfinished), left=len(unfinished))
        await self._destination.close()
        for destination in self._named.values():
            await destination.close()
        await self._spool.close()
