"""Rows the SQLite spool writes from several places: a new message with its copies (and its history), totals.

Shared by the scheduler's side (relay/spool/sqlite.py) and the console's (relay/spool/history.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from relay.core.activity import MessageRecord
from relay.core.rewrite import OutgoingCopy
from relay.spool.interface import CopyState, HistoryState, NewMessage

# Bodies larger than this are written into the database in slices of this size.
BLOB_SLICE = 1024 * 1024


def lines(recipients: Sequence[str]) -> str:
    return "\n".join(recipients)


def split_lines(text: str) -> tuple[str, ...]:
    return tuple(text.split("\n")) if text else ()


_INSERT_MESSAGE = (
    "INSERT INTO messages (id, mail_from, smtputf8, upstream, is_bounce, received_at, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
# The same, with a body of zeros of the given length to write into afterwards.
_INSERT_MESSAGE_EMPTY_BODY = _INSERT_MESSAGE.replace("?)", "zeroblob(?))")


def insert_message(db: sqlite3.Connection, message: NewMessage) -> tuple[int, ...]:
    # A big body is written in slices into a blob of its size: bound as a parameter, SQLite would copy it
    # twice in memory (the bound value and the record), 40 MB more for a 20 MB message.
    in_slices = len(message.body) > BLOB_SLICE
    cursor = db.execute(
        _INSERT_MESSAGE_EMPTY_BODY if in_slices else _INSERT_MESSAGE,
        (
            message.id,
            message.mail_from,
            int(message.smtputf8),
            message.upstream,
            int(message.is_bounce),
            message.received_at,
            len(message.body) if in_slices else message.body,
        ),
    )
    if in_slices:
        assert cursor.lastrowid is not None
        body = memoryview(message.body)
        with db.blobopen("messages", "body", cursor.lastrowid) as blob:
            for start in range(0, len(body), BLOB_SLICE):
                blob.write(body[start : start + BLOB_SLICE])
    db.executemany(
        "INSERT INTO copies (message_id, position, kind, recipients, headers, state, next_attempt)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (
                message.id,
                position,
                copy.kind,
                lines(copy.recipients),
                copy.headers,
                CopyState.SENDING if position < message.claimed else CopyState.QUEUED,
                message.claimed_until if position < message.claimed else message.received_at,
            )
            for position, copy in enumerate(message.copies)
        ],
    )
    if message.record is not None:
        insert_history(db, message.id, message.received_at, message.record, message.copies, message.claimed)
    rows = db.execute("SELECT id FROM copies WHERE message_id = ? ORDER BY position", (message.id,))
    return tuple(row[0] for row in rows)


def insert_history(
    db: sqlite3.Connection,
    message_id: str,
    received_at: float,
    record: MessageRecord,
    copies: Sequence[OutgoingCopy],
    claimed: int = 0,
) -> None:
    """What the console shows of a message, with a row per copy, and the count of its decision."""
    db.execute(
        "INSERT INTO history (id, received_at, sender, subject, recipients, decision, reason)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            message_id,
            received_at,
            record.sender,
            record.subject,
            lines(record.recipients),
            record.decision,
            record.reason,
        ),
    )
    insert_history_copies(db, message_id, copies, claimed)
    add_value(db, "messages_total", record.decision)


def insert_history_copies(
    db: sqlite3.Connection, message_id: str, copies: Sequence[OutgoingCopy], claimed: int = 0
) -> None:
    db.executemany(
        "INSERT INTO history_copies (message_id, position, recipients, state) VALUES (?, ?, ?, ?)",
        [
            (
                message_id,
                position,
                lines(copy.recipients),
                HistoryState.SENDING if position < claimed else HistoryState.QUEUED,
            )
            for position, copy in enumerate(copies)
        ],
    )


def state_at_start(position: int, claimed: int) -> HistoryState:
    return HistoryState.SENDING if position < claimed else HistoryState.QUEUED


def add_value(db: sqlite3.Connection, name: str, label: str, amount: float = 1.0) -> None:
    db.execute(
        "INSERT INTO counters (name, label, value) VALUES (?, ?, ?)"
        " ON CONFLICT (name, label) DO UPDATE SET value = value + excluded.value",
        (name, label, amount),
    )


def set_value(db: sqlite3.Connection, name: str, label: str, value: float) -> None:
    db.execute(
        "INSERT INTO counters (name, label, value) VALUES (?, ?, ?)"
        " ON CONFLICT (name, label) DO UPDATE SET value = excluded.value",
        (name, label, value),
    )
