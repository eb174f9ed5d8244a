"""The relay's own name (listen.hostname) and its implicit-TLS port under half-open handshakes."""

from __future__ import annotations

import smtplib
import socket

from relay.config.models import machine_hostname
from tests.conftest import RelayCertificate, Upstream
from tests.integration.test_office_limits import MESSAGE, closed_by_server, eventually

UNNAMED_MESSAGE = b"From: a@office.test\r\nTo: ann@one.test, bob@two.test\r\nSubject: hi\r\n\r\nHello.\r\n"


def test_listen_hostname_names_the_relay_in_greeting_ehlo_received_and_message_id(
    start_relay, upstream: Upstream
) -> None:
    relay = start_relay(upstream, RELAY_LISTEN_HOSTNAME="relay.office.test", RELAY_DELIVERY_MODE="direct")
    with smtplib.SMTP() as client:
        code, greeting = client.connect(relay.host, relay.port)
        assert (code, greeting.split()[0]) == (220, b"relay.office.test")
        assert client.ehlo()[1].splitlines()[0] == b"relay.office.test"
        assert client.sendmail("a@office.test", ["ann@one.test", "bob@two.test"], UNNAMED_MESSAGE) == {}
    assert set(upstream.handler.ehlo_names) == {"relay.office.test"}
    assert len(upstream.messages) == 2
    for copy in upstream.messages:
        assert b"\tby relay.office.test (privacy-relay)" in copy.data
        message_id = next(line for line in copy.data.splitlines() if line.lower().startswith(b"message-id:"))
        assert message_id.endswith(b"@relay.office.test>")


def test_without_listen_hostname_the_relay_uses_the_machine_name(start_relay, upstream: Upstream) -> None:
    relay = start_relay(upstream, RELAY_DELIVERY_MODE="direct")
    with smtplib.SMTP(relay.host, relay.port) as client:
        assert client.sendmail("a@office.test", ["ann@one.test"], MESSAGE) == {}
    assert set(upstream.handler.ehlo_names) == {machine_hostname()[0]}


def half_open(relay, source: str = "127.0.0.1") -> socket.socket:
    """A connection to the implicit-TLS port that never sends its ClientHello."""
    return socket.create_connection((relay.host, relay.port), timeout=10, source_address=(source, 0))


def served_over_tls(relay, certificate: RelayCertificate, source: str) -> bool:
    context = certificate.client_context()
    with smtplib.SMTP_SSL(relay.host, relay.port, context=context, source_address=(source, 0), timeout=10) as client:
        return client.sendmail("a@office.test", ["ann@one.test"], MESSAGE) == {}


def test_fifty_half_open_handshakes_are_counted_and_do_not_stop_a_normal_client(
    start_relay, upstream: Upstream, relay_certificate: RelayCertificate
) -> None:
    relay = start_relay(upstream, **relay_certificate.listen_settings("implicit"))
    flood = [half_open(relay) for _ in range(50)]
    try:
        # Each holds one of 127.0.0.1's 50 slots (listen.max_connections_per_ip) while it dawdles.
        with half_open(relay) as one_too_many:
            assert one_too_many.recv(200).startswith(b"421 4.7.0 Too many connections from 127.0.0.1")
        assert served_over_tls(relay, relay_certificate, "127.0.0.2")
    finally:
        for sock in flood:
            sock.close()
    assert eventually(lambda: relay.server.slots.total == 0)
    assert served_over_tls(relay, relay_certificate, "127.0.0.1")
    assert len(upstream.messages) == 2


def test_a_handshake_that_does_not_finish_in_time_is_dropped_and_frees_its_slot(
    start_relay, upstream: Upstream, relay_certificate: RelayCertificate
) -> None:
    relay = start_relay(
        upstream,
        **relay_certificate.listen_settings("implicit"),
        RELAY_LISTEN_TLS_HANDSHAKE_TIMEOUT="0.5",
        RELAY_LISTEN_MAX_CONNECTIONS_PER_IP="1",
    )
    with half_open(relay) as dawdler:
        assert closed_by_server(dawdler)
    assert served_over_tls(relay, relay_certificate, "127.0.0.1")
