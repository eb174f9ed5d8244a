"""Commands a client pipelines after the end of DATA reach the relay intact (the block reader stops at the dot)."""

from __future__ import annotations

import socket

from tests.conftest import Upstream

MESSAGE = b"From: a@src.test\r\nTo: r@dst.test\r\nSubject: %d\r\n\r\n..dotted line\r\nbody\r\n"


def _replies(connection: socket.socket, count: int) -> list[bytes]:
    data = b""
    while data.count(b"\r\n") < count:
        chunk = connection.recv(65536)
        assert chunk, data
        data += chunk
    return data.split(b"\r\n")[:count]


def test_two_messages_and_quit_in_one_write_after_data(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream)
    with socket.create_connection((relay.host, relay.port), timeout=10) as connection:
        _replies(connection, 1)
        connection.sendall(b"HELO client.test\r\n")
        _replies(connection, 1)
        envelope = b"MAIL FROM:<a@src.test>\r\nRCPT TO:<r@dst.test>\r\nDATA\r\n"
        connection.sendall(envelope)
        assert [r[:3] for r in _replies(connection, 3)] == [b"250", b"250", b"354"]
        connection.sendall(MESSAGE % 1 + b".\r\n" + envelope)
        assert [r[:3] for r in _replies(connection, 4)] == [b"250", b"250", b"250", b"354"]
        connection.sendall(MESSAGE % 2 + b".\r\nQUIT\r\n")
        assert [r[:3] for r in _replies(connection, 2)] == [b"250", b"221"]
    assert [m.data.split(b"\r\n\r\n", 1)[1] for m in upstream.messages] == [b".dotted line\r\nbody\r\n"] * 2
    assert [b"Subject: %d" % n in m.data for n, m in enumerate(upstream.messages, 1)] == [True, True]
