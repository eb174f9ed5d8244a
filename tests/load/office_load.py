"""Bounded load test for the office relay, loopback only: run by hand, not collected by pytest.

    python tests/load/office_load.py

The relay runs as its own process (`privacy-relay serve`) with a recording aiosmtpd upstream in this
one. 450 clients connect and sit idle after EHLO, 50 slow clients send a byte every few seconds
(half of them inside DATA), and all 500 are open at once, spread over 25 loopback addresses as an
office LAN would be. Meanwhile one normal client sends messages and we time each DATA reply. The run
ends when the relay has cut the slow clients off (listen.command_timeout), or after MAX_SECONDS.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

IDLE_CLIENTS = 450
SLOW_CLIENTS = 50
PER_ADDRESS = 20
SLOW_BYTE_EVERY = 3.0  # seconds
COMMAND_TIMEOUT = 15  # seconds, the relay's listen.command_timeout for this run
NORMAL_MESSAGES = 20
MAX_SECONDS = 90
MESSAGE = (
    b"From: desk@office.test\r\nTo: ann@one.test, bob@two.test, cy@three.test\r\n"
    b"Subject: while the relay is busy\r\n\r\n" + b"Body line.\r\n" * 200
)


class Counting:
    def __init__(self) -> None:
        self.messages = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.messages += 1
        return "250 2.0.0 Queued"


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    line = await reader.readline()
    while line[3:4] == b"-":
        line = await reader.readline()
    return line


def source_address(index: int, base: str) -> str:
    return f"{base}.{index // PER_ADDRESS + 1}"


async def start_relay(
    upstream_port: int, events: list[str], workdir: Path
) -> tuple[asyncio.subprocess.Process, int, asyncio.Task[None]]:
    """The relay as its own process; its log is read continuously so a full pipe never blocks it."""
    environment = {
        **os.environ,
        "RELAY_LISTEN_PORT": "0",
        "RELAY_LISTEN_MAX_CONNECTIONS": "600",
        "RELAY_LISTEN_MAX_CONNECTIONS_PER_IP": str(PER_ADDRESS),
        "RELAY_LISTEN_COMMAND_TIMEOUT": str(COMMAND_TIMEOUT),
        "RELAY_UPSTREAM_HOST": "127.0.0.1",
        "RELAY_UPSTREAM_PORT": str(upstream_port),
        "RELAY_UPSTREAM_TLS": "none",
        "RELAY_LOGGING_FORMAT": "json",
    }
    relay = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        "serve",
        env=environment,
        stderr=asyncio.subprocess.PIPE,
        cwd=workdir,  # its spool and outbox, gone after the run
    )
    assert relay.stderr is not None
    log = relay.stderr
    started: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def read_log() -> None:
        async for line in log:
            event = json.loads(line)
            events.append(event["event"])
            if event["event"] == "relay.started":
                started.set_result(int(event["listen"].rsplit(":", 1)[1]))
        if not started.done():
            started.set_exception(SystemExit("the relay exited before it started"))

    reading = asyncio.create_task(read_log())
    return relay, await started, reading


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def idle_client(port: int, index: int, ready: asyncio.Event, held: list[int], all_held: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source_address(index, "127.0.1"), 0))
    await read_reply(reader)
    writer.write(b"EHLO idle.office.test\r\n")
    await read_reply(reader)
    held.append(index)
    if len(held) == IDLE_CLIENTS:
        all_held.set()
    await ready.wait()
    await reader.read()  # until the relay closes the idle connection
    writer.close()


async def slow_client(port: int, index: int, in_data: bool, cut_after: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source_address(index, "127.0.2"), 0))
    await read_reply(reader)
    if in_data:
        writer.write(b"EHLO slow.office.test\r\n")
        await read_reply(reader)
        for command in (b"MAIL FROM:<slow@office.test>\r\n", b"RCPT TO:<ann@one.test>\r\n", b"DATA\r\n"):
            writer.write(command)
            await read_reply(reader)
    started = time.monotonic()
    drip = b"Subject: slow\r\n\r\n" + b"x" * 1000 if in_data else b"EHLO a-very-slow-client.office.test"
    try:
        for byte in drip:
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                if await asyncio.wait_for(reader.read(1024), SLOW_BYTE_EVERY) == b"":
                    break
            except TimeoutError:
                continue
    except ConnectionError:
        pass
    cut_after.append(time.monotonic() - started)
    writer.close()


async def normal_client(port: int) -> float:
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await read_reply(reader)
    for command in (
        b"EHLO desk.office.test\r\n",
        b"MAIL FROM:<desk@office.test>\r\n",
        b"RCPT TO:<ann@one.test>\r\n",
        b"RCPT TO:<bob@two.test>\r\n",
        b"RCPT TO:<cy@three.test>\r\n",
        b"DATA\r\n",
    ):
        writer.write(command)
        await read_reply(reader)
    writer.write(MESSAGE + b".\r\n")
    reply = await read_reply(reader)
    elapsed = time.monotonic() - started
    assert reply.startswith(b"250 "), reply
    writer.write(b"QUIT\r\n")
    await read_reply(reader)
    writer.close()
    return elapsed


async def over_limit_reply(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.1.1", 0))
    reply = await read_reply(reader)
    writer.close()
    return reply


async def main() -> None:
    handler = Counting()
    loop = asyncio.get_running_loop()
    upstream = await loop.create_server(lambda: SMTP(handler, hostname="upstream.test"), "127.0.0.1", 0)
    events: list[str] = []
    workdir = tempfile.TemporaryDirectory(prefix="office-load-")
    relay, port, reading = await start_relay(upstream.sockets[0].getsockname()[1], events, Path(workdir.name))
    try:
        ready, all_held = asyncio.Event(), asyncio.Event()
        held: list[int] = []
        cut_after: list[float] = []
        run_started = time.monotonic()
        idle = [asyncio.create_task(idle_client(port, i, ready, held, all_held)) for i in range(IDLE_CLIENTS)]
        slow = [asyncio.create_task(slow_client(port, i, i % 2 == 0, cut_after)) for i in range(SLOW_CLIENTS)]
        try:
            await asyncio.wait_for(all_held.wait(), MAX_SECONDS)
        except TimeoutError:
            failed = [t.exception() for t in idle + slow if t.done() and t.exception()]
            raise SystemExit(f"only {len(held)} idle clients got in; {len(failed)} failed: {failed[:3]}") from None
        connected_in = time.monotonic() - run_started
        ready.set()
        refused = await over_limit_reply(port)
        rss_under_load = rss_mib(relay.pid)
        latencies = [await normal_client(port) for _ in range(NORMAL_MESSAGES)]
        await asyncio.wait_for(asyncio.gather(*slow), MAX_SECONDS)
        for task in idle:
            task.cancel()
        total = time.monotonic() - run_started
    finally:
        relay.terminate()
        await relay.wait()
        await reading
        upstream.close()
        workdir.cleanup()
    print(f"connections open at once: {IDLE_CLIENTS} idle + {SLOW_CLIENTS} slow = {IDLE_CLIENTS + SLOW_CLIENTS}")
    print(f"  all idle clients connected and greeted within {connected_in:.2f} s")
    print(f"  a {PER_ADDRESS + 1}st connection from one address got: {refused.decode().strip()}")
    print(f"  relay RSS with all of them open: {rss_under_load:.0f} MiB")
    print(
        f"normal client, {NORMAL_MESSAGES} messages x 3 copies, connect to DATA reply: "
        f"min {min(latencies) * 1000:.0f} ms, median {statistics.median(latencies) * 1000:.0f} ms, "
        f"max {max(latencies) * 1000:.0f} ms; upstream received {handler.messages} copies"
    )
    print(
        f"slow clients (a byte every {SLOW_BYTE_EVERY:.0f} s) cut off by the relay after "
        f"{min(cut_after):.1f} to {max(cut_after):.1f} s (command_timeout {COMMAND_TIMEOUT} s); {len(cut_after)} of "
        f"{SLOW_CLIENTS}"
    )
    print(
        f"relay log: {events.count('connection.over_limit')} connection.over_limit, "
        f"{events.count('message.relayed')} message.relayed"
    )
    print(f"whole run: {total:.1f} s")


if __name__ == "__main__":
    asyncio.run(main())
