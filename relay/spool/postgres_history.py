"""The console's side of the PostgreSQL spool: the history of each message, held messages, the totals for /metrics.

The same tables and semantics as the SQLite spool's (relay/spool/history.py), written in the transaction
that stores a message and in the one statement that records each attempt (RECORD_ATTEMPT). Every relay
sharing the database writes into the same rows, so the history, the held messages and the totals are the
database's: each relay's console shows all of them. A held message is settled by one conditional UPDATE,
so of two relays deciding at once exactly one does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

import asyncpg

from relay.core.activity import MessageRecord
from relay.core.replies import Reply
from relay.core.rewrite import OutgoingCopy
from relay.spool.history import SELECT_HELD, SELECT_HISTORY, count_waiting
from relay.spool.interface import (
    CopyHistory,
    HeldMessage,
    HeldState,
    HistoryState,
    MessageHistory,
    NewMessage,
    SpoolMetrics,
)
from relay.spool.postgres_database import Connection
from relay.spool.rows import state_at_start

_T = TypeVar("_T")
# Totals that a later value replaces instead of adding to.
GAUGES = ("upstream_up", "upstream_last_delivery", "health_checked_at")
# Each database connection adds to its own row of a total (shard: its backend's pid), so relays counting at
# the same moment never wait for one another's row lock, the hot spot of a shared spool; metrics() adds the
# rows up, and takes a gauge's latest.
COUNTER_UPSERT = (
    " ON CONFLICT (name, label, shard) DO UPDATE SET value = CASE"
    f" WHEN excluded.name IN ({', '.join(repr(name) for name in GAUGES)}) THEN excluded.value"
    " ELSE counters.value + excluded.value END, at = excluded.at"
)
# The history of a message stored with its copies, in the statement that stores it (PostgresSpool._insert):
# $1 its id, $6 received_at, $9 the copies' positions, $11 their recipients, then $18 to $23.
STORE_HISTORY = (
    " entry AS (INSERT INTO history (id, received_at, sender, subject, recipients, decision, reason)"  # noqa: S608
    " VALUES ($1, $6, $18, $19, $20, $21, $22)),"
    " shown AS (INSERT INTO history_copies (message_id, position, recipients, state)"
    " SELECT $1, c.position, string_to_array(c.recipients, E'\\n'), c.state"
    " FROM unnest($9::integer[], $11::text[], $23::text[]) AS c(position, recipients, state)),"
    " decided AS (INSERT INTO counters (name, label, shard, value, at)"
    " VALUES ('messages_total', $21, pg_backend_pid(), 1.0, $6)" + COUNTER_UPSERT + "),"
)
# Rows of connections that have ended, merged into shard 0 (a relay's start and the console's hourly purge),
# so the table stays a few rows per live connection however often connections come and go.
_FOLD_COUNTERS = (
    "WITH gone AS (DELETE FROM counters WHERE shard <> 0 AND shard NOT IN (SELECT pid FROM pg_stat_activity)"
    " RETURNING name, label, value, at),"
    " folded AS ((SELECT name, label, sum(value) AS value, max(at) AS at FROM gone"
    " WHERE name <> ALL($1::text[]) GROUP BY name, label)"
    " UNION ALL (SELECT DISTINCT ON (name, label) name, label, value, at FROM gone"
    " WHERE name = ANY($1::text[]) ORDER BY name, label, at DESC))"
    " INSERT INTO counters (name, label, shard, value, at) SELECT name, label, 0, value, at FROM folded"
    " ON CONFLICT (name, label, shard) DO UPDATE SET value = CASE WHEN counters.name = ANY($1::text[])"
    " THEN CASE WHEN excluded.at >= counters.at THEN excluded.value ELSE counters.value END"
    " ELSE counters.value + excluded.value END, at = greatest(counters.at, excluded.at)"
)
_READ_COUNTERS = (
    "(SELECT name, label, sum(value) AS value FROM counters WHERE name <> ALL($1::text[]) GROUP BY name, label)"
    " UNION ALL (SELECT DISTINCT ON (name, label) name, label, value FROM counters"
    " WHERE name = ANY($1::text[]) ORDER BY name, label, at DESC)"
)


_WAITING = (HistoryState.QUEUED, HistoryState.SENDING, HistoryState.DEFERRED)


class _Transactions(Protocol):
    """What PostgresConsoleQueries needs of PostgresSpool: its database and how it inserts a message."""

    async def _run(self, work: Callable[[Connection], Awaitable[_T]], durable: bool = True) -> _T: ...

    async def _read(self, work: Callable[[Connection], Awaitable[_T]]) -> _T: ...

    async def _insert(self, connection: Connection, message: NewMessage, notify: bool = False) -> tuple[int, ...]: ...


async def add_counters(connection: Connection, values: Sequence[tuple[str, str, float]]) -> None:
    """Add to the totals (gauges: replace them), in one statement."""
    if not values:
        return
    await connection.execute(
        "INSERT INTO counters (name, label, shard, value, at)"  # noqa: S608
        " SELECT name, label, pg_backend_pid(), value, $4 FROM unnest($1::text[], $2::text[], $3::float8[])"
        " AS c(name, label, value)" + COUNTER_UPSERT,
        [name for name, _, _ in values],
        [label for _, label, _ in values],
        [value for _, _, value in values],
        time.time(),
    )


async def fold_counters(connection: Connection) -> None:
    await connection.execute(_FOLD_COUNTERS, list(GAUGES))


def history_parameters(record: MessageRecord, copies: Sequence[OutgoingCopy], claimed: int) -> tuple[object, ...]:
    """$18 to $23 of STORE_HISTORY."""
    return (
        record.sender,
        record.subject,
        list(record.recipients),
        record.decision,
        record.reason,
        [state_at_start(position, claimed) for position in range(len(copies))],
    )


async def insert_history(connection: Connection, message_id: str, received_at: float, record: MessageRecord) -> None:
    """What the console shows of a message stored without copies (held, or remembered), and the count of its
    decision. (A message stored with its copies writes the same in its one statement: STORE_HISTORY.)"""
    await connection.execute(
        "INSERT INTO history (id, received_at, sender, subject, recipients, decision, reason)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7)",
        message_id,
        received_at,
        record.sender,
        record.subject,
        list(record.recipients),
        record.decision,
        record.reason,
    )
    await add_counters(connection, [("messages_total", record.decision, 1.0)])


async def insert_history_copies(connection: Connection, message_id: str, copies: Sequence[OutgoingCopy]) -> None:
    if not copies:
        return
    # Recipients are never empty and hold no line break (SMTP forbids both): one text each here.
    await connection.execute(
        "INSERT INTO history_copies (message_id, position, recipients, state)"
        " SELECT $1, c.position, string_to_array(c.recipients, E'\\n'), c.state"
        " FROM unnest($2::integer[], $3::text[], $4::text[]) AS c(position, recipients, state)",
        message_id,
        list(range(len(copies))),
        ["\n".join(copy.recipients) for copy in copies],
        [HistoryState.QUEUED] * len(copies),
    )


async def mark_discarded(connection: Connection, message_id: str) -> None:
    """A message deleted from the queue: its copies still to send are never sent."""
    await connection.execute(
        "UPDATE history_copies SET state = $1, next_attempt = NULL WHERE message_id = $2 AND state = ANY($3::text[])",
        HistoryState.DISCARDED,
        message_id,
        list(_WAITING),
    )


async def _history_entries(connection: Connection, rows: list[asyncpg.Record]) -> list[MessageHistory]:
    copies: dict[str, list[CopyHistory]] = {row["id"]: [] for row in rows}
    for c in await connection.fetch(
        "SELECT message_id, position, recipients, state, attempts, last_code, last_enhanced, last_text, next_attempt"
        " FROM history_copies WHERE message_id = ANY($1::text[]) ORDER BY message_id, position",
        list(copies),
    ):
        reply = None if c["last_code"] is None else Reply(c["last_code"], c["last_enhanced"], c["last_text"])
        copies[c["message_id"]].append(
            CopyHistory(
                c["position"], tuple(c["recipients"]), HistoryState(c["state"]), c["attempts"], reply, c["next_attempt"]
            )
        )
    return [
        MessageHistory(
            row["id"],
            row["received_at"],
            MessageRecord(row["sender"], row["subject"], tuple(row["recipients"]), row["decision"], row["reason"]),
            tuple(copies[row["id"]]),
        )
        for row in rows
    ]


def _held(row: asyncpg.Record) -> HeldMessage:
    trace = {str(key): str(value) for key, value in json.loads(row["trace"]).items()}
    return HeldMessage(
        row["id"],
        row["mail_from"],
        tuple(row["recipients"]),
        row["smtputf8"],
        row["received_at"],
        trace,
        HeldState(row["state"]),
        bytes(row["data"]),
    )


class PostgresConsoleQueries:
    """The ConsoleSpool methods, and remember() and hold() for the listener, mixed into PostgresSpool."""

    async def remember(self: _Transactions, message_id: str, received_at: float, record: MessageRecord) -> None:
        async def insert(connection: Connection) -> None:
            await insert_history(connection, message_id, received_at, record)

        await self._run(insert, durable=False)

    async def hold(self: _Transactions, message: HeldMessage, record: MessageRecord, notice: NewMessage | None) -> None:
        async def insert(connection: Connection) -> None:
            await connection.execute(
                "INSERT INTO held (id, mail_from, recipients, smtputf8, received_at, trace, state, data)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                message.id,
                message.mail_from,
                list(message.recipients),
                message.smtputf8,
                message.received_at,
                json.dumps(message.trace),
                HeldState.HELD,
                message.data,
            )
            await insert_history(connection, message.id, message.received_at, record)
            await connection.execute(
                "INSERT INTO history_copies (message_id, position, recipients, state) VALUES ($1, 0, $2, $3)",
                message.id,
                list(message.recipients),
                HistoryState.HELD,
            )
            if notice is not None:
                await self._insert(connection, notice, notify=True)

        await self._run(insert)

    async def history(
        self: _Transactions, limit: int, decision: str | None = None, text: str = ""
    ) -> list[MessageHistory]:
        async def find(connection: Connection) -> list[MessageHistory]:
            # strpos on lower(): a plain substring, as SQLite's instr, with no LIKE wildcards to escape.
            rows = await connection.fetch(
                f"{SELECT_HISTORY} WHERE ($1::text IS NULL OR decision = $1)"
                " AND ($2 = '' OR strpos(lower(subject), $2) > 0 OR strpos(lower(sender), $2) > 0"
                " OR strpos(lower(array_to_string(recipients, E'\\n')), $2) > 0)"
                " ORDER BY received_at DESC, entered DESC LIMIT $3",
                decision,
                text.lower(),
                limit,
            )
            return await _history_entries(connection, rows)

        return await self._read(find)

    async def history_of(self: _Transactions, message_id: str) -> MessageHistory | None:
        async def find(connection: Connection) -> MessageHistory | None:
            rows = await connection.fetch(f"{SELECT_HISTORY} WHERE id = $1", message_id)
            found = await _history_entries(connection, rows)
            return found[0] if found else None

        return await self._read(find)

    async def forget_history(self: _Transactions, before: float) -> int:
        async def purge(connection: Connection) -> int:
            await fold_counters(connection)
            await connection.execute("DELETE FROM held WHERE received_at < $1 AND state != $2", before, HeldState.HELD)
            status = await connection.execute(
                "DELETE FROM history h WHERE received_at < $1"
                " AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = h.id)"
                " AND NOT EXISTS (SELECT 1 FROM held WHERE held.id = h.id)",
                before,
            )
            return int(status.rsplit(" ", 1)[1])

        return await self._run(purge, durable=False)

    async def metrics(self: _Transactions) -> SpoolMetrics:
        async def read(connection: Connection) -> SpoolMetrics:
            counters = {
                (row["name"], row["label"]): float(row["value"])
                for row in await connection.fetch(_READ_COUNTERS, list(GAUGES))
            }
            queue_copies = count_waiting(
                await connection.fetch(
                    "SELECT state, attempts > 0 AS tried, count(*) AS count FROM copies GROUP BY state, attempts > 0"
                )
            )
            oldest = await connection.fetchval(
                "SELECT min(received_at) FROM messages m"
                " WHERE EXISTS (SELECT 1 FROM copies c WHERE c.message_id = m.id)"
            )
            held = await connection.fetchval("SELECT count(*) FROM held WHERE state = $1", HeldState.HELD)
            return SpoolMetrics(counters, queue_copies, oldest, held)

        return await self._read(read)

    async def held_messages(self: _Transactions) -> list[HeldMessage]:
        async def find(connection: Connection) -> list[HeldMessage]:
            rows = await connection.fetch(f"{SELECT_HELD} WHERE state = $1 ORDER BY received_at, id", HeldState.HELD)
            return [_held(row) for row in rows]

        return await self._read(find)

    async def held_message(self: _Transactions, message_id: str) -> HeldMessage | None:
        async def find(connection: Connection) -> HeldMessage | None:
            row = await connection.fetchrow(f"{SELECT_HELD} WHERE id = $1", message_id)
            return None if row is None else _held(row)

        return await self._read(find)

    async def settle_held(
        self: _Transactions,
        message_id: str,
        state: HeldState,
        replacement: NewMessage | None,
        record: MessageRecord | None,
    ) -> bool:
        async def settle(connection: Connection) -> bool:
            # Conditional: a relay deciding at the same moment waits for this row, then finds it settled.
            settled = await connection.fetchval(
                "UPDATE held SET state = $1, data = '' WHERE id = $2 AND state = $3 RETURNING id",
                state,
                message_id,
                HeldState.HELD,
            )
            if settled is None:
                return False
            if record is not None:
                await connection.execute(
                    "UPDATE history SET decision = $1, reason = $2 WHERE id = $3",
                    record.decision,
                    record.reason,
                    message_id,
                )
            if state is HeldState.RELEASED and replacement is not None:
                await connection.execute("DELETE FROM history_copies WHERE message_id = $1", message_id)
                await self._insert(connection, replacement, notify=True)
                await insert_history_copies(connection, message_id, replacement.copies)
                return True
            ended = HistoryState.DISCARDED if state is HeldState.DISCARDED else HistoryState.BOUNCED
            await connection.execute("UPDATE history_copies SET state = $1 WHERE message_id = $2", ended, message_id)
            if replacement is not None:
                await self._insert(connection, replacement, notify=True)
            return True

        return await self._run(settle)

    async def check_writable(self: _Transactions) -> None:
        async def touch(connection: Connection) -> None:
            await add_counters(connection, [("health_checked_at", "", time.time())])

        await self._run(touch, durable=False)
