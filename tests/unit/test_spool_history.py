"""What the spools keep for the console: the history of each message, held messages, and the metrics' totals.

Each test runs against SQLite and PostgreSQL alike (the `spool` fixture in tests/unit/conftest.py)."""

from __future__ import annotations

import dataclasses

from relay.core.activity import MessageRecord
from relay.core.policy import CopyKind
from relay.core.replies import Reply
from relay.core.rewrite import OutgoingCopy
from relay.spool.interface import (
    CopyResult,
    HeldMessage,
    HeldState,
    NewMessage,
    Spool,
)

TWO = ("a@x.test", "b@y.test")
BUSY = Reply(451, "4.2.2", "busy")
RECORD = MessageRecord("s@x.test", "Team news", ("a@x.test", "b@y.test"), "split", "2 visible in To")


def message(message_id: str, received_at: float = 1000.0, record: MessageRecord | None = RECORD) -> NewMessage:
    return NewMessage(
        id=message_id,
        mail_from="s@x.test",
        smtputf8=False,
        body=b"Hi\r\n",
        copies=tuple(
            OutgoingCopy((r,), CopyKind.SINGLE, f"To: {r}\r\n\r\n".encode(), b"Hi\r\n")
            for r in ("a@x.test", "b@y.test")
        ),
        received_at=received_at,
        record=record,
    )


def held(message_id: str, received_at: float = 1000.0) -> HeldMessage:
    trace = {"helo": "h", "peer": "[127.0.0.1]", "protocol": "ESMTP", "date": "d", "message_id": "<m@h>"}
    data = b"To: a@x.test, b@y.test\r\n\r\nHi\r\n"
    return HeldMessage(
        message_id, "s@x.test", ("a@x.test", "b@y.test"), False, received_at, trace, HeldState.HELD, data
    )


async def test_each_attempt_updates_its_copy_in_the_history_and_the_totals(spool: Spool) -> None:
    copy_ids = await spool.store(message("M1"))
    # Claimed first: a shared spool records a result only under the lease of the relay that sends the copy.
    assert len(await spool.claim_due(1000.0, 10, lease=60)) == 2
    await spool.record(CopyResult(copy_ids[0], delivered=("a@x.test",), sent_at=1002.0))
    await spool.record(
        CopyResult(copy_ids[1], retry=("b@y.test",), next_attempt=1060.0, last_reply=BUSY, sent_at=1002.0)
    )
    (entry,) = await spool.history(10)
    assert entry.record == RECORD
    assert [(c.state, c.attempts, c.last_reply, c.next_attempt) for c in entry.copies] == [
        ("delivered", 1, None, None),
        ("deferred", 1, BUSY, 1060.0),
    ]
    metrics = await spool.metrics()
    assert metrics.counters[("messages_total", "split")] == 1
    assert metrics.counters[("copies_total", "delivered")] == 1
    assert metrics.counters[("copies_total", "deferred")] == 1
    assert metrics.counters[("delivery_seconds_bucket", "2.5")] == 1  # 2 s after acceptance: the bucket up to 2.5 s
    buckets = {label: value for (name, label), value in metrics.counters.items() if name == "delivery_seconds_bucket"}
    assert buckets == {"2.5": 1}, "one row per bucket, added up by /metrics"
    assert metrics.counters[("delivery_seconds_sum", "")] == 2.0
    assert metrics.queue_copies == {"queued": 0, "deferred": 1, "sending": 0}
    assert metrics.oldest_received_at == 1000.0


async def test_delivery_reports_are_not_in_the_history(spool: Spool) -> None:
    await spool.store(message("M1", record=None))
    assert await spool.history(10) == []


async def test_filter_search_and_newest_first(spool: Spool) -> None:
    await spool.store(message("OLD", 1000.0))
    await spool.remember("NEW", 2000.0, dataclasses.replace(RECORD, subject="Kit", decision="refused"))
    assert [e.id for e in await spool.history(10)] == ["NEW", "OLD"]
    assert [e.id for e in await spool.history(10, decision="refused")] == ["NEW"]
    assert [e.id for e in await spool.history(10, text="team")] == ["OLD"]
    assert [e.id for e in await spool.history(10, text="B@Y.TEST")] == ["NEW", "OLD"]
    assert [e.id for e in await spool.history(1)] == ["NEW"]
    assert await spool.history_of("NOPE") is None


async def test_the_history_is_purged_but_not_while_a_message_still_waits(spool: Spool) -> None:
    await spool.store(message("WAITING", 1000.0))
    await spool.remember("GONE", 1000.0, RECORD)
    await spool.remember("RECENT", 5000.0, RECORD)
    await spool.hold(held("HELD", 1000.0), RECORD, None)
    assert await spool.forget_history(before=2000.0) == 1
    assert sorted(e.id for e in await spool.history(10)) == ["HELD", "RECENT", "WAITING"]


async def test_a_held_message_is_settled_once(spool: Spool) -> None:
    await spool.hold(held("H1"), dataclasses.replace(RECORD, decision="hold"), None)
    assert [m.id for m in await spool.held_messages()] == ["H1"]
    assert (await spool.metrics()).held == 1
    released = message("H1", record=None)
    assert await spool.settle_held("H1", HeldState.RELEASED, released, dataclasses.replace(RECORD, reason="released"))
    assert not await spool.settle_held("H1", HeldState.RELEASED, released, None)
    assert not await spool.settle_held("H1", HeldState.DISCARDED, None, None)
    assert len(await spool.summaries()) == 1, "released once: one message in the queue"
    found = await spool.held_message("H1")
    assert found is not None and found.state is HeldState.RELEASED and found.data == b""
    entry = await spool.history_of("H1")
    assert entry is not None and entry.record.reason == "released"
    assert [c.state for c in entry.copies] == ["queued", "queued"]
    assert await spool.held_messages() == []
    assert (await spool.metrics()).held == 0
