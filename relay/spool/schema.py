"""The spool's SQLite schema and its versions (PRAGMA user_version): a new database gets the latest, an older one
is migrated step by step, in one transaction, when a relay or the queue command opens it.

Version 0 is the schema from before versions: replies stored as text ("550 5.1.1 No such user").
Version 2 adds what the console shows: the history of each message, held messages and the totals for /metrics.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from relay.core.replies import Reply

SCHEMA_VERSION = 2

_FAILURES = """
CREATE TABLE failures (
    message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    recipient TEXT NOT NULL,
    code INTEGER NOT NULL,
    enhanced TEXT NOT NULL,
    text TEXT NOT NULL,
    headers BLOB NOT NULL
)
"""
_FAILURES_INDEX = "CREATE INDEX failures_message ON failures (message_id)"
_SCHEMA = (
    """
CREATE TABLE messages (
    id TEXT PRIMARY KEY,
    mail_from TEXT NOT NULL,
    smtputf8 INTEGER NOT NULL,
    upstream TEXT,               -- the upstream chosen for this message; NULL is the default one
    is_bounce INTEGER NOT NULL,  -- a DSN made by the relay: never bounced itself
    received_at REAL NOT NULL,
    body BLOB NOT NULL
)
""",
    """
CREATE TABLE copies (
    id INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    kind TEXT NOT NULL,
    recipients TEXT NOT NULL,    -- the recipients still to deliver, one per line
    headers BLOB NOT NULL,
    state TEXT NOT NULL,         -- queued | sending (claimed until next_attempt, the end of its lease)
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_code INTEGER,           -- the last attempt's reply, if it was not a success
    last_enhanced TEXT,
    last_text TEXT
)
""",
    "CREATE INDEX copies_due ON copies (next_attempt)",
    "CREATE INDEX copies_message ON copies (message_id)",
    _FAILURES,
    """
CREATE TABLE sends (
    sent_at REAL NOT NULL,
    recipients INTEGER NOT NULL
)
""",
    _FAILURES_INDEX,
    "CREATE INDEX sends_time ON sends (sent_at)",
)


_CONSOLE_TABLES = (
    """
CREATE TABLE history (
    id TEXT PRIMARY KEY,         -- the queue id
    received_at REAL NOT NULL,
    sender TEXT NOT NULL,
    subject TEXT NOT NULL,
    recipients TEXT NOT NULL,    -- the envelope's, one per line
    decision TEXT NOT NULL,      -- a policy action, or refused
    reason TEXT NOT NULL
)
""",
    "CREATE INDEX history_time ON history (received_at)",
    """
CREATE TABLE history_copies (
    message_id TEXT NOT NULL REFERENCES history(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    recipients TEXT NOT NULL,
    state TEXT NOT NULL,         -- queued | sending | delivered | deferred | bounced | held | discarded
    attempts INTEGER NOT NULL DEFAULT 0,
    last_code INTEGER,           -- the upstream's 250 once delivered, else the reply that deferred or refused it
    last_enhanced TEXT,
    last_text TEXT,
    next_attempt REAL,
    PRIMARY KEY (message_id, position)
)
""",
    """
CREATE TABLE held (
    id TEXT PRIMARY KEY,
    mail_from TEXT NOT NULL,
    recipients TEXT NOT NULL,
    smtputf8 INTEGER NOT NULL,
    received_at REAL NOT NULL,
    trace TEXT NOT NULL,         -- JSON: what the relay's Received line says, for the copies made at release
    state TEXT NOT NULL,         -- held | released | discarded | returned
    data BLOB NOT NULL           -- the message as received; emptied once it is settled
)
""",
    # Totals for /metrics, shared by every worker and kept across restarts; label is '' when there is none.
    """
CREATE TABLE counters (
    name TEXT NOT NULL,
    label TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (name, label)
)
""",
)


class SchemaTooNew(sqlite3.DatabaseError):
    """The spool was made by a newer privacy-relay: this one would misread it."""


def _stored_text_reply(text: str) -> Reply:
    code, _, rest = text.partition(" ")
    return Reply.parse(int(code), rest) if code.isdigit() else Reply.parse(451, text)


def _replies_in_columns(db: sqlite3.Connection) -> None:
    """1: a reply's code, enhanced status and text in columns of their own, not one text to parse back."""
    for column in ("last_code INTEGER", "last_enhanced TEXT", "last_text TEXT"):
        db.execute(f"ALTER TABLE copies ADD COLUMN {column}")
    last_replies = []
    for copy_id, text in db.execute("SELECT id, last_reply FROM copies WHERE last_reply IS NOT NULL").fetchall():
        reply = _stored_text_reply(text)
        last_replies.append((reply.code, reply.enhanced, reply.text, copy_id))
    db.executemany("UPDATE copies SET last_code = ?, last_enhanced = ?, last_text = ? WHERE id = ?", last_replies)
    db.execute("ALTER TABLE copies DROP COLUMN last_reply")
    failures = []
    for message_id, recipient, text, headers in db.execute(
        "SELECT message_id, recipient, reply, headers FROM failures ORDER BY rowid"
    ).fetchall():
        reply = _stored_text_reply(text)
        failures.append((message_id, recipient, reply.code, reply.enhanced, reply.text, headers))
    # Rebuilt rather than altered, so that its columns are NOT NULL as in a new database.
    db.execute("DROP TABLE failures")
    db.execute(_FAILURES)
    db.execute(_FAILURES_INDEX)
    db.executemany(
        "INSERT INTO failures (message_id, recipient, code, enhanced, text, headers) VALUES (?, ?, ?, ?, ?, ?)",
        failures,
    )


def _console_tables(db: sqlite3.Connection) -> None:
    """2: the console's history, held messages and totals (empty: the messages before are not in the history)."""
    for statement in _CONSOLE_TABLES:
        db.execute(statement)


# The migration that reaches each version from the one before it.
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _replies_in_columns, 2: _console_tables}


def prepare_schema(db: sqlite3.Connection) -> None:
    """Create the latest schema in a new database, or migrate an older one to it; SchemaTooNew if it is newer."""
    db.execute("BEGIN IMMEDIATE")
    try:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the spool's schema is version {version}, newer than this privacy-relay's {SCHEMA_VERSION}"
            )
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages'").fetchone() is None:
            for statement in (*_SCHEMA, *_CONSOLE_TABLES):
                db.execute(statement)
        else:
            for reached in range(version + 1, SCHEMA_VERSION + 1):
                _MIGRATIONS[reached](db)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
