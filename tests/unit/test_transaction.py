"""UpstreamConnection, the pipelined transaction, on its own: a real socket pair, this test speaking for the server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from relay.core.replies import Reply
from relay.upstream.transaction import TransactionResult, UpstreamConnection

HEADERS = b"From: a@src.test\r\nTo: b@dst.test\r\n\r\n"
BODY = b"Hello.\r\n"


@dataclass
class Server:
    """The server's end of the socket: reads what the relay sends, writes replies."""

    sock: socket.socket
    received: bytes = b""

    async def read_until(self, marker: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        while marker not in self.received:
            chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), 10)
            assert chunk, f"the relay closed the connection before sending {marker!r}"
            self.received += chunk
        upto, _, self.received = self.received.partition(marker)
        return upto + marker

    async def reply(self, text: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, text)


async def connect(extensions: dict[str, str]) -> tuple[UpstreamConnection, Server]:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    transport, _ = await asyncio.get_running_loop().create_connection(asyncio.Protocol, sock=ours)
    connection = UpstreamConnection(transport, extensions, timeout=10)  # type: ignore[arg-type]
    transport.set_protocol(connection)
    return connection, Server(theirs)


@pytest.fixture
async def pipelining() -> AsyncIterator[tuple[UpstreamConnection, Server]]:
    connection, server = await connect({"pipelining": "", "size": "", "8bitmime": ""})
    yield connection, server
    connection.close()
    server.sock.close()


async def test_envelope_goes_in_one_go_with_pipelining_and_each_refusal_keeps_its_reply(
    pipelining: tuple[UpstreamConnection, Server],
) -> None:
    connection, server = pipelining
    sending = asyncio.create_task(
        connection.transaction("a@src.test", ["b@dst.test", "c@dst.test"], HEADERS, BODY, smtputf8=False)
    )
    # Everything up to DATA arrives before the server has answered anything.
    envelope = await server.read_until(b"DATA\r\n")
    assert envelope.split(b"\r\n")[:3] == [
        f"MAIL FROM:<a@src.test> SIZE={len(HEADERS) + len(BODY)} BODY=8BITMIME".encode(),
        b"RCPT TO:<b@dst.test>",
        b"RCPT TO:<c@dst.test>",
    ]
    await server.reply(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n550 5.1.1 No such user\r\n354 Go\r\n")
    assert await server.read_until(b"\r\n.\r\n") == HEADERS + BODY + b".\r\n"
    await server.reply(b"250 2.0.0 Queued\r\n")
    result = await asyncio.wait_for(sending, 10)
    assert result == TransactionResult(
        accepted=["b@dst.test"],
        refused={"c@dst.test": Reply(550, "5.1.1", "No such user")},
        accepted_reply=Reply(250, "2.0.0", "Queued"),  # kept for the console's activity page
    )
    assert connection.ready


async def test_a_multi_line_refusal_is_one_reply_on_one_line(pipelining: tuple[UpstreamConnection, Server]) -> None:
    connection, server = pipelining
    sending = asyncio.create_task(connection.transaction("a@src.test", ["b@dst.test"], HEADERS, BODY, smtputf8=False))
    await server.read_until(b"DATA\r\n")
    await server.reply(b"250 OK\r\n450-4.2.1 Mailbox busy,\r\n450 try again later\r\n554 No valid recipients\r\n")
    assert await server.read_until(b"\r\n") == b"RSET\r\n"
    await server.reply(b"250 OK\r\n")
    result = await asyncio.wait_for(sending, 10)
    assert result.refused == {"b@dst.test": Reply(450, "4.2.1", "Mailbox busy, try again later")}


async def test_without_pipelining_a_refused_sender_ends_the_transaction_before_any_recipient() -> None:
    connection, server = await connect({})
    try:
        sending = asyncio.create_task(
            connection.transaction("a@src.test", ["b@dst.test"], HEADERS, BODY, smtputf8=False)
        )
        assert await server.read_until(b"\r\n") == b"MAIL FROM:<a@src.test>\r\n"
        await server.reply(b"553 5.7.1 Sender not allowed\r\n")
        assert await server.read_until(b"\r\n") == b"RSET\r\n"
        await server.reply(b"250 OK\r\n")
        result = await asyncio.wait_for(sending, 10)
        assert result.refused == {"b@dst.test": Reply(553, "5.7.1", "Sender not allowed")}
    finally:
        connection.close()
        server.sock.close()
