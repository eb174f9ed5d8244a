"""Connection limits and timeouts: 421 4.7.0 for the excess, service for everyone else, no dawdling."""

from __future__ import annotations

import smtplib
import socket
import time

import pytest

from tests.conftest import Upstream

MESSAGE = b"From: a@office.test\r\nTo: ann@one.test\r\nSubject: hi\r\n\r\nHello.\r\n"


def greeted(relay, source: str = "127.0.0.1") -> socket.socket:
    """A raw connection that has read the relay's first reply line."""
    sock = socket.create_connection((relay.host, relay.port), timeout=10, source_address=(source, 0))
    sock.recv(1024)
    return sock


def first_reply(relay, source: str) -> bytes:
    with socket.create_connection((relay.host, relay.port), timeout=10, source_address=(source, 0)) as sock:
        return sock.recv(1024)


def closed_by_server(sock: socket.socket, drip: bytes = b"", every: float = 0.2, within: float = 20) -> bool:
    """Keep the connection (dripping bytes, if given) until the server closes it or `within` passes."""
    sock.settimeout(every)
    give_up = time.monotonic() + within
    sent = 0
    while time.monotonic() < give_up:
        try:
            if drip:
                sock.send(drip[sent % len(drip) : sent % len(drip) + 1])
                sent += 1
            if sock.recv(1024) == b"":
                return True
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return True
    return False


def served(relay, source: str) -> bool:
    try:
        with smtplib.SMTP(relay.host, relay.port, source_address=(source, 0)) as client:
            return client.sendmail("a@office.test", ["ann@one.test"], MESSAGE) == {}
    except smtplib.SMTPConnectError:
        return False


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    received = b""
    while marker not in received:
        chunk = sock.recv(1024)
        assert chunk, f"connection closed before {marker!r}; got {received!r}"
        received += chunk
    return received


def eventually(condition, within: float = 10) -> bool:
    give_up = time.monotonic() + within
    while time.monotonic() < give_up:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_per_address_limit_refuses_the_excess_and_serves_others(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_LISTEN_MAX_CONNECTIONS_PER_IP="2")
    held = [greeted(relay), greeted(relay)]
    refusal = first_reply(relay, "127.0.0.1")
    assert refusal.startswith(b"421 4.7.0 Too many connections from 127.0.0.1")
    assert served(relay, "127.0.0.2")
    held.pop().close()
    assert eventually(lambda: first_reply(relay, "127.0.0.1").startswith(b"220 "))
    for sock in held:
        sock.close()
    assert len(upstream.messages) == 1


def test_relay_wide_limit(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_LISTEN_MAX_CONNECTIONS="2")
    held = [greeted(relay, "127.0.0.1"), greeted(relay, "127.0.0.2")]
    assert first_reply(relay, "127.0.0.3").startswith(b"421 4.7.0 Too many connections to this relay")
    for sock in held:
        sock.close()
    assert eventually(lambda: first_reply(relay, "127.0.0.3").startswith(b"220 "))


def test_abandoned_connections_give_their_slots_back(start_relay, upstream: Upstream, relay_certificate) -> None:
    relay = start_relay(
        upstream,
        RELAY_LISTEN_MAX_CONNECTIONS_PER_IP="1",
        **relay_certificate.listen_settings(),
    )
    for opening in (b"QUIT\r\n", b"EHLO desk\r\nSTARTTLS\r\n", b"EHLO desk\r\nMAIL FROM:<a@office.test>\r\n"):
        sock = greeted(relay)
        sock.sendall(opening)
        sock.close()
        assert eventually(lambda: served(relay, "127.0.0.1"))


def test_idle_client_is_cut_off(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_LISTEN_COMMAND_TIMEOUT="0.5")
    assert closed_by_server(greeted(relay))


@pytest.mark.parametrize("drip", [b"EHLO slow.client.example\r\n", b"NOOP\r\n"])
def test_a_client_dripping_a_command_is_cut_off(start_relay, upstream: Upstream, drip: bytes) -> None:
    relay = start_relay(upstream, RELAY_LISTEN_COMMAND_TIMEOUT="1")
    assert closed_by_server(greeted(relay), drip=drip[:-2], every=0.2)


def test_a_client_dripping_data_is_cut_off_and_nothing_is_sent(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_LISTEN_COMMAND_TIMEOUT="1", RELAY_LISTEN_MIN_DATA_RATE="100")
    sock = greeted(relay)
    sock.sendall(b"EHLO desk\r\nMAIL FROM:<a@office.test>\r\nRCPT TO:<ann@one.test>\r\nDATA\r\n")
    assert closed_by_server(sock, drip=b"Subject: slow\r\n\r\nwords, one byte at a time ", every=0.2)
    assert upstream.messages == []


def test_a_slow_but_steady_upload_outlasts_the_command_timeout(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_LISTEN_COMMAND_TIMEOUT="1", RELAY_LISTEN_MIN_DATA_RATE="20")
    with greeted(relay) as sock:
        sock.sendall(b"EHLO desk\r\nMAIL FROM:<a@office.test>\r\nRCPT TO:<ann@one.test>\r\nDATA\r\n")
        read_until(sock, b"354 ")
        sock.sendall(b"Subject: steady\r\n\r\n")
        # Three times the command timeout in all, but each line buys ten seconds at 20 bytes/s.
        for _ in range(6):
            sock.sendall(b"x" * 198 + b"\r\n")
            time.sleep(0.5)
        sock.sendall(b".\r\n")
        assert read_until(sock, b"\r\n").startswith(b"250 ")
    assert len(upstream.messages) == 1


def test_a_client_that_only_sends_noop_is_told_to_go_and_sending_mail_resets_the_count(
    start_relay, upstream: Upstream
) -> None:
    relay = start_relay(upstream)
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo("desk")
        for _ in range(60):
            assert client.noop()[0] == 250
        assert client.sendmail("a@office.test", ["ann@one.test"], MESSAGE) == {}
        for _ in range(100):  # the count started again after the message
            assert client.noop()[0] == 250
        code, text = client.docmd("RSET")
        assert (code, text[:5]) == (421, b"4.7.0")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    with smtplib.SMTP(relay.host, relay.port) as other:
        assert other.noop()[0] == 250


def test_thirty_desks_behind_one_address_are_all_served_with_the_default_limits(
    start_relay, upstream: Upstream
) -> None:
    relay = start_relay(upstream)
    desks = [greeted(relay) for _ in range(30)]
    try:
        assert served(relay, "127.0.0.1")  # the 31st connection from the same address
    finally:
        for sock in desks:
            sock.close()
