"""Making the spool's commits durable: a thread that fsyncs SQLite's write-ahead log for every commit that
waits (group commit) and checkpoints it; and what a failed write or fsync tells the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from pathlib import Path

from relay.spool.interface import SpoolWriteError

# How often the WAL is copied into the database (a checkpoint), so that it can start over.
CHECKPOINT_INTERVAL = 1.0


def write_error(exc: sqlite3.Error | OSError) -> SpoolWriteError:
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL:
        return SpoolWriteError(452, "4.3.1", "Insufficient system storage: the relay's spool is full; try again later")
    return SpoolWriteError(451, "4.3.0", f"The relay cannot store the message right now ({exc}); try again later")


class WalSyncer:
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
                future.set_exception(write_error(error))
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
