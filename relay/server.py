"""Wiring: the listening socket, the handler, the delivery, and a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal
import socket
from typing import Any

import structlog

from relay.config import Config
from relay.delivery import Destination, DirectDelivery, OutboxDestination, UpstreamDestination
from relay.forwarder import UpstreamPool
from relay.listener import RelayHandler, RelaySMTP

# RFC 5321 4.5.3.2.7 recommends at least five minutes of server timeout, as Postfix's smtpd_timeout.
CLIENT_TIMEOUT = 300


def build_destination(config: Config, hostname: str) -> Destination:
    if config.uses_outbox:
        return OutboxDestination(config.outbox)
    password = config.upstream_password.get_secret_value() if config.upstream_password else None
    return UpstreamDestination(UpstreamPool(config.upstream, password, hostname))


class RelayServer:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.hostname = socket.gethostname()
        self.destination = build_destination(config, self.hostname)
        self.delivery = DirectDelivery(self.destination, config.upstream.max_connections)
        self.handler = RelayHandler(config, self.delivery, self.hostname)
        self._server: asyncio.Server | None = None

    def _protocol(self) -> RelaySMTP:
        return RelaySMTP(
            self.handler,
            self.config.listen.networks(),
            data_size_limit=self.config.listen.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self.hostname,
            ident="privacy-relay",
            timeout=CLIENT_TIMEOUT,
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        listen = self.config.listen
        self._server = await loop.create_server(self._protocol, host=listen.host, port=listen.port)

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.delivery.close()


async def serve(config: Config) -> int:
    log = structlog.get_logger("relay")
    server = RelayServer(config)
    try:
        await server.start()
    except OSError as exc:
        log.error(
            "relay.cannot_listen",
            host=config.listen.host,
            port=config.listen.port,
            error=exc.strerror or str(exc),
        )
        return 1
    log.info(
        "relay.started",
        listen=f"{config.listen.host}:{server.port}",
        destination=server.destination.label,
        policy=config.policy.action,
        allowed_networks=list(config.listen.allowed_networks) or "loopback only",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("relay.stopping")
    await server.stop()
    return 0


def run(config: Config) -> int:
    def quiet_exceptions(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        structlog.get_logger("relay").error(
            "relay.internal_error",
            message=context.get("message"),
            error=repr(context.get("exception")),
        )

    async def main() -> int:
        asyncio.get_running_loop().set_exception_handler(quiet_exceptions)
        return await serve(config)

    return asyncio.run(main())
