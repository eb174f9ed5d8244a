"""Attempts' results on the PostgreSQL spool, recorded together: while one statement is on its way, the
results that arrive wait for the next, which takes all of them (group commit, as Postfix's qmgr and any
busy queue on a database do). Under load a round trip, a plan's execution and a commit serve tens of
copies instead of one; alone, a result goes at once.

The statement only touches a copy while this relay's lease on it stands (owner and fencing counter):
a late result, after the lease ran out and another relay took the copy, is not recorded. It keeps the
failures, counts the sends for upstream.rate_limit, counts each message's copies down (once per
message, however many of its copies are in the batch), keeps the history and the totals for /metrics.
A message whose copies are all delivered is deleted by the next statement, or by one of its own
after PURGE_DELAY when none follows: its recipient list goes within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from relay.core.replies import Reply
from relay.spool.history import shown_after
from relay.spool.interface import DELIVERY_SECONDS_BUCKETS, CopyResult, CopyState, Progress
from relay.spool.postgres_database import Connection, Database
from relay.spool.postgres_history import COUNTER_UPSERT, GAUGES

# Results per statement: enough that a busy relay's results fit in one, small enough to stay quick.
BATCH = 200
# Seconds a delivered message waits for the next statement to delete it before one goes for it alone.
PURGE_DELAY = 1.0

_RESULTS = (  # constants only, as every statement with COUNTER_UPSERT
    "WITH r AS (SELECT * FROM unnest($2::bigint[], $3::bigint[], $4::boolean[], $5::float8[], $6::integer[],"  # noqa: S608
    " $7::text[], $8::float8[], $9::integer[], $10::text[], $11::text[], $12::text[], $13::integer[],"
    " $14::integer[], $15::text[], $16::text[], $17::float8[], $18::float8[], $19::boolean[], $20::boolean[])"
    " AS r(id, fence, retry, sent_at, sends, recipients, next_attempt, last_code, last_enhanced, last_text,"
    " state, counts, shown_code, shown_enhanced, shown_text, shown_next, up, delivered, failed)),"
    # A last result forgets the copy; a retry puts it back with the recipients left.
    " forgotten AS (DELETE FROM copies c USING r WHERE c.id = r.id AND NOT r.retry"
    " AND c.lease_owner = $1 AND c.fence = r.fence RETURNING c.id, c.message_id, c.headers, c.position),"
    " kept AS (UPDATE copies c SET state = $26, recipients = string_to_array(r.recipients, E'\\n'),"
    " next_attempt = r.next_attempt, last_code = r.last_code, last_enhanced = r.last_enhanced,"
    " last_text = r.last_text, attempts = c.attempts + r.counts, lease_owner = NULL"
    " FROM r WHERE c.id = r.id AND r.retry AND c.lease_owner = $1 AND c.fence = r.fence"
    " RETURNING c.id, c.message_id, c.headers, c.position),"
    " done AS (SELECT copy.message_id, copy.headers, copy.position, r.*"
    " FROM (SELECT * FROM forgotten UNION ALL SELECT * FROM kept) AS copy JOIN r ON r.id = copy.id),"
    # Sends older than a day go: as far back as rate limits look.
    " expired AS (DELETE FROM sends WHERE sent_at < (SELECT max(sent_at) FROM r) - 86400),"
    " sent AS (INSERT INTO sends (sent_at, recipients) SELECT sent_at, sends FROM done WHERE sends > 0),"
    " failures AS (INSERT INTO failures (message_id, recipient, code, enhanced, text, headers)"
    " SELECT done.message_id, f.recipient, f.code, f.enhanced, f.text, done.headers"
    " FROM unnest($21::bigint[], $22::text[], $23::integer[], $24::text[], $25::text[])"
    " AS f(copy_id, recipient, code, enhanced, text) JOIN done ON done.id = f.copy_id),"
    # Each message once: its copies in this batch counted down together (a row is updated once a statement).
    " message AS (UPDATE messages m SET copies_left = m.copies_left - d.finished, failed = m.failed OR d.failed"
    " FROM (SELECT message_id, count(*) FILTER (WHERE NOT retry) AS finished, bool_or(failed) AS failed"
    " FROM done GROUP BY message_id) AS d WHERE m.id = d.message_id"
    " RETURNING m.id, m.copies_left, m.failed, m.received_at, m.upstream),"
    # Messages an earlier statement found delivered, which no copy refers to any more.
    " purged AS (DELETE FROM messages WHERE id = ANY($29::text[]) AND copies_left = 0 AND NOT failed),"
    " shown AS (UPDATE history_copies h SET state = done.state, attempts = h.attempts + done.counts,"
    " last_code = done.shown_code, last_enhanced = done.shown_enhanced, last_text = done.shown_text,"
    " next_attempt = done.shown_next FROM done WHERE h.message_id = done.message_id AND h.position = done.position),"
    " counted AS (INSERT INTO counters (name, label, shard, value, at)"
    " SELECT c.name, c.label, pg_backend_pid(),"
    " CASE WHEN c.name = ANY($30::text[]) THEN (array_agg(c.value ORDER BY done.sent_at DESC))[1]"
    " ELSE sum(c.value) END,"
    " max(done.sent_at) FROM done JOIN message ON message.id = done.message_id,"
    " LATERAL (SELECT greatest(0, done.sent_at - message.received_at) AS seconds,"
    " coalesce(message.upstream, 'default') AS upstream) AS m,"
    " LATERAL (VALUES ('copies_total', done.state, 1.0::float8, done.counts > 0),"
    " ('upstream_up', m.upstream, done.up, done.counts > 0),"
    " ('upstream_last_delivery', m.upstream, done.sent_at, done.delivered),"
    " ('delivery_seconds_bucket', coalesce((SELECT b.label FROM unnest($27::float8[], $28::text[]) AS b(bound, label)"
    " WHERE m.seconds <= b.bound ORDER BY b.bound LIMIT 1), '+Inf'), 1.0, done.delivered),"
    " ('delivery_seconds_count', '', 1.0, done.delivered), ('delivery_seconds_sum', '', m.seconds, done.delivered))"
    " AS c(name, label, value, wanted)"
    " WHERE c.wanted GROUP BY c.name, c.label" + COUNTER_UPSERT + ")"
    " SELECT done.id, done.message_id, message.copies_left, message.failed"
    " FROM done JOIN message ON message.id = done.message_id"
)
_PURGE = "DELETE FROM messages WHERE id = ANY($1::text[]) AND copies_left = 0 AND NOT failed"


@dataclass(slots=True)
class _Pending:
    result: CopyResult
    fence: int | None
    counted: bool  # take_sends() counted its send already
    outcome: asyncio.Future[Progress] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class ResultRecorder:
    """record() for PostgresSpool: one statement for the results that are waiting, one at a time."""

    def __init__(self, db: Database, owner: str) -> None:
        self._db = db
        self._owner = owner
        self._waiting: list[_Pending] = []
        # Delivered messages for the next statement to delete, or the recorder after PURGE_DELAY.
        self._purge: list[str] = []
        self._arrived = asyncio.Event()
        self._closing = False
        self._recording: asyncio.Task[None] | None = None
        self.log = structlog.get_logger("relay")

    async def record(self, result: CopyResult, fence: int | None, counted: bool) -> Progress:
        pending = _Pending(result, fence, counted)
        self._waiting.append(pending)
        self._arrived.set()
        if self._recording is None or self._recording.done():
            self._recording = asyncio.get_running_loop().create_task(self._record_waiting())
        return await pending.outcome

    async def _record_waiting(self) -> None:
        while self._waiting or self._purge:
            if not self._waiting and not self._closing:
                # Delivered messages ride on the next results' statement if one comes soon.
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), PURGE_DELAY)
            batch, self._waiting = self._waiting[:BATCH], self._waiting[BATCH:]
            purge, self._purge = self._purge, []
            try:
                if batch:
                    rows = await self._db.statements(
                        functools.partial(_record, owner=self._owner, batch=batch, purge=purge)
                    )
                elif purge:
                    await self._db.statements(functools.partial(_delete_delivered, purge=purge))
            except asyncio.CancelledError:
                self._purge.extend(purge)
                for pending in batch:
                    pending.outcome.cancel()
                raise
            except Exception as exc:
                # Left for a later statement; found settled by retire_settled() if this relay stops first.
                self._purge.extend(purge)
                for pending in batch:
                    if not pending.outcome.done():
                        pending.outcome.set_exception(exc)
                if not batch:
                    # Only deletions left while the database is away: the next result tries again.
                    return
                continue
            if batch:
                self._settle(batch, rows)

    def _settle(self, batch: Sequence[_Pending], rows: Sequence[tuple[int, str, int, bool]]) -> None:
        recorded = {copy_id: (message_id, left, failed) for copy_id, message_id, left, failed in rows}
        # Of a message's copies in one batch, the last one tells where the message stands; the others
        # are still sending, so that a finished message is settled (bounced, or forgotten) once.
        last_of_message = {recorded[p.result.copy_id][0]: p for p in batch if p.result.copy_id in recorded}
        for pending in batch:
            found = recorded.get(pending.result.copy_id)
            progress = Progress.SENDING
            if found is None:
                # Deleted with `queue delete`, or our lease ran out and another relay claimed the copy:
                # its result, not this late one, stands.
                self.log.warning("spool.result_not_recorded", copy=pending.result.copy_id, owner=self._owner)
            elif found[1] == 0 and last_of_message[found[0]] is pending:
                message_id, _, failed = found
                progress = Progress.SETTLED if failed else Progress.DELIVERED
                if not failed:
                    self._purge.append(message_id)
            if not pending.outcome.done():
                pending.outcome.set_result(progress)

    async def close(self) -> None:
        """Record the results on their way, and delete the delivered messages still to delete."""
        self._closing = True
        if self._recording is not None and not self._recording.done():
            self._arrived.set()
            with contextlib.suppress(Exception):
                await self._recording
        if self._purge:  # left by a statement that failed; else the next start's retire_settled() finds them
            purge, self._purge = self._purge, []
            with contextlib.suppress(Exception):
                await self._db.statements(functools.partial(_delete_delivered, purge=purge))


async def _delete_delivered(connection: Connection, purge: list[str]) -> None:
    await connection.execute(_PURGE, purge)


async def _record(
    connection: Connection, owner: str, batch: Sequence[_Pending], purge: list[str]
) -> list[tuple[int, str, int, bool]]:
    results = [pending.result for pending in batch]
    shown = [shown_after(result) for result in results]
    failures = [(result.copy_id, recipient, reply) for result in results for recipient, reply in result.failed]
    rows = await connection.fetch(
        _RESULTS,
        owner,
        [result.copy_id for result in results],
        [pending.fence for pending in batch],
        [bool(result.retry) for result in results],
        [result.sent_at for result in results],
        [0 if pending.counted else len(pending.result.delivered) for pending in batch],
        # Recipients are never empty and hold no line break (SMTP forbids both): one text each here.
        ["\n".join(result.retry) for result in results],
        [result.next_attempt for result in results],
        *_reply_columns([result.last_reply if result.retry else None for result in results]),
        [state for state, _ in shown],
        [int(result.counts_as_attempt) for result in results],
        *_reply_columns([reply for _, reply in shown]),
        [result.next_attempt if result.retry else None for result in results],
        [float(result.reached_upstream) for result in results],
        [bool(result.delivered) for result in results],
        [bool(result.failed) for result in results],
        [copy_id for copy_id, _, _ in failures],
        [recipient for _, recipient, _ in failures],
        *_reply_columns([reply for _, _, reply in failures]),
        CopyState.QUEUED,
        list(DELIVERY_SECONDS_BUCKETS),
        # The labels /metrics reads back, as SQLite's spool writes them.
        [repr(bound) for bound in DELIVERY_SECONDS_BUCKETS],
        purge,
        list(GAUGES),
    )
    return [(row["id"], row["message_id"], row["copies_left"], row["failed"]) for row in rows]


def _reply_columns(replies: Sequence[Reply | None]) -> tuple[list[int | None], list[str | None], list[str | None]]:
    return (
        [None if reply is None else reply.code for reply in replies],
        [None if reply is None else reply.enhanced for reply in replies],
        [None if reply is None else reply.text for reply in replies],
    )
