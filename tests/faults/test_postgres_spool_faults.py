"""Several relays on one PostgreSQL spool, as real processes, with a relay or the database broken on purpose.

Each test checks that every copy a relay acknowledged arrived (lost = 0) and how many arrived twice, and
prints the figures (pytest -s shows them).
"""

from __future__ import annotations

import asyncio
import smtplib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from bench.postgres import PASSWORD, PrivateCluster
from tests.conftest import LOOPBACK, LoopThread, RecordingHandler
from tests.faults.test_delivery_faults import SlowHandler, figures, upstream_settings
from tests.support.spool import FAST_RETRIES, RelayProcess, UpstreamOnPort, copy_keys, free_port, wait_until

pytestmark = pytest.mark.slow

# Short leases, so that a dead relay's copies are taken over within the test; still far longer than a send.
LEASE = "3"


def shared_spool(url: str, password_file: Path, **more: str) -> dict[str, str]:
    return {"RELAY_SPOOL_URL": url, "RELAY_SPOOL_PASSWORD_FILE": str(password_file), "RELAY_SPOOL_LEASE": LEASE, **more}


def queue_mode_on_shared_spool(upstream_port: int, url: str, password_file: Path, **more: str) -> dict[str, str]:
    """Relays in queue mode (every copy claimed through the spool), fast retries, the shared spool."""
    return upstream_settings(
        upstream_port, RELAY_DELIVERY_MODE="queue", **FAST_RETRIES, **shared_spool(url, password_file), **more
    )


def send_to(port: int, count: int, tag: str, recipients_each: int = 5) -> list[tuple[str, str]]:
    """count messages, each with its recipients all in To (so each is split); the copies acknowledged."""
    accepted = []
    with smtplib.SMTP(LOOPBACK, port, timeout=30) as client:
        for number in range(count):
            recipients = [f"r{n}.{number}@{tag}{n}.test" for n in range(recipients_each)]
            subject = f"{tag} message {number}"
            message = f"From: s@origin.test\r\nTo: {', '.join(recipients)}\r\nSubject: {subject}\r\n\r\nHi.\r\n"
            client.sendmail("s@origin.test", recipients, message.encode())
            accepted.extend((subject, recipient) for recipient in recipients)
    return accepted


def in_flight_of(url: str, pid: int) -> int:
    """Copies a relay process holds a lease on: claimed, result not stored."""

    async def count() -> int:
        connection = await asyncpg.connect(url, password=PASSWORD)
        try:
            found: int = await connection.fetchval(
                "SELECT count(*) FROM copies WHERE state = 'sending' AND split_part(lease_owner, '/', 2) = $1",
                str(pid),
            )
            return found
        finally:
            await connection.close()

    return asyncio.run(count())


def relay_dir(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    return folder


def test_two_relays_one_killed_mid_delivery_the_other_delivers_its_copies(
    loops: LoopThread, tmp_path: Path, postgres_database: str, spool_password_file: Path
) -> None:
    upstream = UpstreamOnPort(loops, RecordingHandler(data_delay=0.05), free_port())  # still sending at the kill
    upstream.start()
    settings = queue_mode_on_shared_spool(upstream.port, postgres_database, spool_password_file)
    doomed = RelayProcess(relay_dir(tmp_path, "doomed"), settings)
    survivor = RelayProcess(relay_dir(tmp_path, "survivor"), settings)
    try:
        accepted = send_to(doomed.port, 40, "doomed") + send_to(survivor.port, 40, "survivor")
        assert wait_until(lambda: len(upstream.handler.messages) >= 20)
        doomed.kill()
        in_flight = in_flight_of(postgres_database, doomed.process.pid)
        assert len(upstream.handler.messages) < len(accepted), "the kill came too late to test anything"
        assert wait_until(lambda: set(copy_keys(upstream.handler.messages)) >= set(accepted), limit=60)
        time.sleep(0.5)  # nothing more is on its way
    finally:
        doomed.stop()
        survivor.stop()
        upstream.stop()
    lost, repeated = figures(
        "two relays, one kill -9", accepted, copy_keys(upstream.handler.messages), dead_relay_in_flight=in_flight
    )
    assert lost == 0
    assert repeated <= in_flight


def test_two_relays_racing_for_the_same_copies_send_none_twice(
    loops: LoopThread, tmp_path: Path, postgres_database: str, spool_password_file: Path
) -> None:
    upstream = UpstreamOnPort(loops, SlowHandler(), free_port())
    upstream.start()
    settings = queue_mode_on_shared_spool(upstream.port, postgres_database, spool_password_file)
    relays = [RelayProcess(relay_dir(tmp_path, f"relay{n}"), settings) for n in range(2)]
    try:
        accepted: list[tuple[str, str]] = []
        senders = [
            threading.Thread(target=lambda relay=relay, n=n: accepted.extend(send_to(relay.port, 40, f"race{n}")))
            for n, relay in enumerate(relays)
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(120)
        assert wait_until(lambda: set(copy_keys(upstream.handler.messages)) >= set(accepted), limit=60)
        time.sleep(1)  # nothing more is on its way
        attempted_by = [sum(1 for e in relay.events if e.get("event") == "copy.attempted") for relay in relays]
    finally:
        for relay in relays:
            relay.stop()
        upstream.stop()
    lost, repeated = figures(
        "two relays racing",
        accepted,
        copy_keys(upstream.handler.messages),
        first=attempted_by[0],
        second=attempted_by[1],
    )
    assert (lost, repeated) == (0, 0)
    assert min(attempted_by) > 0, "one relay sent everything: no race took place"


def test_the_database_stopped_and_restarted_under_load_4xx_while_down_nothing_lost(
    loops: LoopThread, tmp_path: Path, make_postgres_cluster, spool_password_file: Path
) -> None:
    cluster: PrivateCluster = make_postgres_cluster()
    upstream = UpstreamOnPort(loops, SlowHandler(), free_port())
    upstream.start()
    relay = RelayProcess(
        tmp_path,
        upstream_settings(upstream.port, **FAST_RETRIES, **shared_spool(cluster.url, spool_password_file)),
    )
    accepted: list[tuple[str, str]] = []
    refusals: list[int] = []
    stop_sending = threading.Event()

    def keep_sending() -> None:
        number = 0
        while not stop_sending.is_set():
            recipients = [f"r{n}.{number}@db{n}.test" for n in range(3)]
            subject = f"db message {number}"
            message = f"From: s@origin.test\r\nTo: {', '.join(recipients)}\r\nSubject: {subject}\r\n\r\nHi.\r\n"
            try:
                with smtplib.SMTP(LOOPBACK, relay.port, timeout=30) as client:
                    client.sendmail("s@origin.test", recipients, message.encode())
                accepted.extend((subject, recipient) for recipient in recipients)
            except smtplib.SMTPDataError as exc:
                refusals.append(exc.smtp_code)
            number += 1
            time.sleep(0.01)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        assert wait_until(lambda: len(accepted) >= 30)
        cluster.stop()
        assert wait_until(lambda: len(refusals) >= 3)
        cluster.start()
        accepted_before_restart = len(accepted)
        assert wait_until(lambda: len(accepted) >= accepted_before_restart + 30, limit=60), "no recovery"
        stop_sending.set()
        sender.join(60)
        assert wait_until(lambda: set(copy_keys(upstream.handler.messages)) >= set(accepted), limit=60)
    finally:
        stop_sending.set()
        sender.join(60)
        relay.stop()
        upstream.stop()
    lost, _ = figures(
        "database stopped and restarted", accepted, copy_keys(upstream.handler.messages), refused=len(refusals)
    )
    assert lost == 0
    assert refusals and all(400 <= code < 500 for code in refusals)


def test_two_relays_keep_one_rate_limit_between_them(
    loops: LoopThread, tmp_path: Path, postgres_database: str, spool_password_file: Path
) -> None:
    upstream = UpstreamOnPort(loops, RecordingHandler(), free_port())
    upstream.start()
    settings = queue_mode_on_shared_spool(
        upstream.port, postgres_database, spool_password_file, RELAY_UPSTREAM_RATE_LIMIT_PER_MINUTE="5"
    )
    relays = [RelayProcess(relay_dir(tmp_path, f"relay{n}"), settings) for n in range(2)]
    try:
        for number, relay in enumerate(relays):
            send_to(relay.port, 5, f"limited{number}", recipients_each=1)
        assert wait_until(lambda: len(upstream.handler.messages) >= 5)
        time.sleep(3)  # both relays poll, and would send more if each counted only its own
        delivered_within_the_minute = len(upstream.handler.messages)
    finally:
        for relay in relays:
            relay.stop()
        upstream.stop()
    assert delivered_within_the_minute == 5


def _copy_in_flight_ends_then_goes_from_the_next_relay(
    loops: LoopThread,
    tmp_path: Path,
    postgres_database: str,
    spool_password_file: Path,
    end: Callable[[RelayProcess], None],
    **first_settings: str,
) -> None:
    """One copy in flight on a relay whose upstream never answers DATA, end(relay), then a relay started after
    it (its upstream answers) sends the copy within seconds, with a lease far longer than the test."""
    hanging = UpstreamOnPort(loops, RecordingHandler(data_delay=30), free_port())
    hanging.start()
    answering = UpstreamOnPort(loops, RecordingHandler(), free_port())
    answering.start()
    spool = {**shared_spool(postgres_database, spool_password_file), "RELAY_SPOOL_LEASE": "600"}
    first = RelayProcess(
        relay_dir(tmp_path, "first"),
        upstream_settings(hanging.port, RELAY_DELIVERY_MODE="queue", **first_settings, **spool),
    )
    try:
        accepted = send_to(first.port, 1, "in-flight", recipients_each=1)
        assert wait_until(lambda: in_flight_of(postgres_database, first.process.pid) == 1)
        end(first)
        second = RelayProcess(
            relay_dir(tmp_path, "second"), upstream_settings(answering.port, RELAY_DELIVERY_MODE="queue", **spool)
        )
        try:
            assert wait_until(lambda: copy_keys(answering.handler.messages) == accepted, limit=30)
        finally:
            second.stop()
    finally:
        first.stop()
        hanging.stop()
        answering.stop()


def test_a_send_cut_short_by_a_stop_goes_from_the_other_relay_without_waiting_for_its_lease(
    loops: LoopThread, tmp_path: Path, postgres_database: str, spool_password_file: Path
) -> None:
    def stop(relay: RelayProcess) -> None:
        # The stopping relay's release, not its lease's end, makes the copy due again.
        assert relay.terminate() == 0

    # Its DATA reply takes longer than the relay waits while it stops.
    _copy_in_flight_ends_then_goes_from_the_next_relay(
        loops, tmp_path, postgres_database, spool_password_file, stop, RELAY_DELIVERY_STOP_TIMEOUT="1"
    )


def test_a_relay_killed_and_started_again_on_its_machine_sends_what_it_had_in_flight_at_once(
    loops: LoopThread, tmp_path: Path, postgres_database: str, spool_password_file: Path
) -> None:
    # SIGKILL: no release; only the next relay's recovery on this machine makes the copy due again.
    _copy_in_flight_ends_then_goes_from_the_next_relay(
        loops, tmp_path, postgres_database, spool_password_file, RelayProcess.kill
    )
