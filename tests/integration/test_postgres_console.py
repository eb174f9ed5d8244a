"""The console on a PostgreSQL spool that several relays share: each decision on a held message is taken
once even when relays race, held mail past hold_max_age is returned once, and the totals are the database's."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg

from bench.postgres import PASSWORD
from relay.delivery.holding import Holding
from relay.spool.interface import CopyResult, HeldState
from relay.spool.postgres import PostgresSpool
from tests.conftest import Upstream, relay_config
from tests.integration.test_console import TEAM, metric
from tests.integration.test_console_hold import HOLD, hold_one
from tests.support.console import RunningConsole
from tests.support.spool import wait_until
from tests.unit.test_spool_history import RECORD, held, message


async def test_two_relays_deciding_at_once_settle_each_held_message_once(two_relays) -> None:
    first, second = two_relays
    for number in range(20):
        await first.hold(held(f"H{number}"), dataclasses.replace(RECORD, decision="hold"), None)
    outcomes = []
    for number in range(20):
        released = message(f"H{number}", record=None)
        outcomes.append(
            await asyncio.gather(
                first.settle_held(f"H{number}", HeldState.RELEASED, released, RECORD),
                second.settle_held(f"H{number}", HeldState.DISCARDED, None, RECORD),
            )
        )
    assert all(sorted(pair) == [False, True] for pair in outcomes)
    released_ids = {f"H{number}" for number, (won, _) in enumerate(outcomes) if won}
    assert {summary.id for summary in await second.summaries()} == released_ids
    for number, (won, _) in enumerate(outcomes):
        found = await second.held_message(f"H{number}")
        assert found is not None and found.state is (HeldState.RELEASED if won else HeldState.DISCARDED)
    assert await first.held_messages() == []


async def test_held_mail_past_its_age_is_returned_once_by_relays_checking_at_once(two_relays, tmp_path: Path) -> None:
    first, second = two_relays
    for number in range(5):
        await first.hold(held(f"H{number}", received_at=1000.0), dataclasses.replace(RECORD, decision="hold"), None)
    config = relay_config(tmp_path)
    now = 1000.0 + config.policy.hold_max_age + 1
    returned = await asyncio.gather(
        Holding(first, "one.test", lambda: config).return_expired(now),
        Holding(second, "two.test", lambda: config).return_expired(now),
    )
    assert sum(returned) == 5
    reports = await first.summaries()
    assert len(reports) == 5 and all(summary.is_bounce for summary in reports), "one report per message"
    assert (await second.metrics()).held == 0


async def test_the_totals_are_the_database_s_whichever_relay_counted(two_relays) -> None:
    first, second = two_relays
    for number in range(10):
        await (first if number % 2 else second).store(message(f"M{number}"))

    async def deliver_all(spool: PostgresSpool) -> None:
        while copies := await spool.claim_due(1000.0, 3, lease=60):
            await asyncio.gather(
                *(spool.record(CopyResult(c.id, delivered=c.recipients, sent_at=1001.0)) for c in copies)
            )

    await asyncio.gather(deliver_all(first), deliver_all(second))
    seen = [await spool.metrics() for spool in (first, second)]
    assert seen[0] == seen[1], "every relay's /metrics shows the same totals"
    counters = seen[0].counters
    assert counters[("messages_total", "split")] == 10
    assert counters[("copies_total", "delivered")] == 20
    assert counters[("delivery_seconds_count", "")] == 20
    assert counters[("delivery_seconds_bucket", "1.0")] == 20
    assert seen[0].queue_copies == {"queued": 0, "deferred": 0, "sending": 0}


def test_consoles_of_two_relays_on_one_database_show_the_same_mail_and_one_release_wins(
    start_console, upstream: Upstream, postgres_database: str, spool_password_file: Path
) -> None:
    shared = {"RELAY_SPOOL_URL": postgres_database, "RELAY_SPOOL_PASSWORD_FILE": str(spool_password_file)}
    first: RunningConsole = start_console(upstream, RELAY_POLICY_HOLD_NOTIFY="false", **HOLD, **shared)
    second: RunningConsole = start_console(upstream, RELAY_POLICY_HOLD_NOTIFY="false", **HOLD, **shared)
    held_id = hold_one(first)
    assert [entry["id"] for entry in second.client.get("/api/held").json()["held"]] == [held_id]

    def release(running: RunningConsole) -> int:
        return running.client.post(f"/api/held/{held_id}/release", json.dumps({"as": "split"}).encode()).status

    with ThreadPoolExecutor(2) as pool:
        statuses = sorted(pool.map(release, (first, second)))
    assert statuses == [200, 409]
    assert wait_until(
        lambda: {c["state"] for c in second.client.get(f"/api/messages/{held_id}").json()["copies"]} == {"delivered"}
    )
    assert sorted(m.rcpt_tos[0] for m in upstream.messages) == sorted(TEAM), "released once: one copy each"
    for running in (first, second):
        (entry,) = running.client.get("/api/messages").json()["messages"]
        assert entry["id"] == held_id and entry["decision"] == "split"
        text = running.client.get("/metrics").text
        assert metric(text, 'privacy_relay_copies_total{result="delivered"}') == 3
        assert metric(text, 'privacy_relay_messages_total{decision="hold"}') == 1
        assert metric(text, "privacy_relay_held_messages") == 0


def test_while_the_database_is_down_the_console_says_so_and_then_works_again(
    start_console, upstream: Upstream, make_postgres_cluster, spool_password_file: Path
) -> None:
    cluster = make_postgres_cluster()
    running: RunningConsole = start_console(
        upstream, RELAY_SPOOL_URL=cluster.url, RELAY_SPOOL_PASSWORD_FILE=str(spool_password_file)
    )
    assert running.client.get("/api/messages").status == 200
    cluster.stop()
    try:
        for path in ("/api/messages", "/api/held", "/healthz"):
            answer = running.client.get(path)
            assert answer.status == 503, (path, answer.body)
            assert "cannot reach its spool database" in answer.body.decode(), path
    finally:
        cluster.start()
    # A connection the restart cut is replaced at the next call.
    assert wait_until(lambda: running.client.get("/api/messages").status == 200)
    assert running.client.get("/healthz").status == 200


async def test_totals_of_connections_that_ended_are_folded_and_kept(postgres_database: str) -> None:
    spools = [PostgresSpool(postgres_database, PASSWORD) for _ in range(2)]
    for spool in spools:
        await spool.open()
    try:
        for number, spool in enumerate(spools):
            await spool.store(message(f"M{number}"))
            while copies := await spool.claim_due(1000.0, 1, lease=60):
                await spool.record(CopyResult(copies[0].id, delivered=copies[0].recipients, sent_at=1001.0 + number))
        before = (await spools[1].metrics()).counters
        connection = await asyncpg.connect(postgres_database, password=PASSWORD)
        try:
            live = "SELECT count(DISTINCT shard) FROM counters WHERE shard <> 0"
            shards_before = await connection.fetchval(live)
            await spools[0].close()
            for _ in range(100):  # until the closed relay's backends have exited
                await spools[1].forget_history(0.0)
                if await connection.fetchval(live) < shards_before:
                    break
                await asyncio.sleep(0.05)
            dead = await connection.fetchval(
                "SELECT count(*) FROM counters WHERE shard <> 0 AND shard NOT IN (SELECT pid FROM pg_stat_activity)"
            )
            folded = await connection.fetchval("SELECT count(*) FROM counters WHERE shard = 0")
        finally:
            await connection.close()
        assert dead == 0 and folded > 0, "the closed relay's rows are merged into shard 0"
        after = (await spools[1].metrics()).counters
        assert after == before
        assert after[("copies_total", "delivered")] == 4
        assert after[("upstream_last_delivery", "default")] == 1002.0, "a gauge keeps its latest value"
    finally:
        for spool in spools:
            await spool.close()
