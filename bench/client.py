"""A small asyncio SMTP client: the load generator when smtp-source is absent, and the latency probe.

It speaks plain ESMTP one command at a time, like smtp-source, and times each DATA reply: from the
moment the final "." is written to the moment the server's reply arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.procs import LOOPBACK


class SmtpFailure(Exception):
    pass


def dot_stuffed(message: bytes) -> bytes:
    """The message as DATA content: CRLF line endings, leading dots doubled, ending in CRLF."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


@dataclass
class ClientResult:
    sent: int = 0
    latencies: list[float] = field(default_factory=list)


class Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, port: int, helo: str) -> Session:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        session = cls(reader, writer)
        await session.expect(220)
        await session.command(f"EHLO {helo}", 250)
        return session

    async def expect(self, code: int) -> None:
        while True:
            line = await self._reader.readline()
            if not line:
                raise SmtpFailure("the server closed the connection")
            if line[3:4] != b"-":
                break
        if int(line[:3]) != code:
            raise SmtpFailure(f"expected {code}, got {line.decode(errors='replace').strip()}")

    async def command(self, text: str, code: int) -> None:
        self._writer.write(text.encode() + b"\r\n")
        await self.expect(code)

    async def send(self, mail_from: str, recipients: Sequence[str], content: bytes) -> float:
        """One transaction; returns the seconds from the end of DATA to the server's reply."""
        await self.command(f"MAIL FROM:<{mail_from}>", 250)
        for recipient in recipients:
            await self.command(f"RCPT TO:<{recipient}>", 250)
        await self.command("DATA", 354)
        self._writer.write(content)
        self._writer.write(b".\r\n")
        started = time.perf_counter()
        await self._writer.drain()
        await self.expect(250)
        return time.perf_counter() - started

    async def close(self) -> None:
        with contextlib.suppress(SmtpFailure, OSError):
            await self.command("QUIT", 221)
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


async def send_load(
    port: int,
    sessions: int,
    count: int,
    mail_from: str,
    recipients: Sequence[str],
    message: bytes,
    stop: asyncio.Event | None = None,
) -> ClientResult:
    """`count` messages over `sessions` parallel connections (each reused), or fewer if `stop` is set."""
    content = dot_stuffed(message)
    result = ClientResult()
    remaining = [count]

    async def one_session() -> None:
        session = await Session.open(port, "bench.test")
        try:
            while remaining[0] > 0 and not (stop is not None and stop.is_set()):
                remaining[0] -= 1
                result.latencies.append(await session.send(mail_from, recipients, content))
                result.sent += 1
        finally:
            await session.close()

    await asyncio.gather(*(one_session() for _ in range(min(sessions, count))))
    return result
