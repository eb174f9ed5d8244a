"""What sharing a PostgreSQL spool adds: leases with fencing, disjoint claims, NOTIFY, schema versions,
one bounce per message, and a 451 while the database is unreachable."""

from __future__ import annotations

import asyncio
import dataclasses

import asyncpg
import pytest

from bench.postgres import PASSWORD, PrivateCluster
from relay.core.replies import Reply
from relay.spool.interface import CopyResult, Progress, SpoolWriteError
from relay.spool.postgres import PostgresSpool
from relay.spool.postgres_database import MIGRATIONS
from tests.unit.test_spool import message


async def test_a_relay_whose_lease_was_taken_over_cannot_record_over_the_new_owner(two_relays) -> None:
    first, second = two_relays
    await first.store(message("M1", ["a@x.test"]))
    (held,) = await first.claim_due(1000.0, 10, lease=60)
    assert await second.claim_due(1059.0, 10, lease=60) == []
    (taken,) = await second.claim_due(1060.0, 10, lease=60)
    assert taken.id == held.id
    late = CopyResult(held.id, failed=(("a@x.test", Reply(550, "5.1.1", "gone")),), sent_at=1061.0)
    assert await first.record(late) is Progress.SENDING
    assert await first.settled() == []
    assert await second.record(CopyResult(taken.id, delivered=taken.recipients, sent_at=1062.0)) is Progress.DELIVERED


async def test_a_lease_that_ran_out_untaken_still_records(two_relays) -> None:
    first, _ = two_relays
    await first.store(message("M1", ["a@x.test"]))
    (held,) = await first.claim_due(1000.0, 10, lease=60)
    assert await first.record(CopyResult(held.id, delivered=held.recipients, sent_at=2000.0)) is Progress.DELIVERED


async def test_relays_claiming_at_once_never_claim_the_same_copy(two_relays) -> None:
    first, second = two_relays
    for number in range(20):
        await first.store(message(f"M{number}", [f"r{n}@x.test" for n in range(10)]))
    claimed: list[int] = []
    for _ in range(10):
        batches = await asyncio.gather(
            first.claim_due(1000.0, 15, lease=60),
            second.claim_due(1000.0, 15, lease=60),
        )
        claimed += [copy.id for batch in batches for copy in batch]
    assert len(claimed) == 200 and len(set(claimed)) == 200


async def test_new_mail_wakes_the_other_relay(two_relays) -> None:
    first, second = two_relays
    woken = asyncio.Event()
    second.wake_on_new_mail(woken.set)
    await asyncio.sleep(0.5)  # its listening connection is up
    woken.clear()
    await first.store(message("M1", ["a@x.test"]))
    await asyncio.wait_for(woken.wait(), 10)


async def test_two_relays_retiring_one_message_bounce_it_once(two_relays) -> None:
    first, second = two_relays
    await first.store(message("M1", ["a@x.test"]))
    (copy,) = await first.claim_due(1000.0, 10, lease=60)
    await first.record(CopyResult(copy.id, failed=(("a@x.test", Reply(550, "5.1.1", "gone")),), sent_at=1001.0))
    assert [m.id for m in await second.settled()] == ["M1"]
    await first.retire("M1", message("B1", ["s@x.test"]))
    await second.retire("M1", message("B2", ["s@x.test"]))
    assert [m.id for m in await first.summaries()] == ["B1"]


async def test_the_schema_is_versioned_and_a_newer_one_is_refused(postgres_database: str) -> None:
    spool = PostgresSpool(postgres_database, PASSWORD)
    await spool.open()
    await spool.close()
    await spool.open()  # a second start migrates nothing
    await spool.close()
    connection = await asyncpg.connect(postgres_database, password=PASSWORD)
    try:
        versions = await connection.fetch("SELECT version FROM privacy_relay_schema ORDER BY version")
        assert [row["version"] for row in versions] == list(range(1, len(MIGRATIONS) + 1)), "each applied once"
        await connection.execute("INSERT INTO privacy_relay_schema VALUES ($1)", len(MIGRATIONS) + 1)
    finally:
        await connection.close()
    with pytest.raises(SpoolWriteError, match="newer than this relay's"):
        await PostgresSpool(postgres_database, PASSWORD).open()


async def test_a_spool_of_version_1_gets_the_console_s_tables_and_keeps_its_mail(postgres_database: str) -> None:
    spool = PostgresSpool(postgres_database, PASSWORD)
    await spool.open()
    await spool.store(message("M1", ["a@x.test"]))
    await spool.close()
    connection = await asyncpg.connect(postgres_database, password=PASSWORD)
    try:  # as a relay from before the console left it
        await connection.execute("DROP TABLE history_copies, history, held, counters")
        await connection.execute("DELETE FROM privacy_relay_schema WHERE version >= 2")
    finally:
        await connection.close()
    await spool.open()
    try:
        assert [m.id for m in await spool.summaries()] == ["M1"]
        assert await spool.history(10) == [], "mail from before the console is not in its history"
        (copy,) = await spool.claim_due(1000.0, 10, lease=60)
        await spool.record(CopyResult(copy.id, delivered=copy.recipients, sent_at=1001.0))
        assert (await spool.metrics()).counters[("copies_total", "delivered")] == 1
    finally:
        await spool.close()


async def test_a_spool_of_version_2_keeps_its_totals_in_the_counters_of_each_connection(postgres_database: str) -> None:
    spool = PostgresSpool(postgres_database, PASSWORD)
    await spool.open()
    await spool.close()
    connection = await asyncpg.connect(postgres_database, password=PASSWORD)
    try:  # as a relay from before the counters had a row per connection left them
        await connection.execute(
            "ALTER TABLE counters DROP CONSTRAINT counters_pkey, DROP COLUMN shard, DROP COLUMN at,"
            " ADD PRIMARY KEY (name, label)"
        )
        await connection.execute("DELETE FROM privacy_relay_schema WHERE version >= 3")
        await connection.execute(
            "INSERT INTO counters (name, label, value)"
            " VALUES ('copies_total', 'delivered', 5), ('upstream_up', 'default', 0)"
        )
    finally:
        await connection.close()
    await spool.open()
    try:
        await spool.store(message("M1", ["a@x.test"]))
        (copy,) = await spool.claim_due(1000.0, 10, lease=60)
        await spool.record(CopyResult(copy.id, delivered=copy.recipients, sent_at=1001.0))
        counters = (await spool.metrics()).counters
        assert counters[("copies_total", "delivered")] == 6
        assert counters[("upstream_up", "default")] == 1, "a gauge is its latest value, not a sum"
    finally:
        await spool.close()


async def test_while_the_database_is_down_new_mail_gets_451_and_then_goes_in_again(
    make_postgres_cluster,
) -> None:
    cluster: PrivateCluster = make_postgres_cluster()
    spool = PostgresSpool(cluster.url, PASSWORD)
    await spool.open()
    try:
        await spool.store(message("M1", ["a@x.test"]))
        await asyncio.to_thread(cluster.stop)
        with pytest.raises(SpoolWriteError) as refused:
            await spool.store(message("M2", ["b@x.test"]))
        assert (refused.value.code, refused.value.enhanced) == (451, "4.3.0")
        await asyncio.to_thread(cluster.start)
        stored = None
        for _ in range(50):
            try:
                stored = await spool.store(message("M3", ["c@x.test"]))
                break
            except SpoolWriteError:
                await asyncio.sleep(0.1)  # a connection the restart cut is replaced at the next call
        assert stored is not None
        assert [m.id for m in await spool.summaries()] == ["M1", "M3"]
    finally:
        await spool.close()


async def test_copies_of_one_message_recorded_at_once_forget_it_exactly_once(postgres_database: str) -> None:
    spool = PostgresSpool(postgres_database, PASSWORD)
    await spool.open()
    try:
        await spool.store(message("M1", [f"r{n}@x.test" for n in range(10)]))
        copies = await spool.claim_due(1000.0, 10, lease=60)
        progress = await asyncio.gather(
            *(spool.record(CopyResult(c.id, delivered=c.recipients, sent_at=1001.0)) for c in copies)
        )
        assert progress.count(Progress.DELIVERED) == 1
        for _ in range(100):  # deleted by the recorder's next statement
            if not await spool.summaries():
                break
            await asyncio.sleep(0.02)
        assert await spool.summaries() == []
    finally:
        await spool.close()


async def test_relays_sharing_the_spool_take_sends_within_one_rate_limit(two_relays) -> None:
    first, second = two_relays
    for number in range(8):
        await first.store(message(f"M{number}", [f"r{number}@x.test"]))
    mine = await first.claim_due(1000.0, 4, lease=60)
    theirs = await second.claim_due(1000.0, 4, lease=60)
    assert await first.take_sends(1000.0, mine, per_minute=5, per_day=None) == (4, 0.0)
    granted, wait = await second.take_sends(1010.0, theirs, per_minute=5, per_day=None)
    assert granted == 1 and wait == pytest.approx(50.0)
    # A result of a copy whose send was counted at the start does not count it again.
    await first.record(CopyResult(mine[0].id, delivered=mine[0].recipients, sent_at=1001.0))
    assert len(await first.recent_sends(0)) == 5


async def test_results_arriving_together_are_recorded_in_few_statements_each_as_if_alone(
    postgres_database: str,
) -> None:
    """A late result (lease taken over), a retry, a failure and deliveries of one message and of others, all
    recorded at once: each stands or not as it would alone, and each message is settled once."""
    first, second = PostgresSpool(postgres_database, PASSWORD), PostgresSpool(postgres_database, PASSWORD)
    await first.open()
    await second.open()
    statements = 0
    real = first._db.statements

    async def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal statements
        statements += 1
        return await real(*args, **kwargs)

    try:
        await first.store(message("LATE", ["late@x.test"]))
        (late,) = await first.claim_due(1000.0, 10, lease=60)
        (taken,) = await second.claim_due(1060.0, 10, lease=60)
        await first.store(message("MIXED", ["a@x.test", "b@x.test", "c@x.test"]))
        for number in range(20):
            await first.store(message(f"M{number}", [f"r{number}@x.test"]))
        copies = await first.claim_due(1100.0, 100, lease=60)
        mixed = [c for c in copies if c.message_id == "MIXED"]
        others = [c for c in copies if c.message_id != "MIXED"]
        gone = Reply(550, "5.1.1", "gone")
        results = [
            CopyResult(late.id, delivered=late.recipients, sent_at=1101.0),
            CopyResult(mixed[0].id, delivered=mixed[0].recipients, sent_at=1101.0),
            CopyResult(mixed[1].id, failed=((mixed[1].recipients[0], gone),), sent_at=1101.0),
            CopyResult(mixed[2].id, delivered=mixed[2].recipients, sent_at=1101.0),
            *(CopyResult(c.id, delivered=c.recipients, sent_at=1101.0) for c in others),
        ]
        first._db.statements = counted  # type: ignore[method-assign]
        progress = await asyncio.gather(*(first.record(result) for result in results))
        first._db.statements = real  # type: ignore[method-assign]
        assert statements < len(results) / 2, "results waiting together share a statement"
        assert progress[0] is Progress.SENDING, "the late result is not recorded over the new owner's"
        assert sorted(p.value for p in progress[1:4]) == ["sending", "sending", "settled"]
        assert progress[4:] == [Progress.DELIVERED] * 20
        # (Delivered messages not deleted yet are settled too, with nothing to bounce.)
        (settled,) = [m for m in await first.settled() if m.failures]
        assert settled.id == "MIXED" and [f.recipient for f in settled.failures] == [mixed[1].recipients[0]]
        assert await second.record(CopyResult(taken.id, delivered=taken.recipients, sent_at=1102.0)) is (
            Progress.DELIVERED
        )
        await first.close()  # each deletes the delivered messages still waiting for a statement
        await second.close()
        await first.open()
        assert [m.id for m in await first.summaries()] == ["MIXED"]
    finally:
        await first.close()
        await second.close()


async def test_results_while_the_database_is_down_fail_each_and_go_in_once_it_is_back(make_postgres_cluster) -> None:
    cluster: PrivateCluster = make_postgres_cluster()
    spool = PostgresSpool(cluster.url, PASSWORD)
    await spool.open()
    try:
        for number in range(5):
            await spool.store(message(f"M{number}", [f"r{number}@x.test"]))
        copies = await spool.claim_due(1000.0, 10, lease=60)
        await asyncio.to_thread(cluster.stop)
        results = [CopyResult(c.id, delivered=c.recipients, sent_at=1001.0) for c in copies]
        outcomes = await asyncio.gather(*(spool.record(r) for r in results), return_exceptions=True)
        assert all(isinstance(o, SpoolWriteError) and o.code == 451 for o in outcomes)
        await asyncio.to_thread(cluster.start)
        for result in results:  # as the retirer does: the same result again, until it is stored
            for _ in range(50):
                try:
                    await spool.record(dataclasses.replace(result))
                    break
                except SpoolWriteError:
                    await asyncio.sleep(0.1)
        await spool.close()
        await spool.open()
        assert await spool.summaries() == []
    finally:
        await spool.close()


async def test_only_a_spool_that_delivers_holds_a_connection_listening_for_new_mail(postgres_database: str) -> None:
    async def listening() -> int:
        connection = await asyncpg.connect(postgres_database, password=PASSWORD)
        try:
            found: int = await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' AND datname = current_database()"
            )
            return found
        finally:
            await connection.close()

    console = PostgresSpool(postgres_database, PASSWORD)  # as the console or `queue list` opens it
    await console.open()
    delivering = PostgresSpool(postgres_database, PASSWORD)
    woken = asyncio.Event()
    delivering.wake_on_new_mail(woken.set)
    await delivering.open()
    try:
        for _ in range(100):
            if await listening() == 1:
                break
            await asyncio.sleep(0.05)
        assert await listening() == 1
        woken.clear()
        await console.store(message("M1", ["a@x.test"]))
        await asyncio.wait_for(woken.wait(), 5)
    finally:
        await console.close()
        await delivering.close()
