"""The Spool in a PostgreSQL database that any number of relays share (spool.url).

The same tables as the SQLite spool: one body per message, one row per copy. What sharing adds:
- A relay sending a copy holds a lease on it: its owner name, a fencing counter raised at every claim,
  and next_attempt as the lease's end. Claims take due rows with FOR UPDATE SKIP LOCKED, so two relays
  never claim one copy; a relay whose lease ran out and was taken over cannot record its late result over
  the new owner's (the counter no longer matches). A dead relay's copies go again once their leases end,
  or at once when a relay starts on the same machine (relay/spool/leases.py); nobody unlocks anything
  by hand.
- New mail is announced with NOTIFY, so idle relays start at once; they also poll, as a backstop.
- A message is acknowledged (250) only once it is committed (relay/spool/postgres_database.py says
  how durably). A message, its copies and its history are one statement; the results of attempts are
  recorded together, one statement for all that are waiting (relay/spool/postgres_results.py): round
  trips and commits are what a shared spool costs.
- upstream.rate_limit is one count in the database for every relay (take_sends).
- The console's history, held messages and totals (relay/spool/postgres_history.py) are written in the
  statements that store a message and record each attempt: every relay's console shows all relays' mail.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TypeVar

import asyncpg
import structlog

from relay.core.pacing import RateLimiter
from relay.core.policy import CopyKind
from relay.core.replies import Reply
from relay.spool.interface import (
    CopyResult,
    CopyState,
    CopySummary,
    Failure,
    MessageSummary,
    NewMessage,
    Progress,
    SettledMessage,
    SpooledCopy,
)
from relay.spool.leases import host_of, is_gone, new_owner
from relay.spool.postgres_database import NEW_MAIL_CHANNEL, Connection, Database
from relay.spool.postgres_history import (
    STORE_HISTORY,
    PostgresConsoleQueries,
    fold_counters,
    history_parameters,
    mark_discarded,
)
from relay.spool.postgres_results import ResultRecorder

_T = TypeVar("_T")

SENDS_LOCK = 0x70726977  # pg_advisory_xact_lock key: relays taking sends within upstream.rate_limit take turns
# store(): the message and its copies ($1 to $16), the channel to NOTIFY or NULL ($17), and with STORE_HISTORY ($18 on)
# its history. The copies go in claimed (by this relay, fence 1) or queued, as the listener asks.
_STORE_MESSAGE = (
    "WITH message AS (INSERT INTO messages (id, mail_from, smtputf8, upstream, is_bounce, received_at, body,"
    " copies_left) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id),"
    " copy AS (INSERT INTO copies (message_id, position, kind, recipients, headers, state, next_attempt, lease_owner,"
    " fence) SELECT message.id, c.position, c.kind, string_to_array(c.recipients, E'\\n'), c.headers, c.state,"
    " c.next_attempt, c.owner, c.fence FROM message, unnest($9::integer[], $10::text[], $11::text[], $12::bytea[],"
    " $13::text[], $14::float8[], $15::text[], $16::bigint[])"
    " AS c(position, kind, recipients, headers, state, next_attempt, owner, fence)"
    " RETURNING id, position),"
)
_STORE_RESULT = (
    " woken AS (SELECT CASE WHEN $17::text IS NOT NULL THEN pg_notify($17, '') END)"
    " SELECT id, position FROM copy, woken"
)
_STORE = _STORE_MESSAGE + _STORE_RESULT
_STORE_WITH_HISTORY = _STORE_MESSAGE + STORE_HISTORY + _STORE_RESULT
# claim_due(): due copies ($1 now, $2 at most) leased to this relay ($3 sending, $4 the lease's end, $5 owner),
# shown as being sent in the history. SKIP LOCKED: relays claiming at the same moment take different copies
# instead of waiting.
_CLAIM = (
    "WITH due AS (SELECT id FROM copies WHERE next_attempt <= $1 ORDER BY next_attempt, id LIMIT $2"
    " FOR UPDATE SKIP LOCKED),"
    " claimed AS (UPDATE copies c SET state = $3, next_attempt = $4, lease_owner = $5, fence = c.fence + 1"
    " FROM due, messages m WHERE c.id = due.id AND m.id = c.message_id"
    " RETURNING c.id, c.message_id, c.position, c.kind, c.recipients, c.headers, c.attempts, c.fence,"
    " m.mail_from, m.smtputf8, m.upstream, m.received_at),"
    " shown AS (UPDATE history_copies h SET state = $3 FROM claimed"
    " WHERE h.message_id = claimed.message_id AND h.position = claimed.position)"
    " SELECT * FROM claimed"
)


class PostgresSpool(PostgresConsoleQueries):
    """The Spool on PostgreSQL; open() connects, creates or migrates the schema, and starts listening."""

    def __init__(self, url: str, password: str | None = None) -> None:
        self._db = Database(url, password)
        # This process's name in lease_owner: a restarted relay is a new owner (leases.py says when it may
        # take over the old one's copies before their leases end).
        self.owner = new_owner()
        # The fencing counter of each copy this process holds, as its claim set it.
        self._fences: dict[int, int] = {}
        # Copies whose send take_sends() counted already: their result does not count it again.
        self._counted: set[int] = set()
        self._results = ResultRecorder(self._db, self.owner)
        self.log = structlog.get_logger("relay")

    @property
    def label(self) -> str:
        # Without the query (sslmode and the like): where the spool is, not how it is reached.
        return self._db.url.split("?", 1)[0]

    async def open(self) -> None:
        """Connect, migrate, listen; raises SpoolWriteError when the database cannot be reached or used."""
        await self._db.open()

    def wake_on_new_mail(self, wake: Callable[[], None]) -> None:
        """Call wake whenever any relay stores mail that is due (a NOTIFY); polling stays the backstop."""
        self._db.wake_on_new_mail(wake)

    async def _run(self, work: Callable[[Connection], Awaitable[_T]], durable: bool = True) -> _T:
        return await self._db.run(work, durable)

    async def _read(self, work: Callable[[Connection], Awaitable[_T]]) -> _T:
        return await self._db.read(work)

    async def store(
        self, message: NewMessage, committed: Callable[[tuple[int, ...]], None] | None = None
    ) -> tuple[int, ...]:
        # Sent at the commit: a relay it wakes finds the copies there.
        notify = message.claimed < len(message.copies)
        ids = await self._db.statements(lambda connection: self._insert(connection, message, notify))
        # Committed means durable here: the callback and the return come together.
        if committed is not None:
            committed(ids)
        return ids

    async def _insert(self, connection: Connection, message: NewMessage, notify: bool = False) -> tuple[int, ...]:
        """The message, its copies and its history in one statement (one round trip, its own transaction
        unless the caller opened one); the copies' ids in order. notify: wake the relays that listen."""
        copies = message.copies
        first_claimed = [position < message.claimed for position in range(len(copies))]
        history = () if message.record is None else history_parameters(message.record, copies, message.claimed)
        rows = await connection.fetch(
            _STORE if message.record is None else _STORE_WITH_HISTORY,
            message.id,
            message.mail_from,
            message.smtputf8,
            message.upstream,
            message.is_bounce,
            message.received_at,
            message.body,
            len(copies),
            list(range(len(copies))),
            [copy.kind for copy in copies],
            # Recipients are never empty and hold no line break (SMTP forbids both): one text each here.
            ["\n".join(copy.recipients) for copy in copies],
            [copy.headers for copy in copies],
            [CopyState.SENDING if claimed else CopyState.QUEUED for claimed in first_claimed],
            [message.claimed_until if claimed else message.received_at for claimed in first_claimed],
            [self.owner if claimed else None for claimed in first_claimed],
            [int(claimed) for claimed in first_claimed],
            NEW_MAIL_CHANNEL if notify else None,
            *history,
        )
        ids = tuple(row["id"] for row in sorted(rows, key=lambda row: row["position"]))
        self._fences.update((copy_id, 1) for copy_id in ids[: message.claimed])
        return ids

    async def recover(self) -> int:
        """Copies held by relay processes of this machine that no longer run go again now (leases.py);
        a relay elsewhere that died leaves its copies until their leases end (spool.lease). Once per
        relay's start, as the totals its stopped predecessors' connections left are folded."""

        async def release(connection: Connection) -> int:
            await fold_counters(connection)
            holders = await connection.fetch(
                "SELECT DISTINCT lease_owner FROM copies WHERE split_part(lease_owner, '/', 1) = $1",
                host_of(self.owner),
            )
            gone = [row["lease_owner"] for row in holders if is_gone(row["lease_owner"], self.owner)]
            if not gone:
                return 0
            status = await connection.execute(
                "UPDATE copies SET state = $1, next_attempt = 0, lease_owner = NULL"
                " WHERE lease_owner = ANY($2::text[])",
                CopyState.QUEUED,
                gone,
            )
            return int(status.rsplit(" ", 1)[1])

        return await self._db.run(release)

    async def claim_due(self, now: float, limit: int, lease: float) -> list[SpooledCopy]:
        async def claim(connection: Connection) -> list[asyncpg.Record]:
            return await connection.fetch(_CLAIM, now, limit, CopyState.SENDING, now + lease, self.owner)

        rows = await self._db.statements(claim, durable=False)
        # Kept once committed: a claim that failed holds nothing.
        self._fences.update((row["id"], row["fence"]) for row in rows)
        return [
            SpooledCopy(
                id=row["id"],
                message_id=row["message_id"],
                position=row["position"],
                kind=CopyKind(row["kind"]),
                recipients=tuple(row["recipients"]),
                headers=bytes(row["headers"]),
                mail_from=row["mail_from"],
                smtputf8=row["smtputf8"],
                upstream=row["upstream"],
                received_at=row["received_at"],
                attempts=row["attempts"],
            )
            for row in sorted(rows, key=lambda row: (row["message_id"], row["position"]))
        ]

    async def bodies(self, message_ids: Collection[str]) -> dict[str, bytes]:
        async def read(connection: Connection) -> dict[str, bytes]:
            rows = await connection.fetch("SELECT id, body FROM messages WHERE id = ANY($1::text[])", list(message_ids))
            return {row["id"]: bytes(row["body"]) for row in rows}

        return await self._db.read(read)

    async def release(self, copy_id: int, next_attempt: float) -> None:
        fence = self._fences.pop(copy_id, None)

        async def put_back(connection: Connection) -> None:
            await connection.execute(
                "UPDATE copies SET state = $1, next_attempt = $2, lease_owner = NULL"
                " WHERE id = $3 AND lease_owner = $4 AND fence = $5",
                CopyState.QUEUED,
                next_attempt,
                copy_id,
                self.owner,
                fence,
            )

        await self._db.run(put_back, durable=False)

    async def postpone(self, now: float, until: float) -> None:
        async def delay(connection: Connection) -> None:
            await connection.execute(
                "UPDATE copies SET next_attempt = $1 WHERE state = $2 AND next_attempt <= $3",
                until,
                CopyState.QUEUED,
                now,
            )

        await self._db.run(delay, durable=False)

    async def record(self, result: CopyResult) -> Progress:
        fence = self._fences.get(result.copy_id)
        counted = result.copy_id in self._counted
        # Kept while the database is away: the retirer records the same result again.
        try:
            progress = await self._results.record(result, fence, counted)
        except asyncio.CancelledError:
            self._forget_claim(result.copy_id)
            raise
        self._forget_claim(result.copy_id)
        return progress

    def _forget_claim(self, copy_id: int) -> None:
        self._fences.pop(copy_id, None)
        self._counted.discard(copy_id)

    async def take_sends(
        self, now: float, copies: Sequence[SpooledCopy], per_minute: int | None, per_day: int | None
    ) -> tuple[int, float]:
        """How many of these claimed copies (in order) may be sent now within upstream.rate_limit, counted
        over every relay that shares the spool, and how long the rest must wait. The copies granted count
        as sent now; relays take turns (an advisory lock), so together they never exceed the limit."""

        async def take(connection: Connection) -> tuple[int, float]:
            return await _take_sends(connection, now, copies, RateLimiter(per_minute, per_day))

        granted, wait = await self._db.run(take, durable=False)
        self._counted.update(copy.id for copy in copies[:granted])
        return granted, wait

    async def next_due(self) -> float | None:
        async def earliest(connection: Connection) -> float | None:
            value = await connection.fetchval("SELECT min(next_attempt) FROM copies")
            return None if value is None else float(value)

        return await self._db.read(earliest)

    async def settled(self, message_id: str | None = None) -> list[SettledMessage]:
        return await self._db.run(lambda connection: _settled(connection, message_id), durable=False)

    async def retire(self, message_id: str, replacement: NewMessage | None) -> None:
        async def swap(connection: Connection) -> None:
            deleted = await connection.fetchval("DELETE FROM messages WHERE id = $1 RETURNING id", message_id)
            # Another relay retired it first (and bounced it): one bounce, not one per relay.
            if deleted is not None and replacement is not None:
                await self._insert(connection, replacement, notify=True)

        await self._db.run(swap)

    async def recent_sends(self, since: float) -> list[tuple[float, int]]:
        async def sends(connection: Connection) -> list[tuple[float, int]]:
            rows = await connection.fetch(
                "SELECT sent_at, recipients FROM sends WHERE sent_at >= $1 ORDER BY sent_at", since
            )
            return [(float(row["sent_at"]), int(row["recipients"])) for row in rows]

        return await self._db.read(sends)

    async def summaries(self) -> list[MessageSummary]:
        return await self._db.read(lambda connection: _summaries(connection, None))

    async def summary(self, message_id: str) -> MessageSummary | None:
        found = await self._db.read(lambda connection: _summaries(connection, message_id))
        return found[0] if found else None

    async def retry_now(self, now: float, message_id: str | None) -> int:
        async def make_due(connection: Connection) -> int:
            status = await connection.execute(
                "UPDATE copies SET next_attempt = $1 WHERE state = $2 AND ($3::text IS NULL OR message_id = $3)",
                now,
                CopyState.QUEUED,
                message_id,
            )
            await connection.execute("SELECT pg_notify($1, '')", NEW_MAIL_CHANNEL)
            return int(status.rsplit(" ", 1)[1])

        return await self._db.run(make_due)

    async def delete(self, message_id: str) -> bool:
        async def remove(connection: Connection) -> bool:
            await mark_discarded(connection, message_id)
            return await connection.fetchval("DELETE FROM messages WHERE id = $1 RETURNING id", message_id) is not None

        return await self._db.run(remove)

    async def close(self) -> None:
        await self._results.close()
        await self._db.close()


async def _take_sends(
    connection: Connection, now: float, copies: Sequence[SpooledCopy], limiter: RateLimiter
) -> tuple[int, float]:
    await connection.execute("SELECT pg_advisory_xact_lock($1)", SENDS_LOCK)
    # In time order: the limiter's windows expire from the oldest.
    rows = await connection.fetch(
        "SELECT sent_at, recipients FROM sends WHERE sent_at > $1 ORDER BY sent_at", now - 86400
    )
    for row in rows:
        limiter.record(row["sent_at"], row["recipients"])
    granted = 0
    for copy in copies:
        if limiter.wait(now, len(copy.recipients)) > 0:
            break
        limiter.record(now, len(copy.recipients))
        granted += 1
    await connection.executemany(
        "INSERT INTO sends (sent_at, recipients) VALUES ($1, $2)",
        [(now, len(copy.recipients)) for copy in copies[:granted]],
    )
    rest = copies[granted:]
    return granted, limiter.wait(now, len(rest[0].recipients)) if rest else 0.0


async def _settled(connection: Connection, message_id: str | None) -> list[SettledMessage]:
    rows = await connection.fetch(
        "SELECT id, mail_from, upstream, is_bounce, received_at, body FROM messages m"
        " WHERE copies_left = 0 AND ($1::text IS NULL OR m.id = $1)",
        message_id,
    )
    return [
        SettledMessage(
            row["id"],
            row["mail_from"],
            row["upstream"],
            row["is_bounce"],
            row["received_at"],
            await _failures(connection, row["id"]),
            bytes(row["body"]),
        )
        for row in rows
    ]


async def _failures(connection: Connection, message_id: str) -> tuple[Failure, ...]:
    rows = await connection.fetch(
        "SELECT recipient, code, enhanced, text, headers FROM failures WHERE message_id = $1 ORDER BY id", message_id
    )
    return tuple(
        Failure(row["recipient"], Reply(row["code"], row["enhanced"], row["text"]), bytes(row["headers"]))
        for row in rows
    )


async def _summaries(connection: Connection, message_id: str | None) -> list[MessageSummary]:
    rows = await connection.fetch(
        "SELECT id, mail_from, upstream, is_bounce, received_at, length(body) AS size FROM messages"
        # Not the delivered ones that the next statement deletes (postgres_results.py): they are gone.
        " WHERE ($1::text IS NULL OR id = $1) AND (copies_left > 0 OR failed) ORDER BY received_at, id",
        message_id,
    )
    summaries = []
    for row in rows:
        copies = tuple(
            CopySummary(
                c["id"],
                c["position"],
                CopyKind(c["kind"]),
                tuple(c["recipients"]),
                CopyState(c["state"]),
                c["attempts"],
                c["next_attempt"],
                None if c["last_code"] is None else Reply(c["last_code"], c["last_enhanced"], c["last_text"]),
            )
            for c in await connection.fetch(
                "SELECT id, position, kind, recipients, state, attempts, next_attempt, last_code, last_enhanced,"
                " last_text FROM copies WHERE message_id = $1 ORDER BY position, id",
                row["id"],
            )
        )
        failures = await _failures(connection, row["id"])
        summaries.append(
            MessageSummary(
                row["id"],
                row["mail_from"],
                row["upstream"],
                row["is_bounce"],
                row["received_at"],
                row["size"],
                copies,
                failures,
            )
        )
    return summaries
