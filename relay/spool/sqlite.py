"""Durable storage of accepted messages and the state of each outgoing copy.

Each message's body is stored once; each copy is a row holding only its own header bytes, recipients
and delivery state. SqliteSpool implements the Spool interface (relay/spool/interface.py) in one file:
WAL mode, short transactions, and group commit (one fsync makes every commit made before it durable).

What must survive a power cut is fsynced before the caller hears of it: a new message (the client's
250) and a bounce. Claims and delivery results are not: like Postfix, which does not fsync a queue
file's removal after delivery, losing them to a power cut can only make a copy go again (at least
once, never lost). A crash of the relay alone loses nothing committed, fsynced or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TypeVar

from relay.core.policy import CopyKind
from relay.core.replies import Reply
from relay.spool.history import ConsoleQueries, count_attempt, mark_claimed, mark_discarded
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
    closed_spool_error,
)
from relay.spool.rows import insert_message, lines, split_lines
from relay.spool.schema import prepare_schema
from relay.spool.wal import WalSyncer, write_error

DATABASE_NAME = "spool.db"
# How long a write waits for another process (a worker, the queue command) to release the database.
BUSY_TIMEOUT = 10.0

_DAY = 86_400.0


_T = TypeVar("_T")


class SqliteSpool(ConsoleQueries):
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
        self._syncer: WalSyncer | None = None
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
        prepare_schema(connection)
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
        self._syncer = WalSyncer(self.path, self._wal, asyncio.get_running_loop())
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
            raise write_error(exc) from exc
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
            return insert_message(db, message)

        return await self._write(insert, committed=committed)

    async def recover(self) -> int:
        def requeue(db: sqlite3.Connection) -> int:
            return db.execute(
                "UPDATE copies SET state = ?, next_attempt = 0 WHERE state = ?", (CopyState.QUEUED, CopyState.SENDING)
            ).rowcount

        return await self._write(requeue)

    async def claim_due(self, now: float, limit: int, lease: float) -> list[SpooledCopy]:
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
                [(CopyState.SENDING, now + lease, row[0]) for row in rows],
            )
            mark_claimed(db, [(row[1], row[2]) for row in rows])
            return [
                SpooledCopy(
                    id=row[0],
                    message_id=row[1],
                    position=row[2],
                    kind=CopyKind(row[3]),
                    recipients=split_lines(row[4]),
                    headers=bytes(row[5]),
                    mail_from=row[7],
                    smtputf8=bool(row[8]),
                    upstream=row[9],
                    received_at=row[10],
                    attempts=row[6],
                )
                for row in rows
            ]

        return await self._write(claim, durable=False)

    async def bodies(self, message_ids: Collection[str]) -> dict[str, bytes]:
        def read(db: sqlite3.Connection) -> dict[str, bytes]:
            found = {}
            for message_id in message_ids:
                row = db.execute("SELECT body FROM messages WHERE id = ?", (message_id,)).fetchone()
                if row is not None:
                    found[message_id] = bytes(row[0])
            return found

        return await self._read(read)

    async def release(self, copy_id: int, next_attempt: float) -> None:
        def put_back(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE copies SET state = ?, next_attempt = ? WHERE id = ?",
                (CopyState.QUEUED, next_attempt, copy_id),
            )

        await self._write(put_back, durable=False)

    async def postpone(self, now: float, until: float) -> None:
        def delay(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE copies SET next_attempt = ? WHERE state = ? AND next_attempt <= ?",
                (until, CopyState.QUEUED, now),
            )

        await self._write(delay, durable=False)

    async def record(self, result: CopyResult) -> Progress:
        return await self._write(lambda db: _record(db, result), durable=False)

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
                failures = _failures(db, row[0])
                settled.append(SettledMessage(row[0], row[1], row[2], bool(row[3]), row[4], failures, bytes(row[5])))
            return settled

        return await self._read(find)

    async def retire(self, message_id: str, replacement: NewMessage | None) -> None:
        def swap(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
            if replacement is not None:
                insert_message(db, replacement)

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
                return db.execute(
                    "UPDATE copies SET next_attempt = ? WHERE state = ?", (now, CopyState.QUEUED)
                ).rowcount
            return db.execute(
                "UPDATE copies SET next_attempt = ? WHERE state = ? AND message_id = ?",
                (now, CopyState.QUEUED, message_id),
            ).rowcount

        return await self._write(make_due)

    async def delete(self, message_id: str) -> bool:
        def remove(db: sqlite3.Connection) -> bool:
            mark_discarded(db, message_id)
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


def _summaries(db: sqlite3.Connection, message_id: str | None) -> list[MessageSummary]:
    query = "SELECT id, mail_from, upstream, is_bounce, received_at, length(body) FROM messages"
    parameters: tuple[str, ...] = ()
    if message_id is not None:
        query += " WHERE id = ?"
        parameters = (message_id,)
    summaries = []
    for row in db.execute(query + " ORDER BY received_at, id", parameters).fetchall():
        copies = tuple(
            CopySummary(
                c[0],
                c[1],
                CopyKind(c[2]),
                split_lines(c[3]),
                CopyState(c[4]),
                c[5],
                c[6],
                None if c[7] is None else Reply(c[7], c[8], c[9]),
            )
            for c in db.execute(
                "SELECT id, position, kind, recipients, state, attempts, next_attempt, last_code, last_enhanced,"
                " last_text FROM copies WHERE message_id = ? ORDER BY position, id",
                (row[0],),
            )
        )
        summaries.append(
            MessageSummary(row[0], row[1], row[2], bool(row[3]), row[4], row[5], copies, _failures(db, row[0]))
        )
    return summaries


def _failures(db: sqlite3.Connection, message_id: str) -> tuple[Failure, ...]:
    return tuple(
        Failure(recipient, Reply(code, enhanced, text), bytes(headers))
        for recipient, code, enhanced, text, headers in db.execute(
            "SELECT recipient, code, enhanced, text, headers FROM failures WHERE message_id = ? ORDER BY rowid",
            (message_id,),
        )
    )


def _record(db: sqlite3.Connection, result: CopyResult) -> Progress:
    row = db.execute(
        "SELECT c.message_id, c.headers, c.position, m.received_at, m.upstream"
        " FROM copies c JOIN messages m ON m.id = c.message_id WHERE c.id = ?",
        (result.copy_id,),
    ).fetchone()
    if row is None:
        return Progress.SENDING  # deleted with `queue delete` while it was being sent
    message_id, headers, position, received_at, upstream = row
    count_attempt(db, result, message_id, position, received_at, upstream)
    if result.delivered:
        db.execute("INSERT INTO sends (sent_at, recipients) VALUES (?, ?)", (result.sent_at, len(result.delivered)))
        db.execute("DELETE FROM sends WHERE sent_at < ?", (result.sent_at - _DAY,))
    db.executemany(
        "INSERT INTO failures (message_id, recipient, code, enhanced, text, headers) VALUES (?, ?, ?, ?, ?, ?)",
        [
            (message_id, recipient, reply.code, reply.enhanced, reply.text, headers)
            for recipient, reply in result.failed
        ],
    )
    if result.retry:
        last = result.last_reply
        db.execute(
            "UPDATE copies SET state = ?, recipients = ?, next_attempt = ?,"
            " last_code = ?, last_enhanced = ?, last_text = ?, attempts = attempts + ? WHERE id = ?",
            (
                CopyState.QUEUED,
                lines(result.retry),
                result.next_attempt,
                *((None, None, None) if last is None else (last.code, last.enhanced, last.text)),
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
