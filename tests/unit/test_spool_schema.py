"""The spool's schema versions: a spool made before replies had columns is migrated, a newer one is refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from relay.core.replies import Reply
from relay.spool.schema import SCHEMA_VERSION, SchemaTooNew
from relay.spool.sqlite import DATABASE_NAME, SqliteSpool

# The schema the relay made before it had versions (user_version 0), as it was.
VERSION_0 = """
CREATE TABLE messages (id TEXT PRIMARY KEY, mail_from TEXT NOT NULL, smtputf8 INTEGER NOT NULL, upstream TEXT,
    is_bounce INTEGER NOT NULL, received_at REAL NOT NULL, body BLOB NOT NULL);
CREATE TABLE copies (id INTEGER PRIMARY KEY, message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    position INTEGER NOT NULL, kind TEXT NOT NULL, recipients TEXT NOT NULL, headers BLOB NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL, last_reply TEXT);
CREATE INDEX copies_due ON copies (next_attempt);
CREATE INDEX copies_message ON copies (message_id);
CREATE TABLE failures (message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    recipient TEXT NOT NULL, reply TEXT NOT NULL, headers BLOB NOT NULL);
CREATE TABLE sends (sent_at REAL NOT NULL, recipients INTEGER NOT NULL);
CREATE INDEX failures_message ON failures (message_id);
CREATE INDEX sends_time ON sends (sent_at);
INSERT INTO messages VALUES ('M1', 's@x.test', 0, NULL, 0, 1000.0, X'48690D0A');
INSERT INTO copies VALUES (1, 'M1', 0, 'single', 'a@x.test', X'0D0A', 'queued', 2, 1500.0, '451 4.3.0 Try later');
INSERT INTO copies VALUES (2, 'M1', 1, 'single', 'c@x.test', X'0D0A', 'queued', 0, 1000.0, NULL);
INSERT INTO failures VALUES ('M1', 'b@x.test', '550 5.1.1 No such user', X'546F3A20620D0A0D0A');
INSERT INTO failures VALUES ('M1', 'd@x.test', '554 Rejected', X'0D0A');
"""


def user_version(folder: Path) -> int:
    with sqlite3.connect(folder / DATABASE_NAME) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


async def test_a_new_spool_has_the_latest_schema(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path)
    await spool.open()
    await spool.close()
    assert user_version(tmp_path) == SCHEMA_VERSION


async def test_a_spool_from_before_versions_keeps_its_replies_as_fields(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / DATABASE_NAME) as db:
        db.executescript(VERSION_0)
    spool = SqliteSpool(tmp_path)
    await spool.open()
    try:
        summary = await spool.summary("M1")
    finally:
        await spool.close()
    assert summary is not None
    assert [c.last_reply for c in summary.copies] == [Reply(451, "4.3.0", "Try later"), None]
    assert [(f.recipient, f.reply, f.headers) for f in summary.failures] == [
        ("b@x.test", Reply(550, "5.1.1", "No such user"), b"To: b\r\n\r\n"),
        ("d@x.test", Reply(554, "5.0.0", "Rejected"), b"\r\n"),
    ]
    assert user_version(tmp_path) == SCHEMA_VERSION
    with sqlite3.connect(tmp_path / DATABASE_NAME) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(copies)")}
    assert "last_reply" not in columns


async def test_a_spool_from_a_newer_relay_is_refused_untouched(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path)
    await spool.open()
    await spool.close()
    with sqlite3.connect(tmp_path / DATABASE_NAME) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaTooNew, match="newer than this privacy-relay"):
        await SqliteSpool(tmp_path).open()
    assert user_version(tmp_path) == SCHEMA_VERSION + 1
