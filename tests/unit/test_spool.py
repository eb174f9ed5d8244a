"""The spools: one body per message, one row per copy, claims and results; SQLite's group commits,
recovery and write errors. Tests taking `spool` run against SQLite and PostgreSQL alike."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
import time

import asyncpg
import pytest

from bench.postgres import PASSWORD
from relay.core.policy import CopyKind
from relay.core.replies import Reply
from relay.core.rewrite import OutgoingCopy
from relay.spool.interface import CopyResult, CopyState, NewMessage, Progress, Spool, SpoolWriteError
from relay.spool.postgres import PostgresSpool
from relay.spool.rows import BLOB_SLICE
from relay.spool.sqlite import SqliteSpool

QUEUED, SENDING = CopyState.QUEUED, CopyState.SENDING

BODY = b"Hello.\r\n" * 100


def message(
    message_id: str, recipients: list[str], received_at: float = 1000.0, mail_from: str = "s@x.test"
) -> NewMessage:
    return NewMessage(
        id=message_id,
        mail_from=mail_from,
        smtputf8=False,
        body=BODY,
        copies=tuple(OutgoingCopy((r,), CopyKind.SINGLE, f"To: {r}\r\n\r\n".encode(), BODY) for r in recipients),
        received_at=received_at,
    )


async def rows(spool: Spool, query: str) -> list[tuple]:
    """The query's rows straight from the spool's database (the same SQL reads both)."""
    if isinstance(spool, SqliteSpool):
        with sqlite3.connect(spool.path) as db:
            return db.execute(query).fetchall()
    assert isinstance(spool, PostgresSpool)
    connection = await asyncpg.connect(spool.label, password=PASSWORD)
    try:
        # Recipients are an array in PostgreSQL and lines in SQLite: compared as lines.
        return [
            tuple("\n".join(value) if isinstance(value, list) else value for value in row)
            for row in await connection.fetch(query)
        ]
    finally:
        await connection.close()


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files fsynced, by name: a power cut cannot be staged here, so the syncs themselves are watched."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


async def test_the_database_is_in_wal_mode(sqlite_spool: SqliteSpool) -> None:
    assert await rows(sqlite_spool, "PRAGMA journal_mode") == [("wal",)]


async def test_a_new_message_is_fsynced_before_store_returns_and_a_result_is_not(
    sqlite_spool: SqliteSpool, fsyncs: list[str]
) -> None:
    await sqlite_spool.store(message("M1", ["a@x.test", "b@x.test"]))
    assert fsyncs == [f"{sqlite_spool.path}-wal"]
    first, _ = await sqlite_spool.claim_due(1000.0, 10, lease=60)
    await sqlite_spool.record(CopyResult(first.id, delivered=first.recipients, sent_at=1001.0))
    # Lost to a power cut, a claim or a result only makes a copy go again.
    assert fsyncs == [f"{sqlite_spool.path}-wal"]
    await sqlite_spool.retire("M1", message("BOUNCE", ["s@x.test"]))
    assert len(fsyncs) in (1, 2)  # not one per store


async def test_the_spool_is_readable_by_the_relays_user_only(sqlite_spool: SqliteSpool) -> None:
    await sqlite_spool.store(message("M1", ["a@x.test"]))
    assert sqlite_spool.path.parent.stat().st_mode & 0o777 == 0o700
    for name in ("spool.db", "spool.db-wal", "spool.db-shm"):
        assert (sqlite_spool.path.parent / name).stat().st_mode & 0o777 == 0o600


async def test_a_message_is_stored_once_and_each_copy_holds_only_its_headers(spool: Spool) -> None:
    await spool.store(message("M1", ["a@x.test", "b@x.test", "c@x.test"]))
    assert await rows(spool, "SELECT count(*), sum(length(body)) FROM messages") == [(1, len(BODY))]
    copies = await rows(spool, "SELECT recipients, headers, state FROM copies ORDER BY position")
    assert copies == [(f"{r}@x.test", f"To: {r}@x.test\r\n\r\n".encode(), QUEUED) for r in "abc"]


async def test_claimed_copies_leave_their_body_to_be_read_once_per_message(spool: Spool) -> None:
    await spool.store(message("M1", ["a@x.test", "b@x.test"]))
    claimed = await spool.claim_due(1000.0, 10, lease=60)
    assert [c.recipients for c in claimed] == [("a@x.test",), ("b@x.test",)]
    assert await spool.bodies({c.message_id for c in claimed}) == {"M1": BODY}
    assert await rows(spool, "SELECT DISTINCT state, next_attempt FROM copies") == [(SENDING, 1060.0)]
    assert await spool.claim_due(1000.0, 10, lease=60) == []
    # A claim whose result was never stored runs out, and the copy is due again.
    assert len(await spool.claim_due(1060.0, 10, lease=60)) == 2
    # A message deleted since its claim has no body left to send.
    await spool.delete("M1")
    assert await spool.bodies({"M1"}) == {}


async def test_copies_are_due_only_from_their_next_attempt(spool: Spool) -> None:
    await spool.store(message("M1", ["a@x.test"], received_at=2000.0))
    assert await spool.claim_due(1999.0, 10, lease=60) == []
    assert await spool.next_due() == 2000.0


async def test_a_message_settles_when_its_last_copy_is_done_and_its_failures_are_kept(spool: Spool) -> None:
    await spool.store(message("M1", ["a@x.test", "b@x.test"]))
    first, second = await spool.claim_due(1000.0, 10, lease=60)
    assert await spool.record(CopyResult(first.id, delivered=first.recipients, sent_at=1001.0)) is Progress.SENDING
    assert await spool.settled() == []
    failed = CopyResult(second.id, failed=(("b@x.test", Reply(550, "5.1.1", "No such user")),), sent_at=1001.0)
    assert await spool.record(failed) is Progress.SETTLED
    (settled,) = await spool.settled()
    assert settled.id == "M1" and settled.body == BODY
    assert [(f.recipient, f.reply, f.headers) for f in settled.failures] == [
        ("b@x.test", Reply(550, "5.1.1", "No such user"), b"To: b@x.test\r\n\r\n")
    ]
    await spool.retire("M1", message("BOUNCE", ["s@x.test"]))
    assert await rows(spool, "SELECT id FROM messages") == [("BOUNCE",)]
    assert await rows(spool, "SELECT count(*) FROM failures") == [(0,)]


async def test_a_message_delivered_to_everyone_is_forgotten_after_its_last_result(spool: Spool) -> None:
    await spool.store(message("M1", ["a@x.test", "b@x.test"]))
    first, second = await spool.claim_due(1000.0, 10, lease=60)
    assert await spool.record(CopyResult(first.id, delivered=first.recipients, sent_at=1001.0)) is Progress.SENDING
    assert await spool.record(CopyResult(second.id, delivered=second.recipients, sent_at=1001.0)) is (
        Progress.DELIVERED
    )
    # SQLite forgets it in the same transaction; PostgreSQL in the next statement, within PURGE_DELAY.
    for _ in range(150):
        if await rows(spool, "SELECT count(*) FROM messages") == [(0,)]:
            break
        await asyncio.sleep(0.02)
    assert await rows(spool, "SELECT count(*) FROM messages") == [(0,)]


async def test_copies_stored_claimed_are_not_claimed_again_until_their_lease_runs_out(spool: Spool) -> None:
    plan = message("M1", ["a@x.test", "b@x.test"])
    claimed = dataclasses.replace(plan, claimed=1, claimed_until=4600.0)
    ids = await spool.store(claimed)
    assert await rows(spool, "SELECT id, state, next_attempt FROM copies ORDER BY position") == [
        (ids[0], SENDING, 4600.0),
        (ids[1], QUEUED, 1000.0),
    ]
    assert [c.id for c in await spool.claim_due(1000.0, 10, lease=9000)] == [ids[1]]
    assert [c.id for c in await spool.claim_due(4600.0, 10, lease=60)] == [ids[0]]


async def test_a_body_larger_than_a_slice_is_stored_whole(spool: Spool) -> None:
    body = os.urandom(BLOB_SLICE * 2 + 12345)
    plan = message("BIG", ["a@x.test"])
    await spool.store(dataclasses.replace(plan, body=body))
    (copy,) = await spool.claim_due(1000.0, 10, lease=60)
    assert await spool.bodies({copy.message_id}) == {"BIG": body}


async def test_a_deferred_copy_keeps_only_the_recipients_left_and_counts_the_attempt(spool: Spool) -> None:
    bcc_copy = OutgoingCopy(
        ("a@x.test", "b@x.test", "c@x.test"), CopyKind.UNDISCLOSED, b"To: undisclosed-recipients:;\r\n\r\n", BODY
    )
    await spool.store(NewMessage("M1", "s@x.test", False, BODY, (bcc_copy,), 1000.0))
    (copy,) = await spool.claim_due(1000.0, 10, lease=60)
    result = CopyResult(
        copy.id,
        delivered=("a@x.test",),
        failed=(("b@x.test", Reply(550, "5.1.1", "unknown")),),
        retry=("c@x.test",),
        next_attempt=1030.0,
        last_reply=Reply(451, "4.3.0", "later"),
        sent_at=1001.0,
    )
    assert await spool.record(result) is Progress.SENDING
    assert await rows(
        spool, "SELECT recipients, state, attempts, next_attempt, last_code, last_enhanced, last_text FROM copies"
    ) == [("c@x.test", QUEUED, 1, 1030.0, 451, "4.3.0", "later")]
    assert await spool.recent_sends(0) == [(1001.0, 1)]


async def test_recover_makes_copies_that_were_being_sent_due_at_once(sqlite_spool: SqliteSpool) -> None:
    await sqlite_spool.store(message("M1", ["a@x.test", "b@x.test", "c@x.test"]))
    await sqlite_spool.claim_due(1000.0, 2, lease=3600)
    assert await sqlite_spool.recover() == 2
    assert len(await sqlite_spool.claim_due(1000.0, 10, lease=60)) == 3


async def test_a_hybrid_first_attempt_can_start_once_committed_while_the_fsync_runs(
    sqlite_spool: SqliteSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[object] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ids = await sqlite_spool.store(message("M1", ["a@x.test", "b@x.test"]), committed=lambda ids: events.append(ids))
    assert events == [ids, "fsync"] and len(ids) == 2


async def test_stores_made_during_an_fsync_share_the_next_one(
    sqlite_spool: SqliteSpool, fsyncs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    counting_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.2)  # a slow disk: the other 49 stores commit while this one syncs
        counting_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    await asyncio.gather(*(sqlite_spool.store(message(f"M{n}", [f"r{n}@x.test"])) for n in range(50)))
    assert len(fsyncs) in (1, 2)  # not one per store
    assert await rows(sqlite_spool, "SELECT count(*) FROM messages") == [(50,)]
    assert await rows(sqlite_spool, "SELECT count(*) FROM copies") == [(50,)]


async def test_a_duplicate_id_fails_alone_without_undoing_the_others(spool: Spool) -> None:
    await spool.store(message("M1", ["a@x.test"]))
    results = await asyncio.gather(
        spool.store(message("M1", ["b@x.test"])), spool.store(message("M2", ["c@x.test"])), return_exceptions=True
    )
    assert isinstance(results[0], sqlite3.IntegrityError | asyncpg.UniqueViolationError)
    assert isinstance(results[1], tuple)
    assert await rows(spool, "SELECT id FROM messages ORDER BY id") == [("M1",), ("M2",)]


async def test_a_full_spool_is_a_452_and_keeps_what_was_stored(sqlite_spool: SqliteSpool) -> None:
    await sqlite_spool.store(message("M1", ["a@x.test"]))
    pages = await sqlite_spool._read(lambda db: db.execute("PRAGMA page_count").fetchone()[0])
    await sqlite_spool._read(lambda db: db.execute(f"PRAGMA max_page_count = {pages}"))
    big = NewMessage(
        "M2",
        "s@x.test",
        False,
        b"x" * 200_000,
        (OutgoingCopy(("b@x.test",), CopyKind.SINGLE, b"\r\n", b"x" * 200_000),),
        1000.0,
    )
    with pytest.raises(SpoolWriteError) as refused:
        await sqlite_spool.store(big)
    assert (refused.value.code, refused.value.enhanced) == (452, "4.3.1")
    assert await rows(sqlite_spool, "SELECT id FROM messages") == [("M1",)]


async def test_queue_commands_see_retry_and_delete(spool: Spool) -> None:
    await spool.store(message("M1", ["a@x.test", "b@x.test"], received_at=5000.0))
    (summary,) = await spool.summaries()
    assert summary.id == "M1" and summary.size == len(BODY) and len(summary.copies) == 2
    assert await spool.retry_now(10.0, "M1") == 2
    assert await spool.next_due() == 10.0
    assert await spool.delete("M1") is True
    assert await spool.summary("M1") is None
    assert await rows(spool, "SELECT count(*) FROM copies") == [(0,)]
