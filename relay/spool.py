"""Durable storage of accepted messages and the state of each outgoing copy.

Each message's body is stored once; each copy is a row holding only its own header bytes, recipients
and delivery state. Delivery logic talks to the Spool protocol only, so a shared database could back
several relays later. SqliteSpool is the embedded implementation: WAL mode, synchronous=FULL, and every
write goes through one thread that commits whatever has piled up in one transaction (one fsync for
several messages), while each caller still waits for its own commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from relay.errors import SmtpReply

DATABASE_NAME = "spool.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    mail_from TEXT NOT NULL,
    smtputf8 INTEGER NOT NULL,
    upstream TEXT,               -- the upstream chosen for this message; NULL is the default one
    is_bounce INTEGER NOT NULL,  -- a DSN made by the relay: never bounced itself
    received_at REAL NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS copies (
    id INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    kind TEXT NOT NULL,
    recipients TEXT NOT NULL,    -- the recipients still to deliver, one per line
    headers BLOB NOT NULL,
    state TEXT NOT NULL,         -- queued | sending (claimed until next_attempt, the end of its lease)
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_reply TEXT
);
CREATE INDEX IF NOT EXISTS copies_due ON copies (next_attempt);
CREATE INDEX IF NOT EXISTS copies_message ON copies (message_id);
CREATE TABLE IF NOT EXISTS failures (
    message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    recipient TEXT NOT NULL,
    reply TEXT NOT NULL,
    headers BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS sends (
    sent_at REAL NOT NULL,
    recipients INTEGER NOT NULL
);
"""

QUEUED = "queued"
SENDING = "sending"
_DAY = 86_400.0


def new_queue_id() -> str:
    return secrets.token_hex(6).upper()


class SpoolWriteError(SmtpReply):
    """The spool could not commit (disk full, read-only, I/O error): the client must try again later."""


def _closed() -> SpoolWriteError:
    # A client still in a session while the relay stops (SIGTERM): it keeps the message and tries again.
    return SpoolWriteError(451, "4.3.2", "The relay is shutting down; try again later")


def _write_error(exc: sqlite3.Error) -> SpoolWriteError:
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL:
        return SpoolWriteError(452, "4.3.1", "Insufficient system storage: the relay's spool is full; try again later")
    return SpoolWriteError(451, "4.3.0", f"The relay cannot store the message right now ({exc}); try again later")


@dataclass(frozen=True, slots=True)
class NewCopy:
    recipients: tuple[str, ...]
    kind: str
    headers: bytes


@dataclass(frozen=True, slots=True)
class NewMessage:
    id: str
    mail_from: str
    smtputf8: bool
    body: bytes
    copies: tuple[NewCopy, ...]
    received_at: float
    upstream: str | None = None
    is_bounce: bool = False


@dataclass(frozen=True, slots=True)
class SpooledCopy:
    """A copy claimed for sending; body is shared by all copies of its message in one claim."""

    id: int
    message_id: str
    position: int
    kind: str
    recipients: tuple[str, ...]
    headers: bytes
    body: bytes
    mail_from: str
    smtputf8: bool
    upstream: str | None
    received_at: float
    attempts: int


@dataclass(frozen=True, slots=True)
class CopyResult:
    """What one attempt changed: recipients done, recipients failed for good, recipients to retry."""

    copy_id: int
    delivered: tuple[str, ...] = ()
    failed: tuple[tuple[str, str], ...] = ()  # (recipient, upstream reply)
    retry: tuple[str, ...] = ()
    next_attempt: float = 0.0
    last_reply: str | None = None
    counts_as_attempt: bool = True
    sent_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Failure:
    recipient: str
    reply: str
    headers: bytes


@dataclass(frozen=True, slots=True)
class SettledMessage:
    """A message with no copy left to send: what remains is to bounce its failures and forget it."""

    id: str
    mail_from: str
    upstream: str | None
    is_bounce: bool
    received_at: float
    failures: tuple[Failure, ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class CopyState:
    id: int
    position: int
    kind: str
    recipients: tuple[str, ...]
    state: str
    attempts: int
    next_attempt: float
    last_reply: str | None


@dataclass(frozen=True, slots=True)
class MessageSummary:
    id: str
    mail_from: str
    upstream: str | None
    is_bounce: bool
    received_at: float
    size: int
    copies: tuple[CopyState, ...]
    failures: tuple[Failure, ...]


class Spool(Protocol):
    async def store(self, message: NewMessage) -> None:
        """Commit the message and its copy plan; raises SpoolWriteError when it cannot."""

    async def recover(self) -> int:
        """After a restart: copies that were being sent become due again; returns how many.

        For one relay per spool. Relays sharing a database would skip this and let claims run out instead.
        """

    async def claim_due(
        self, now: float, limit: int, lease: float, known_bodies: Mapping[str, bytes]
    ) -> list[SpooledCopy]:
        """Up to limit due copies (queued ones, and claimed ones whose lease ran out), claimed until now + lease.

        Bodies already in memory (known_bodies, by message id) are used as they are, not read again.
        """

    async def release(self, copy_id: int, next_attempt: float) -> None:
        """Put a claimed copy back unsent, without counting an attempt."""

    async def postpone(self, now: float, until: float) -> None:
        """Copies due now wait until then (a rate limit is reached), without counting an attempt."""

    async def record(self, result: CopyResult) -> bool:
        """Store an attempt's outcome; True when its message has no copy left to send.

        A message delivered to everyone is forgotten at once; one with failures waits for retire().
        """

    async def next_due(self) -> float | None:
        """When the next copy is due (or a claim runs out), if any."""

    async def settled(self, message_id: str | None = None) -> list[SettledMessage]:
        """Messages (or the one named) with no copy left to send."""

    async def retire(self, message_id: str, replacement: NewMessage | None) -> None:
        """Forget a settled message, storing its bounce (if any) in the same transaction."""

    async def recent_sends(self, since: float) -> list[tuple[float, int]]:
        """(time, recipients) of the transactions sent since then, for rate limits across restarts."""

    async def summaries(self) -> list[MessageSummary]: ...

    async def summary(self, message_id: str) -> MessageSummary | None: ...

    async def retry_now(self, now: float, message_id: str | None) -> int:
        """Make queued copies (of one message, or all) due now; returns how many."""

    async def delete(self, message_id: str) -> bool: ...

    async def close(self) -> None: ...


_T = TypeVar("_T")


def _lines(recipients: Sequence[str]) -> str:
    return "\n".join(recipients)


def _split_lines(text: str) -> tuple[str, ...]:
    return tuple(text.split("\n")) if text else ()


class SqliteSpool:
    """The Spool in one SQLite file, used by one thread; safe to open from the CLI while the relay runs."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / DATABASE_NAME
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._pending_lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._folder = folder

    @property
    def label(self) -> str:
        return str(self.path.resolve())

    def _open(self) -> sqlite3.Connection:
        # Mail waiting to be sent is private, like Postfix's queue: only the relay's user may read it.
        self._folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():
            # SQLite gives its -wal and -shm files the mode of the database file.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA foreign_keys=ON")
        connection.executescript(_SCHEMA)
        return connection

    async def open(self) -> None:
        """Create or open the database; raises sqlite3.Error or OSError when it cannot."""
        loop = asyncio.get_running_loop()
        self._connection = await loop.run_in_executor(self._executor, self._open)

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            raise _closed()
        return self._connection

    async def _read(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._connection is None:
            raise _closed()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: work(self._db()))

    async def _write(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run work inside a transaction shared with every other write waiting at that moment."""
        if self._connection is None:
            raise _closed()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        with self._pending_lock:
            self._pending.append((work, future))
        await loop.run_in_executor(self._executor, self._commit_pending, loop)
        return await future

    def _commit_pending(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._pending_lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        db = self._db()
        results: list[Any] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for work, _ in batch:
                # A savepoint per caller: one caller's mistake does not undo the others' work.
                db.execute("SAVEPOINT one")
                try:
                    results.append(work(db))
                except sqlite3.IntegrityError as exc:
                    db.execute("ROLLBACK TO one")
                    results.append(exc)
                db.execute("RELEASE one")
            db.execute("COMMIT")
        except Exception as exc:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            error: Exception = _write_error(exc) if isinstance(exc, sqlite3.Error) else exc
            for _, future in batch:
                loop.call_soon_threadsafe(_settle_future, future, error)
            return
        for (_, future), result in zip(batch, results, strict=True):
            loop.call_soon_threadsafe(_settle_future, future, result)

    async def store(self, message: NewMessage) -> None:
        def insert(db: sqlite3.Connection) -> None:
            _insert(db, message)

        await self._write(insert)

    async def recover(self) -> int:
        def requeue(db: sqlite3.Connection) -> int:
            return db.execute(
                "UPDATE copies SET state = ?, next_attempt = 0 WHERE state = ?", (QUEUED, SENDING)
            ).rowcount

        return await self._write(requeue)

    async def claim_due(
        self, now: float, limit: int, lease: float, known_bodies: Mapping[str, bytes]
    ) -> list[SpooledCopy]:
        def claim(db: sqlite3.Connection) -> list[SpooledCopy]:
            rows = db.execute(
                "SELECT c.id, c.message_id, c.position, c.kind, c.recipients, c.headers, c.attempts,"
                " m.mail_from, m.smtputf8, m.upstream, m.received_at"
                " FROM copies c JOIN messages m ON m.id = c.message_id"
                " WHERE c.next_attempt <= ? ORDER BY c.next_attempt, c.id LIMIT ?",
                (now, limit),
            ).fetchall()
            if not rows:
                return []
            db.executemany(
                "UPDATE copies SET state = ?, next_attempt = ? WHERE id = ?",
                [(SENDING, now + lease, row[0]) for row in rows],
            )
            bodies = {
                message_id: known_bodies[message_id] for message_id in {row[1] for row in rows} & known_bodies.keys()
            }
            for message_id in {row[1] for row in rows} - bodies.keys():
                (body,) = db.execute("SELECT body FROM messages WHERE id = ?", (message_id,)).fetchone()
                bodies[message_id] = bytes(body)
            return [
                SpooledCopy(
                    id=row[0],
                    message_id=row[1],
                    position=row[2],
                    kind=row[3],
                    recipients=_split_lines(row[4]),
                    headers=bytes(row[5]),
                    body=bodies[row[1]],
                    mail_from=row[7],
                    smtputf8=bool(row[8]),
                    upstream=row[9],
                    received_at=row[10],
                    attempts=row[6],
                )
                for row in rows
            ]

        return await self._write(claim)

    async def release(self, copy_id: int, next_attempt: float) -> None:
        def put_back(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE copies SET state = ?, next_attempt = ? WHERE id = ?",
                (QUEUED, next_attempt, copy_id),
            )

        await self._write(put_back)

    async def postpone(self, now: float, until: float) -> None:
        def delay(db: sqlite3.Connection) -> None:
            db.execute("UPDATE copies SET next_attempt = ? WHERE state = ? AND next_attempt <= ?", (until, QUEUED, now))

        await self._write(delay)

    async def record(self, result: CopyResult) -> bool:
        def update(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT message_id, headers FROM copies WHERE id = ?", (result.copy_id,)).fetchone()
            if row is None:
                return False  # deleted with `queue delete` while it was being sent
            message_id, headers = row
            if result.delivered:
                db.execute(
                    "INSERT INTO sends (sent_at, recipients) VALUES (?, ?)", (result.sent_at, len(result.delivered))
                )
                db.execute("DELETE FROM sends WHERE sent_at < ?", (result.sent_at - _DAY,))
            db.executemany(
                "INSERT INTO failures (message_id, recipient, reply, headers) VALUES (?, ?, ?, ?)",
                [(message_id, recipient, reply, headers) for recipient, reply in result.failed],
            )
            if result.retry:
                db.execute(
                    "UPDATE copies SET state = ?, recipients = ?, next_attempt = ?, last_reply = ?,"
                    " attempts = attempts + ? WHERE id = ?",
                    (
                        QUEUED,
                        _lines(result.retry),
                        result.next_attempt,
                        result.last_reply,
                        int(result.counts_as_attempt),
                        result.copy_id,
                    ),
                )
                return False
            db.execute("DELETE FROM copies WHERE id = ?", (result.copy_id,))
            left = db.execute("SELECT 1 FROM copies WHERE message_id = ? LIMIT 1", (message_id,)).fetchone()
            if left is not None:
                return False
            failed = db.execute("SELECT 1 FROM failures WHERE message_id = ? LIMIT 1", (message_id,)).fetchone()
            if failed is None:
                # Every copy delivered: nothing to bounce, so the message goes now, in the same commit.
                db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
            return True

        return await self._write(update)

    async def next_due(self) -> float | None:
        def earliest(db: sqlite3.Connection) -> float | None:
            (value,) = db.execute("SELECT MIN(next_attempt) FROM copies").fetchone()
            return None if value is None else float(value)

        return await self._read(earliest)

    async def settled(self, message_id: str | None = None) -> list[SettledMessage]:
        def find(db: sqlite3.Connection) -> list[SettledMessage]:
            query = (
                "SELECT id, mail_from, upstream, is_bounce, received_at, body FROM messages m"
                " WHERE NOT EXISTS (SELECT 1 FROM copies c WHERE c.message_id = m.id)"
            )
            parameters: tuple[str, ...] = ()
            if message_id is not None:
                query += " AND m.id = ?"
                parameters = (message_id,)
            settled = []
            for row in db.execute(query, parameters).fetchall():
                failures = tuple(
                    Failure(recipient, reply, bytes(headers))
                    for recipient, reply, headers in db.execute(
                        "SELECT recipient, reply, headers FROM failures WHERE message_id = ? ORDER BY rowid",
                        (row[0],),
                    )
                )
                settled.append(SettledMessage(row[0], row[1], row[2], bool(row[3]), row[4], failures, bytes(row[5])))
            return settled

        return await self._read(find)

    async def retire(self, message_id: str, replacement: NewMessage | None) -> None:
        def swap(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
            if replacement is not None:
                _insert(db, replacement)

        await self._write(swap)

    async def recent_sends(self, since: float) -> list[tuple[float, int]]:
        def sends(db: sqlite3.Connection) -> list[tuple[float, int]]:
            rows = db.execute("SELECT sent_at, recipients FROM sends WHERE sent_at >= ? ORDER BY sent_at", (since,))
            return [(float(at), int(count)) for at, count in rows]

        return await self._read(sends)

    async def summaries(self) -> list[MessageSummary]:
        return await self._read(lambda db: _summaries(db, None))

    async def summary(self, message_id: str) -> MessageSummary | None:
        found = await self._read(lambda db: _summaries(db, message_id))
        return found[0] if found else None

    async def retry_now(self, now: float, message_id: str | None) -> int:
        def make_due(db: sqlite3.Connection) -> int:
            if message_id is None:
                return db.execute("UPDATE copies SET next_attempt = ? WHERE state = ?", (now, QUEUED)).rowcount
            return db.execute(
                "UPDATE copies SET next_attempt = ? WHERE state = ? AND message_id = ?", (now, QUEUED, message_id)
            ).rowcount

        return await self._write(make_due)

    async def delete(self, message_id: str) -> bool:
        def remove(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM messages WHERE id = ?", (message_id,)).rowcount > 0

        return await self._write(remove)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self._connection is not None:
            await loop.run_in_executor(self._executor, self._connection.close)
            self._connection = None
        self._executor.shutdown(wait=False)


def _settle_future(future: asyncio.Future[Any], result: Any) -> None:
    if future.cancelled():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _insert(db: sqlite3.Connection, message: NewMessage) -> None:
    db.execute(
        "INSERT INTO messages (id, mail_from, smtputf8, upstream, is_bounce, received_at, body)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            message.id,
            message.mail_from,
            int(message.smtputf8),
            message.upstream,
            int(message.is_bounce),
            message.received_at,
            message.body,
        ),
    )
    db.executemany(
        "INSERT INTO copies (message_id, position, kind, recipients, headers, state, next_attempt)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (message.id, position, copy.kind, _lines(copy.recipients), copy.headers, QUEUED, message.received_at)
            for position, copy in enumerate(message.copies)
        ],
    )


def _summaries(db: sqlite3.Connection, message_id: str | None) -> list[MessageSummary]:
    query = "SELECT id, mail_from, upstream, is_bounce, received_at, length(body) FROM messages"
    parameters: tuple[str, ...] = ()
    if message_id is not None:
        query += " WHERE id = ?"
        parameters = (message_id,)
    summaries = []
    for row in db.execute(query + " ORDER BY received_at, id", parameters).fetchall():
        copies = tuple(
            CopyState(c[0], c[1], c[2], _split_lines(c[3]), c[4], c[5], c[6], c[7])
            for c in db.execute(
                "SELECT id, position, kind, recipients, state, attempts, next_attempt, last_reply"
                " FROM copies WHERE message_id = ? ORDER BY position, id",
                (row[0],),
            )
        )
        failures = tuple(
            Failure(recipient, reply, bytes(headers))
            for recipient, reply, headers in db.execute(
                "SELECT recipient, reply, headers FROM failures WHERE message_id = ? ORDER BY rowid", (row[0],)
            )
        )
        summaries.append(MessageSummary(row[0], row[1], row[2], bool(row[3]), row[4], row[5], copies, failures))
    return summaries
