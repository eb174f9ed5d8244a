"""Durable storage of accepted messages and the state of each outgoing copy.

Each message's body is stored once; each copy is a row holding only its own header bytes, recipients
and delivery state. Delivery logic talks to the Spool protocol only, so a shared database could back
several relays later. SqliteSpool is the embedded implementation: WAL mode, short transactions, and
group commit (one fsync makes every commit made before it durable).

What must survive a power cut is fsynced before the caller hears of it: a new message (the client's
250) and a bounce. Claims and delivery results are not: like Postfix, which does not fsync a queue
file's removal after delivery, losing them to a power cut can only make a copy go again (at least
once, never lost). A crash of the relay alone loses nothing committed, fsynced or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from relay.config import Config, ConfigError
from relay.errors import SmtpReply

DATABASE_NAME = "spool.db"
# How long a write waits for another process (a worker, the queue command) to release the database.
BUSY_TIMEOUT = 10.0
# Bodies larger than this are written into the database in slices of this size.
BLOB_SLICE = 1024 * 1024
# How often the WAL is copied into the database (a checkpoint), so that it can start over.
CHECKPOINT_INTERVAL = 1.0

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
CREATE INDEX IF NOT EXISTS failures_message ON failures (message_id);
CREATE INDEX IF NOT EXISTS sends_time ON sends (sent_at);
"""

QUEUED = "queued"
SENDING = "sending"
_DAY = 86_400.0


def new_queue_id() -> str:
    return secrets.token_hex(6).upper()


class SpoolWriteError(SmtpReply):
    """The spool could not commit (disk full, read-only, I/O error): the client must try again later."""


def closed_spool_error() -> SpoolWriteError:
    # A client still in a session while the relay stops (SIGTERM): it keeps the message and tries again.
    return SpoolWriteError(451, "4.3.2", "The relay is shutting down; try again later")


def _write_error(exc: sqlite3.Error | OSError) -> SpoolWriteError:
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL:
        return SpoolWriteError(452, "4.3.1", "Insufficient system storage: the relay's spool is full; try again later")
    return SpoolWriteError(451, "4.3.0", f"The relay cannot store the message right now ({exc}); try again later")


@dataclass(frozen=True, slots=True)
class NewCopy:
    recipients: tuple[str, ...]
    kind: str
    headers: bytes
    # Non-zero: stored already claimed until then, for a first attempt sent from memory at once.
    claimed_until: float = 0.0


class Progress(enum.Enum):
    """Where a message stands after an attempt's result is stored."""

    SENDING = "sending"  # copies left to send
    DELIVERED = "delivered"  # every copy delivered: the message is already forgotten
    SETTLED = "settled"  # nothing left to send, failures to bounce: retire() comes next


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
    @property
    def label(self) -> str:
        """Where the spool is, for logs and the queue commands."""

    async def open(self) -> None:
        """Open (and create or migrate) the store; SpoolWriteError, sqlite3.Error or OSError when it cannot."""

    async def store(
        self, message: NewMessage, committed: Callable[[tuple[int, ...]], None] | None = None
    ) -> tuple[int, ...]:
        """Commit the message and its copy plan durably; the copies' ids, in order. SpoolWriteError if it cannot.

        committed(ids), if given, runs as soon as the message is committed, while it is being made durable.
        """

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

    async def record(self, result: CopyResult) -> Progress:
        """Store an attempt's outcome and say where its message stands.

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


def join_lines(recipients: Sequence[str]) -> str:
    return "\n".join(recipients)


def split_lines(text: str) -> tuple[str, ...]:
    return tuple(text.split("\n")) if text else ()


class _WalSyncer:
    """A thread that fsyncs the WAL as soon as a commit waits for it, and checkpoints it every second.

    Commits made while an fsync runs share the next one (group commit), which starts at once in this
    thread, without a round trip through the event loop.
    """

    def __init__(self, database: Path, wal: int, loop: asyncio.AbstractEventLoop) -> None:
        self._database = database
        self._wal = wal
        self._loop = loop
        self._condition = threading.Condition()
        self._requested = 0  # the latest commit waiting for an fsync (shared with the thread)
        self._stopping = False
        self._synced = 0  # the latest commit known to be on disk (event loop only)
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []  # (commit, future), event loop only
        self._thread = threading.Thread(target=self._run, name="spool-sync", daemon=True)
        self._thread.start()

    async def sync(self, commit: int) -> None:
        """Wait until commit number `commit` (and every one before it) is on disk."""
        if commit <= self._synced:
            return
        future = self._loop.create_future()
        self._waiters.append((commit, future))
        with self._condition:
            self._requested = max(self._requested, commit)
            self._condition.notify()
        await future

    def _synced_up_to(self, commit: int, error: OSError | None) -> None:
        self._synced = max(self._synced, commit)
        waiting = []
        for waiter_commit, future in self._waiters:
            if waiter_commit > commit:
                waiting.append((waiter_commit, future))
            elif future.done():
                continue  # the client went away meanwhile
            elif error is None:
                future.set_result(None)
            else:
                future.set_exception(_write_error(error))
        self._waiters = waiting

    def _run(self) -> None:
        synced = 0
        last_checkpoint = time.monotonic()
        checkpointer = sqlite3.connect(self._database, isolation_level=None, timeout=0)
        try:
            while True:
                with self._condition:
                    if self._requested <= synced and not self._stopping:
                        self._condition.wait(CHECKPOINT_INTERVAL)
                    target = self._requested
                    stopping = self._stopping
                if target > synced:
                    error: OSError | None = None
                    try:
                        os.fsync(self._wal)
                    except OSError as exc:
                        error = exc
                    synced = target
                    self._loop.call_soon_threadsafe(self._synced_up_to, target, error)
                if stopping:
                    return
                if time.monotonic() - last_checkpoint >= CHECKPOINT_INTERVAL:
                    last_checkpoint = time.monotonic()
                    # PASSIVE never waits for or blocks a writer; with nothing new in the WAL it does nothing.
                    with contextlib.suppress(sqlite3.Error):
                        checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            checkpointer.close()

    def stop(self) -> None:
        """Finish the fsync asked for, then end the thread."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
        self._thread.join()


class SqliteSpool:
    """The Spool in one SQLite file; safe to open from the CLI and from several workers at once.

    Statements run on the event loop's thread: each takes microseconds (the pages are in the OS cache),
    so they cost less than handing each one to a thread and back. What takes time, the fsync that makes
    a commit durable, runs in a thread: the database is in synchronous=NORMAL, where a commit writes the
    WAL without syncing it, and a durable write then waits for an fsync of the WAL, which is what
    synchronous=FULL does at every commit. No write lock is held during an fsync, so other workers
    keep writing.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / DATABASE_NAME
        self._folder = folder
        self._connection: sqlite3.Connection | None = None
        self._wal: int | None = None  # a descriptor of the -wal file, for fsync
        self._syncer: _WalSyncer | None = None
        self._commits = 0  # durable commits made so far

    @property
    def label(self) -> str:
        return str(self.path.resolve())

    def _open(self) -> sqlite3.Connection:
        # Mail waiting to be sent is private, like Postfix's queue: only the relay's user may read it.
        self._folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():
            # SQLite gives its -wal and -shm files the mode of the database file.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        # timeout=0: a busy database is waited for without blocking the event loop (see _locked).
        connection = sqlite3.connect(self.path, isolation_level=None, timeout=0)
        connection.execute("PRAGMA busy_timeout=5000")  # only for opening: the schema and WAL set-up
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        # Checkpoints (which fsync) run in the sync thread instead of inside some commit.
        connection.execute("PRAGMA wal_autocheckpoint=0")
        connection.execute("PRAGMA foreign_keys=ON")
        connection.executescript(_SCHEMA)
        connection.execute("PRAGMA busy_timeout=0")
        return connection

    async def open(self) -> None:
        """Create or open the database; raises sqlite3.Error or OSError when it cannot."""
        self._connection = self._open()
        # The schema write created the -wal file: sync its directory entry once, and keep it open to sync it.
        self._wal = os.open(f"{self.path}-wal", os.O_RDWR)
        directory = os.open(self._folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self._syncer = _WalSyncer(self.path, self._wal, asyncio.get_running_loop())
        await self._syncer.sync(self._commit_number())

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            raise closed_spool_error()
        return self._connection

    def _commit_number(self) -> int:
        self._commits += 1
        return self._commits

    async def _locked(self, attempt: Callable[[], _T]) -> _T:
        """Run attempt, waiting (without blocking the loop) while another process holds the database."""
        deadline = asyncio.get_running_loop().time() + BUSY_TIMEOUT
        while True:
            try:
                return attempt()
            except sqlite3.OperationalError as exc:
                busy = getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
                if not busy or asyncio.get_running_loop().time() > deadline:
                    raise
            # Another worker's transactions hold the lock for microseconds: look again soon.
            await asyncio.sleep(0.001)

    async def _read(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        db = self._db()
        return await self._locked(lambda: work(db))

    async def _write(
        self,
        work: Callable[[sqlite3.Connection], _T],
        durable: bool = True,
        committed: Callable[[_T], None] | None = None,
    ) -> _T:
        """Run work in a transaction of its own; durable: return only once it is on disk.

        committed(result) runs right after the commit, before the wait for the disk.

        An IntegrityError from work is raised as it is (the caller's mistake); other errors become
        SpoolWriteError (disk full, I/O error): the client is told to try again later.
        """
        db = self._db()

        def transaction() -> _T:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            return result

        try:
            result = await self._locked(transaction)
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise _write_error(exc) from exc
        if committed is not None:
            committed(result)
        if durable:
            if self._syncer is None:
                raise closed_spool_error()
            await self._syncer.sync(self._commit_number())
        return result

    async def store(
        self, message: NewMessage, committed: Callable[[tuple[int, ...]], None] | None = None
    ) -> tuple[int, ...]:
        def insert(db: sqlite3.Connection) -> tuple[int, ...]:
            return _insert(db, message)

        return await self._write(insert, committed=committed)

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
                    recipients=split_lines(row[4]),
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

        return await self._write(claim, durable=False)

    async def release(self, copy_id: int, next_attempt: float) -> None:
        def put_back(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE copies SET state = ?, next_attempt = ? WHERE id = ?",
                (QUEUED, next_attempt, copy_id),
            )

        await self._write(put_back, durable=False)

    async def postpone(self, now: float, until: float) -> None:
        def delay(db: sqlite3.Connection) -> None:
            db.execute("UPDATE copies SET next_attempt = ? WHERE state = ? AND next_attempt <= ?", (until, QUEUED, now))

        await self._write(delay, durable=False)

    async def record(self, result: CopyResult) -> Progress:
        def update(db: sqlite3.Connection) -> Progress:
            row = db.execute("SELECT message_id, headers FROM copies WHERE id = ?", (result.copy_id,)).fetchone()
            if row is None:
                return Progress.SENDING  # deleted with `queue delete` while it was being sent
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
                        join_lines(result.retry),
                        result.next_attempt,
                        result.last_reply,
                        int(result.counts_as_attempt),
                        result.copy_id,
                    ),
                )
                return Progress.SENDING
            db.execute("DELETE FROM copies WHERE id = ?", (result.copy_id,))
            left = db.execute("SELECT 1 FROM copies WHERE message_id = ? LIMIT 1", (message_id,)).fetchone()
            if left is not None:
                return Progress.SENDING
            failed = db.execute("SELECT 1 FROM failures WHERE message_id = ? LIMIT 1", (message_id,)).fetchone()
            if failed is not None:
                return Progress.SETTLED
            # Every copy delivered: nothing to bounce, so the message goes now, in the same commit.
            db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
            return Progress.DELIVERED

        return await self._write(update, durable=False)

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
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        syncer, self._syncer = self._syncer, None
        if syncer is not None:
            await asyncio.get_running_loop().run_in_executor(None, syncer.stop)
        if self._wal is not None:
            os.close(self._wal)
            self._wal = None


_INSERT_MESSAGE = (
    "INSERT INTO messages (id, mail_from, smtputf8, upstream, is_bounce, received_at, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
# The same, with a body of zeros of the given length to write into afterwards.
_INSERT_MESSAGE_EMPTY_BODY = _INSERT_MESSAGE.replace("?)", "zeroblob(?))")


def _insert(db: sqlite3.Connection, message: NewMessage) -> tuple[int, ...]:
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
                join_lines(copy.recipients),
                copy.headers,
                SENDING if copy.claimed_until else QUEUED,
                copy.claimed_until or message.received_at,
            )
            for position, copy in enumerate(message.copies)
        ],
    )
    rows = db.execute("SELECT id FROM copies WHERE message_id = ? ORDER BY position", (message.id,))
    return tuple(row[0] for row in rows)


def _summaries(db: sqlite3.Connection, message_id: str | None) -> list[MessageSummary]:
    query = "SELECT id, mail_from, upstream, is_bounce, received_at, length(body) FROM messages"
    parameters: tuple[str, ...] = ()
    if message_id is not None:
        query += " WHERE id = ?"
        parameters = (message_id,)
    summaries = []
    for row in db.execute(query + " ORDER BY received_at, id", parameters).fetchall():
        copies = tuple(
            CopyState(c[0], c[1], c[2], split_lines(c[3]), c[4], c[5], c[6], c[7])
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


def build_spool(config: Config) -> Spool:
    """The PostgreSQL spool when spool.url is set, else the SQLite file in spool.path."""
    if config.spool.url is None:
        return SqliteSpool(config.spool.path)
    try:
        from relay.postgres_spool import PostgresSpool
    except ImportError as exc:
        raise ConfigError(
            f"spool.url is set, but the PostgreSQL driver is missing ({exc.name}): "
            "pip install 'privacy-relay[postgres]'"
        ) from None
    password = config.spool_password.get_secret_value() if config.spool_password else None
    return PostgresSpool(config.spool.url, password)
