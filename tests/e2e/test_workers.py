"""listen.workers: several relay processes serving one port, fed connections in turn by the supervisor."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.core.policy import CopyKind
from relay.core.rewrite import OutgoingCopy
from relay.server import RelayServer
from relay.spool.interface import NewMessage
from relay.spool.sqlite import SqliteSpool
from tests.conftest import RelayCertificate, relay_config
from tests.support.spool import RelayProcess, wait_until

MESSAGE = b"From: a@src.test\r\nTo: r@dst.test\r\nSubject: hi\r\n\r\nbody\r\n"


def _started_events(log: Path, count: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        started = [e for e in events if e.get("event") == "relay.started"]
        if len(started) >= count:
            return started
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} workers started:\n{log.read_text()}")


@contextlib.contextmanager
def running_two_workers(
    tmp_path: Path, **settings: str
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path, list[int]]]:
    log = tmp_path / "relay.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(
        RELAY_LISTEN_PORT="0",
        RELAY_CONSOLE_PORT="0",
        RELAY_LISTEN_WORKERS="2",
        RELAY_OUTBOX=str(tmp_path / "outbox"),
        RELAY_LOGGING_FORMAT="json",
        **settings,
    )
    with open(log, "wb") as output:
        relay = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve"], env=env, cwd=tmp_path, stderr=output, start_new_session=True
        )
    try:
        started = _started_events(log, 2)
        ports = {int(str(e["listen"]).rsplit(":", 1)[1]) for e in started}
        assert len(ports) == 1 and 0 not in ports
        yield relay, ports.pop(), tmp_path / "outbox", [int(str(e["pid"])) for e in started]
    finally:
        if relay.poll() is None:
            os.killpg(relay.pid, signal.SIGKILL)
        relay.wait(10)


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path, list[int]]]:
    with running_two_workers(tmp_path) as running:
        yield running


@pytest.mark.e2e
def test_workers_serve_implicit_tls_on_the_connections_they_are_handed(
    tmp_path: Path, relay_certificate: RelayCertificate
) -> None:
    with running_two_workers(tmp_path, **relay_certificate.listen_settings("implicit")) as (relay, port, outbox, _):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
            plain.sendall(b"EHLO no-tls\r\n")
            assert plain.recv(100) == b""  # not TLS: dropped, and the relay goes on
        for _ in range(4):
            with smtplib.SMTP_SSL("127.0.0.1", port, context=relay_certificate.client_context()) as client:
                assert client.sendmail("a@src.test", ["r@dst.test"], MESSAGE) == {}
        assert len(list(outbox.glob("*.eml"))) == 4
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(20) == 0
    assert b'"tls.handshake_failed"' in (tmp_path / "relay.log").read_bytes()


@pytest.mark.e2e
def test_two_workers_share_one_port_and_stop_together(two_workers) -> None:
    relay, port, outbox, worker_pids = two_workers
    assert len(set(worker_pids)) == 2 and relay.pid not in worker_pids
    for _ in range(20):
        with smtplib.SMTP("127.0.0.1", port) as client:
            assert client.sendmail("a@src.test", ["r@dst.test"], MESSAGE) == {}
    assert len(list(outbox.glob("*.eml"))) == 20
    relay.send_signal(signal.SIGTERM)
    assert relay.wait(20) == 0
    for pid in worker_pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _client_connections_by_worker(port: int, worker_pids: list[int]) -> dict[int, int]:
    """How many established connections to the relay's port each worker holds (from /proc)."""
    established = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
            established.add(f"socket:[{fields[9]}]")
    counts = {}
    for pid in worker_pids:
        fds = Path(f"/proc/{pid}/fd")
        counts[pid] = sum(1 for fd in fds.iterdir() if os.readlink(fd) in established)
    return counts


@pytest.mark.e2e
def test_connections_are_dealt_to_the_workers_in_turn(two_workers) -> None:
    _, port, _, worker_pids = two_workers
    clients = [smtplib.SMTP("127.0.0.1", port) for _ in range(10)]
    try:
        # SO_REUSEPORT's hash of the addresses gave splits like 7 and 3; the supervisor deals 5 and 5.
        assert sorted(_client_connections_by_worker(port, worker_pids).values()) == [5, 5]
    finally:
        for client in clients:
            client.quit()


@pytest.mark.e2e
def test_a_worker_that_dies_stops_the_relay_with_an_error(two_workers) -> None:
    relay, _, _, worker_pids = two_workers
    os.kill(worker_pids[0], signal.SIGKILL)
    assert relay.wait(20) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(worker_pids[1], 0)


async def _leave_a_copy_in_flight(spool_path: Path) -> None:
    """A copy claimed "being sent" with a lease far in the future: only a recovery can send it again."""
    spool = SqliteSpool(spool_path)
    await spool.open()
    headers = b"From: a@src.test\r\nTo: r@dst.test\r\nSubject: hi\r\n\r\n"
    copy = OutgoingCopy(("r@dst.test",), CopyKind.ORIGINAL, headers, b"body\r\n")
    await spool.store(NewMessage("INFLIGHT1", "a@src.test", False, b"body\r\n", (copy,), time.time()))
    assert len(await spool.claim_due(time.time(), 10, 3600)) == 1
    await spool.close()


def test_a_worker_leaves_copies_in_flight_alone(tmp_path: Path, loops, upstream) -> None:
    """What another worker is sending must not be requeued when a worker starts (recover_spool=False)."""
    asyncio.run(_leave_a_copy_in_flight(tmp_path / "spool"))
    settings = {
        "RELAY_DELIVERY_MODE": "queue",
        "RELAY_SPOOL_PATH": str(tmp_path / "spool"),
        "RELAY_UPSTREAM_HOST": upstream.host,
        "RELAY_UPSTREAM_PORT": str(upstream.port),
        "RELAY_UPSTREAM_TLS": "none",
    }
    for recover, expected in ((False, 0), (True, 1)):
        server = RelayServer(relay_config(tmp_path, settings), recover_spool=recover)
        loops.run(server.start())
        try:
            arrived = wait_until(lambda: len(upstream.messages) >= 1, limit=1.5)
            assert len(upstream.messages) == expected, (recover, arrived)
        finally:
            loops.run(server.stop())


@pytest.mark.e2e
def test_workers_share_the_spool_and_recover_it_once(tmp_path: Path, loops, upstream) -> None:
    """A copy left "being sent" by a killed relay is requeued once, by the supervisor, and sent once."""
    asyncio.run(_leave_a_copy_in_flight(tmp_path / "spool"))
    relay = RelayProcess(
        tmp_path,
        {
            "RELAY_LISTEN_WORKERS": "2",
            "RELAY_DELIVERY_MODE": "queue",
            "RELAY_UPSTREAM_HOST": upstream.host,
            "RELAY_UPSTREAM_PORT": str(upstream.port),
            "RELAY_UPSTREAM_TLS": "none",
        },
    )
    try:
        assert wait_until(lambda: sum(e.get("event") == "relay.started" for e in relay.events) == 2)
        assert wait_until(lambda: len(upstream.messages) >= 1)
        time.sleep(0.5)  # a second, wrongful send would come within the scheduler's poll interval
        assert [m.rcpt_tos for m in upstream.messages] == [["r@dst.test"]]
        assert [e.get("in_flight") for e in relay.events if e.get("event") == "spool.recovered"] == [1]
    finally:
        relay.terminate()
        relay.stop()
