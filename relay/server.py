"""Wiring: the socket, the handler, the delivery and its spool, worker processes; SIGTERM stops, SIGHUP reloads.

With listen.workers > 1, relay/workers.py listens and hands connections to worker processes, each
running the RelayServer here on connections it receives instead of accepting them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import ssl
from collections.abc import Callable
from typing import Any

import structlog

from relay.config.models import Config, ConfigError, ListenConfig, UpstreamConfig
from relay.delivery.destinations import Destination, OutboxDestination, UpstreamDestination
from relay.delivery.direct import DirectDelivery
from relay.delivery.holding import Holding
from relay.delivery.intake import SpooledDelivery
from relay.delivery.passthrough import PassthroughLogins
from relay.smtp.accounts import AccountsFile, UsersFileError, readable_by_others
from relay.smtp.auth import Authenticator, FailedLoginLockout
from relay.smtp.listener import ConnectionSlots, RelayHandler
from relay.smtp.protocol import RelaySMTP
from relay.spool import build_spool
from relay.spool.interface import Spool, SpoolWriteError
from relay.upstream.oauth import AccessTokens
from relay.upstream.pool import ProbeStep, UpstreamPool, probe_upstream
from relay.workers import ConnectionReceiver, supervise, with_port

# Settings a running relay cannot take over on SIGHUP: they need a restart.
RESTART_ONLY = ("listen", "spool", "delivery.mode")


def build_destination(config: Config, hostname: str) -> Destination:
    if config.uses_outbox:
        return OutboxDestination(config.outbox)
    password = config.upstream_password.get_secret_value() if config.upstream_password else None
    pool = UpstreamPool(config.upstream, password, hostname, access_tokens(config.upstream))
    return UpstreamDestination(pool, config.upstream.max_recipients_per_message)


def build_named_destinations(config: Config, hostname: str) -> dict[str, Destination]:
    """One destination per entry of `upstreams`, for the routes."""
    destinations: dict[str, Destination] = {}
    for name, upstream in config.upstreams.items():
        secret = config.named_upstream_passwords.get(name)
        password = secret.get_secret_value() if secret else None
        pool = UpstreamPool(upstream, password, hostname, access_tokens(upstream, name))
        destinations[name] = UpstreamDestination(pool, upstream.max_recipients_per_message)
    return destinations


def access_tokens(upstream: UpstreamConfig, name: str = "upstream") -> AccessTokens | None:
    if not upstream.uses_oauth2:
        return None
    return AccessTokens(upstream.oauth2, f"privacy-relay auth login {name}")


async def check_upstreams(config: Config, hostname: str) -> list[tuple[str, list[ProbeStep]]]:
    """The steps of `privacy-relay check` for each upstream (connect, EHLO, TLS, login), by key; no mail is sent."""
    checks: list[tuple[str, list[ProbeStep]]] = []
    if not config.uses_outbox:
        password = config.upstream_password.get_secret_value() if config.upstream_password else None
        checks.append(
            ("upstream", await probe_upstream(config.upstream, password, hostname, access_tokens(config.upstream)))
        )
    for name, upstream in config.upstreams.items():
        secret = config.named_upstream_passwords.get(name)
        password = secret.get_secret_value() if secret else None
        steps = await probe_upstream(upstream, password, hostname, access_tokens(upstream, name))
        checks.append((f"upstreams.{name}", steps))
    return checks


def _refuse_encrypted_key() -> str:
    raise ConfigError("listen.key_file is encrypted with a passphrase; the relay needs an unencrypted key (mode 0600)")


def client_tls_context(listen: ListenConfig) -> ssl.SSLContext | None:
    """The server-side TLS context for clients, or None when listen.tls is none. Raises ConfigError."""
    if listen.tls == "none":
        return None
    assert listen.cert_file is not None and listen.key_file is not None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(listen.cert_file, listen.key_file, password=_refuse_encrypted_key)
    except ssl.SSLError as exc:  # before OSError, of which it is a subclass
        raise ConfigError(
            f"listen.cert_file / listen.key_file: {listen.cert_file} and {listen.key_file} are not a PEM "
            f"certificate chain and its matching private key ({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"listen.cert_file / listen.key_file: cannot read {exc.filename or listen.cert_file}: {exc.strerror}"
        ) from None
    return context


def build_authenticator(listen: ListenConfig, passthrough: PassthroughLogins | None = None) -> Authenticator | None:
    """Client AUTH when listen.auth asks for it, or when some upstream takes each client's own login."""
    if listen.auth == "none" and passthrough is None:
        return None
    accounts = None
    if listen.auth != "none":
        try:
            accounts = AccountsFile(listen.users_file)
        except UsersFileError as exc:
            raise ConfigError(f"listen.users_file: {exc}") from None
    return Authenticator(accounts, FailedLoginLockout(listen.max_auth_failures), passthrough)


class RelayServer:
    """Raises ConfigError when the TLS certificate or the accounts file cannot be used."""

    def __init__(
        self,
        config: Config,
        recover_spool: bool = True,
        channel: socket.socket | None = None,
        count_connection: Callable[[], None] | None = None,
    ) -> None:
        """channel: a worker's end of the supervisor's hand-out of connections, instead of a listening socket.

        count_connection: called for each client connection, for the console's metrics.
        """
        self.config = config
        self._count_connection = count_connection
        self._recover_spool = recover_spool
        self._channel = channel
        self._receiver: ConnectionReceiver | None = None
        self.hostname, self.hostname_qualified = config.listen.own_hostname()
        self.tls_context = client_tls_context(config.listen)
        self.passthrough = PassthroughLogins(config, self.hostname) if config.uses_passthrough else None
        self.authenticator = build_authenticator(config.listen, self.passthrough)
        self.slots = ConnectionSlots(config.listen.max_connections, config.listen.max_connections_per_ip)
        self.destination = build_destination(config, self.hostname)
        named = build_named_destinations(config, self.hostname)
        self.spool: Spool | None = None
        self.delivery: DirectDelivery | SpooledDelivery
        if config.delivery.mode == "direct":
            self.delivery = DirectDelivery(self.destination, config.upstream.max_connections, named, config.routes)
        else:
            self.spool = build_spool(config)
            self.delivery = SpooledDelivery(self.spool, self.destination, config, self.hostname, named=named)
            if config.spool.shared:
                from relay.spool.postgres import PostgresSpool  # build_spool found the driver

                assert isinstance(self.spool, PostgresSpool)
                # Another relay's new mail wakes this one's scheduler at once, instead of at its next poll.
                self.spool.wake_on_new_mail(self.delivery.wake)
        self.holding = Holding(self.spool, self.hostname, lambda: self.config) if self.spool is not None else None
        self._returning_held: asyncio.Task[None] | None = None
        self.handler = RelayHandler(
            config, self.delivery, self.hostname, self.authenticator, history=self.spool, holding=self.holding
        )
        self._server: asyncio.Server | None = None

    def _protocol(self) -> RelaySMTP:
        # asyncio makes one protocol per accepted connection.
        if self._count_connection is not None:
            self._count_connection()
        listen = self.config.listen
        return RelaySMTP(
            self.handler,
            self.config.listen.networks(),
            self.slots,
            command_timeout=listen.command_timeout,
            min_data_rate=listen.min_data_rate,
            data_size_limit=listen.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self.hostname,
            ident="privacy-relay",
            tls_context=self.tls_context if listen.tls == "starttls" else None,
            implicit_tls=self.tls_context if listen.tls == "implicit" else None,
            tls_handshake_timeout=listen.tls_handshake_timeout,
            # The handler decides per connection: TLS, or a loopback client (see RelayHandler.handle_AUTH).
            auth_require_tls=False,
        )

    async def start(self) -> None:
        """Open the spool and resume its deliveries, then listen; raises OSError, sqlite3.Error or SpoolWriteError."""
        if self.spool is not None:
            assert isinstance(self.delivery, SpooledDelivery)
            await self.spool.open()
            await self.delivery.start(recover=self._recover_spool)
            assert self.holding is not None
            self._returning_held = asyncio.create_task(self.holding.return_expired_forever())
        if self._channel is not None:
            self._receiver = ConnectionReceiver(self._channel, self._serve_connection)
            return
        loop = asyncio.get_running_loop()
        listen = self.config.listen
        self._server = await loop.create_server(
            self._protocol,
            host=listen.host,
            port=listen.port,
            backlog=listen.backlog,
        )

    async def _serve_connection(self, connection: socket.socket) -> None:
        """A connection the supervisor accepted and handed to this worker (RelaySMTP does any TLS)."""
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self._protocol, connection)
        except OSError:
            connection.close()  # the client left before the worker took the connection over

    @property
    def accepting(self) -> bool:
        if self._receiver is not None:
            return self._receiver.open
        return self._server is not None and self._server.is_serving()

    @property
    def port(self) -> int:
        if self._server is None:
            return self.config.listen.port  # a worker: the supervisor put the real port in its config
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def reload(self, config: Config) -> list[str]:
        """Take over policy, upstream and limits from a new config; returns the changes left for a restart."""
        ignored = [key for key in RESTART_ONLY if _setting(self.config, key) != _setting(config, key)]
        if config.uses_passthrough != self.config.uses_passthrough:
            # Whether clients are offered AUTH is decided at start. Until a restart, mail that would leave
            # through a newly passthrough upstream is refused, and logins meant for a former one are checked
            # against the accounts file.
            ignored.append("auth: passthrough")
        delivery = config.delivery.model_copy(update={"mode": self.config.delivery.mode})
        kept = config.model_copy(
            update={"listen": self.config.listen, "spool": self.config.spool, "delivery": delivery}
        )
        self.config = kept
        self.handler.config = kept
        if self.passthrough is not None:
            self.passthrough.reconfigure(kept)
        self.destination = build_destination(kept, self.hostname)
        self.delivery.reconfigure(kept, self.destination, build_named_destinations(kept, self.hostname))
        return ignored

    async def stop(self) -> None:
        """Stop accepting, let deliveries in flight finish within delivery.stop_timeout, keep the rest."""
        if self._server is not None:
            # close() shuts the listening sockets at once. Not wait_closed(): from Python 3.12 on it also
            # waits for idle clients to leave, which could outlast Docker's SIGKILL.
            self._server.close()
        if self._receiver is not None:
            self._receiver.close()
        if self._returning_held is not None:
            self._returning_held.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._returning_held
        await self.delivery.stop(self.config.delivery.stop_timeout)


def warn_about_secret_files(config: Config) -> None:
    log = structlog.get_logger("relay")
    listen = config.listen
    secret_files = {"listen.key_file": listen.key_file}
    if listen.auth != "none":
        secret_files["listen.users_file"] = listen.users_file
    upstreams = {"upstream": config.upstream, **{f"upstreams.{n}": u for n, u in config.upstreams.items()}}
    for prefix, upstream in upstreams.items():
        secret_files[f"{prefix}.oauth2.token_file"] = upstream.oauth2.token_file
    for key, path in secret_files.items():
        if path is not None and readable_by_others(path):
            log.warning("relay.secret_file_readable", key=key, path=str(path), fix=f"chmod 600 {path}")


def _setting(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


async def serve(
    config: Config,
    reload_config: Callable[[], Config],
    recover_spool: bool = True,
    channel: socket.socket | None = None,
) -> int:
    log = structlog.get_logger("relay")
    # A worker (channel set) never serves the console: its supervisor does, for all of them.
    console = None
    if config.console.enabled and channel is None:
        # Imported only here: aiohttp, Jinja2 and prometheus_client cost about 12 MiB, which workers and
        # relays without a console do not pay.
        from relay.console import ConsoleThread

        console = ConsoleThread(lambda: server.accepting, check_upstreams)
    server = RelayServer(config, recover_spool, channel, console.count_connection if console else None)
    warn_about_secret_files(config)
    if not server.hostname_qualified:
        log.warning(
            "relay.hostname_not_qualified",
            hostname=server.hostname,
            hint="the machine has no fully qualified name; set listen.hostname (e.g. relay.office.example), "
            "which receiving servers may require in EHLO",
        )
    try:
        await server.start()
    except (OSError, sqlite3.Error, SpoolWriteError) as exc:
        log.error(
            "relay.cannot_start",
            host=config.listen.host,
            port=config.listen.port,
            spool=server.spool.label if server.spool else None,
            error=getattr(exc, "strerror", None) or str(exc),
        )
        await server.stop()
        return 1
    log.info(
        "relay.started",
        listen=f"{config.listen.host}:{server.port}",
        hostname=server.hostname,
        pid=os.getpid(),
        event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
        destination=server.destination.label,
        delivery=config.delivery.mode,
        spool=server.spool.label if server.spool else None,
        policy=config.policy.action,
        allowed_networks=list(config.listen.allowed_networks) or "loopback only",
        tls=config.listen.tls,
        auth=config.listen.auth,
        users=len(server.authenticator.current_accounts().by_name) if server.authenticator else None,
        passthrough=config.uses_passthrough,
    )
    if console is not None:
        console.start(with_port(config, server.port))

    def reload() -> None:
        try:
            new_config = reload_config()
        except ConfigError as exc:
            log.error("config.reload_refused", error=str(exc), hint="the relay keeps running with the old config")
            return
        ignored = server.reload(new_config)
        if console is not None:
            console.reconfigure(with_port(server.config, server.port))
        log.info("config.reloaded", policy=new_config.policy.action, destination=server.destination.label)
        if ignored:
            log.warning("config.restart_needed", settings=ignored)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    await stop.wait()
    log.info("relay.stopping")
    if console is not None:
        await asyncio.to_thread(console.stop)
    await server.stop()
    log.info("relay.stopped")
    return 0


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when the optional extra is installed (pip install 'privacy-relay[fast]')."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _run_one(
    config: Config,
    reload_config: Callable[[], Config],
    recover_spool: bool = True,
    channel: socket.socket | None = None,
) -> int:
    def quiet_exceptions(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        structlog.get_logger("relay").error(
            "relay.internal_error",
            message=context.get("message"),
            error=repr(context.get("exception")),
        )

    async def main() -> int:
        asyncio.get_running_loop().set_exception_handler(quiet_exceptions)
        return await serve(config, reload_config, recover_spool, channel)

    with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
        return runner.run(main())


def run(config: Config, reload_config: Callable[[], Config]) -> int:
    """Serve until SIGTERM/SIGINT: in this process, or in listen.workers worker processes."""
    if config.listen.workers == 1:
        return _run_one(config, reload_config)

    def run_worker(worker_config: Config, channel: socket.socket) -> int:
        return _run_one(worker_config, reload_config, recover_spool=False, channel=channel)

    return supervise(config, run_worker, reload_config, check_upstreams)
