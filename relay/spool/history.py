"""The console's side of the SQLite spool: the history of each message, held messages, the totals for /metrics.

The history is written in the transactions that store a message and record each attempt, so it never
disagrees with the spool, and every worker's mail is in it. SqliteSpool gets these methods from
ConsoleQueries; count_attempt is called by its record().
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

from relay.core.activity import MessageRecord
from relay.core.replies import Reply
from relay.spool.interface import (
    DELIVERY_SECONDS_BUCKETS,
    CopyHistory,
    CopyResult,
    CopyState,
    HeldMessage,
    HeldState,
    HistoryState,
    MessageHistory,
    NewMessage,
    SpoolMetrics,
)
from relay.spool.rows import (
    add_value,
    insert_history,
    insert_history_copies,
    insert_message,
    lines,
    set_value,
    split_lines,
)

_T = TypeVar("_T")
# The same columns in both spools (relay/spool/postgres_history.py reads them too).
SELECT_HISTORY = "SELECT id, received_at, sender, subject, recipients, decision, reason FROM history"
SELECT_HELD = "SELECT id, mail_from, recipients, smtputf8, received_at, trace, state, data FROM held"


class _Transactions(Protocol):
    """What ConsoleQueries needs of the class it is mixed into: SqliteSpool's reads and writes."""

    async def _read(self, work: Callable[[sqlite3.Connection], _T]) -> _T: ...

    async def _write(
        self,
        work: Callable[[sqlite3.Connection], _T],
        durable: bool = True,
        committed: Callable[[_T], None] | None = None,
    ) -> _T: ...


def _reply_columns(reply: Reply | None) -> tuple[int | None, str | None, str | None]:
    return (None, None, None) if reply is None else (reply.code, reply.enhanced, reply.text)


def count_waiting(groups: Iterable[Iterable[Any]]) -> dict[str, int]:
    """/metrics' queue by state, from the copies counted by (spool state, attempted yet) (both spools)."""
    waiting = {str(state): 0 for state in (HistoryState.QUEUED, HistoryState.DEFERRED, HistoryState.SENDING)}
    for state, tried, count in groups:
        shown = (
            HistoryState.SENDING
            if state == CopyState.SENDING
            else HistoryState.DEFERRED
            if tried
            else HistoryState.QUEUED
        )
        waiting[str(shown)] += count
    return waiting


def shown_after(result: CopyResult) -> tuple[HistoryState, Reply | None]:
    """A copy's state in the history after this attempt, and the reply shown with it (both spools)."""
    state = HistoryState.DEFERRED if result.retry else HistoryState.BOUNCED if result.failed else HistoryState.DELIVERED
    return state, result.failed[0][1] if state is HistoryState.BOUNCED else result.last_reply


def count_attempt(
    db: sqlite3.Connection, result: CopyResult, message_id: str, position: int, received_at: float, upstream: str | None
) -> None:
    """The copy's state in the history and the totals for /metrics, in the transaction that stores the result."""
    state, shown = shown_after(result)
    db.execute(
        "UPDATE history_copies SET state = ?, attempts = attempts + ?, last_code = ?, last_enhanced = ?,"
        " last_text = ?, next_attempt = ? WHERE message_id = ? AND position = ?",
        (
            state,
            int(result.counts_as_attempt),
            *_reply_columns(shown),
            result.next_attempt if result.retry else None,
            message_id,
            position,
        ),
    )
    if result.counts_as_attempt:
        add_value(db, "copies_total", state)
        set_value(db, "upstream_up", upstream or "default", float(result.reached_upstream))
    if result.delivered:
        set_value(db, "upstream_last_delivery", upstream or "default", result.sent_at)
        seconds = max(0.0, result.sent_at - received_at)
        # One row per bucket, not cumulative: one write per copy; /metrics adds them up.
        bound = next((repr(b) for b in DELIVERY_SECONDS_BUCKETS if seconds <= b), "+Inf")
        add_value(db, "delivery_seconds_bucket", bound)
        add_value(db, "delivery_seconds_count", "")
        add_value(db, "delivery_seconds_sum", "", seconds)


def mark_claimed(db: sqlite3.Connection, claimed: list[tuple[str, int]]) -> None:
    """(message id, position) of copies claimed for sending."""
    db.executemany(
        "UPDATE history_copies SET state = ? WHERE message_id = ? AND position = ?",
        [(HistoryState.SENDING, message_id, position) for message_id, position in claimed],
    )


def mark_discarded(db: sqlite3.Connection, message_id: str) -> None:
    """A message deleted from the queue: its copies still to send are never sent."""
    waiting = (HistoryState.QUEUED, HistoryState.SENDING, HistoryState.DEFERRED)
    db.execute(
        "UPDATE history_copies SET state = ?, next_attempt = NULL WHERE message_id = ? AND state IN (?, ?, ?)",
        (HistoryState.DISCARDED, message_id, *waiting),
    )


def _history_entry(db: sqlite3.Connection, row: tuple[str, float, str, str, str, str, str]) -> MessageHistory:
    copies = tuple(
        CopyHistory(
            position,
            split_lines(recipients),
            HistoryState(state),
            attempts,
            None if code is None else Reply(code, enhanced, text),
            next_attempt,
        )
        for position, recipients, state, attempts, code, enhanced, text, next_attempt in db.execute(
            "SELECT position, recipients, state, attempts, last_code, last_enhanced, last_text, next_attempt"
            " FROM history_copies WHERE message_id = ? ORDER BY position",
            (row[0],),
        )
    )
    record = MessageRecord(row[2], row[3], split_lines(row[4]), row[5], row[6])
    return MessageHistory(row[0], row[1], record, copies)


def _held(row: tuple[str, str, str, int, float, str, str, bytes]) -> HeldMessage:
    trace = {str(key): str(value) for key, value in json.loads(row[5]).items()}
    return HeldMessage(
        row[0], row[1], split_lines(row[2]), bool(row[3]), row[4], trace, HeldState(row[6]), bytes(row[7])
    )


def _settle(
    db: sqlite3.Connection,
    message_id: str,
    state: HeldState,
    replacement: NewMessage | None,
    record: MessageRecord | None,
) -> bool:
    changed = db.execute(
        "UPDATE held SET state = ?, data = X'' WHERE id = ? AND state = ?", (state, message_id, HeldState.HELD)
    ).rowcount
    if not changed:
        return False
    if record is not None:
        db.execute(
            "UPDATE history SET decision = ?, reason = ? WHERE id = ?", (record.decision, record.reason, message_id)
        )
    if state is HeldState.RELEASED and replacement is not None:
        db.execute("DELETE FROM history_copies WHERE message_id = ?", (message_id,))
        insert_message(db, replacement)
        insert_history_copies(db, message_id, replacement.copies)
        return True
    ended = HistoryState.DISCARDED if state is HeldState.DISCARDED else HistoryState.BOUNCED
    db.execute("UPDATE history_copies SET state = ? WHERE message_id = ?", (ended, message_id))
    if replacement is not None:
        insert_message(db, replacement)
    return True


class ConsoleQueries:
    """The ConsoleSpool methods, and remember() and hold() for the listener, mixed into SqliteSpool."""

    async def remember(self: _Transactions, message_id: str, received_at: float, record: MessageRecord) -> None:
        await self._write(lambda db: insert_history(db, message_id, received_at, record, ()), durable=False)

    async def hold(self: _Transactions, message: HeldMessage, record: MessageRecord, notice: NewMessage | None) -> None:
        def insert(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO held (id, mail_from, recipients, smtputf8, received_at, trace, state, data)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    message.id,
                    message.mail_from,
                    lines(message.recipients),
                    int(message.smtputf8),
                    message.received_at,
                    json.dumps(message.trace),
                    HeldState.HELD,
                    message.data,
                ),
            )
            insert_history(db, message.id, message.received_at, record, ())
            db.execute(
                "INSERT INTO history_copies (message_id, position, recipients, state) VALUES (?, 0, ?, ?)",
                (message.id, lines(message.recipients), HistoryState.HELD),
            )
            if notice is not None:
                insert_message(db, notice)

        await self._write(insert)

    async def history(
        self: _Transactions, limit: int, decision: str | None = None, text: str = ""
    ) -> list[MessageHistory]:
        def find(db: sqlite3.Connection) -> list[MessageHistory]:
            query = f"{SELECT_HISTORY} WHERE 1"
            parameters: list[str | int] = []
            if decision is not None:
                query += " AND decision = ?"
                parameters.append(decision)
            if text:
                query += " AND (instr(lower(subject), ?) OR instr(lower(sender), ?) OR instr(lower(recipients), ?))"
                parameters += [text.lower()] * 3
            query += " ORDER BY received_at DESC, rowid DESC LIMIT ?"
            parameters.append(limit)
            return [_history_entry(db, row) for row in db.execute(query, parameters).fetchall()]

        return await self._read(find)

    async def history_of(self: _Transactions, message_id: str) -> MessageHistory | None:
        def find(db: sqlite3.Connection) -> MessageHistory | None:
            row = db.execute(f"{SELECT_HISTORY} WHERE id = ?", (message_id,)).fetchone()
            return None if row is None else _history_entry(db, row)

        return await self._read(find)

    async def forget_history(self: _Transactions, before: float) -> int:
        def purge(db: sqlite3.Connection) -> int:
            db.execute("DELETE FROM held WHERE received_at < ? AND state != ?", (before, HeldState.HELD))
            return db.execute(
                "DELETE FROM history WHERE received_at < ? AND id NOT IN (SELECT id FROM messages)"
                " AND id NOT IN (SELECT id FROM held)",
                (before,),
            ).rowcount

        return await self._write(purge, durable=False)

    async def metrics(self: _Transactions) -> SpoolMetrics:
        def read(db: sqlite3.Connection) -> SpoolMetrics:
            counters = {(name, label): float(value) for name, label, value in db.execute("SELECT * FROM counters")}
            queue_copies = count_waiting(
                db.execute("SELECT state, attempts > 0, COUNT(*) FROM copies GROUP BY state, attempts > 0")
            )
            (oldest,) = db.execute(
                "SELECT MIN(received_at) FROM messages m"
                " WHERE EXISTS (SELECT 1 FROM copies c WHERE c.message_id = m.id)"
            ).fetchone()
            (held,) = db.execute("SELECT COUNT(*) FROM held WHERE state = ?", (HeldState.HELD,)).fetchone()
            return SpoolMetrics(counters, queue_copies, oldest, held)

        return await self._read(read)

    async def held_messages(self: _Transactions) -> list[HeldMessage]:
        def find(db: sqlite3.Connection) -> list[HeldMessage]:
            rows = db.execute(f"{SELECT_HELD} WHERE state = ? ORDER BY received_at, id", (HeldState.HELD,))
            return [_held(row) for row in rows.fetchall()]

        return await self._read(find)

    async def held_message(self: _Transactions, message_id: str) -> HeldMessage | None:
        def find(db: sqlite3.Connection) -> HeldMessage | None:
            row = db.execute(f"{SELECT_HELD} WHERE id = ?", (message_id,)).fetchone()
            return None if row is None else _held(row)

        return await self._read(find)

    async def settle_held(
        self: _Transactions,
        message_id: str,
        state: HeldState,
        replacement: NewMessage | None,
        record: MessageRecord | None,
    ) -> bool:
        return await self._write(lambda db: _settle(db, message_id, state, replacement, record))

    async def check_writable(self: _Transactions) -> None:
        await self._write(lambda db: set_value(db, "health_checked_at", "", time.time()), durable=False)
