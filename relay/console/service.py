"""The console's own event loop, in a thread of the relay's process (the supervisor's with several workers)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable

import structlog
from aiohttp import web

from relay.config.loading import is_loopback_host
from relay.config.models import Config
from relay.console.access import Access
from relay.console.app import build_app
from relay.console.metrics import ConsoleMetrics
from relay.console.state import ConsoleState, UpstreamCheck
from relay.console.token import load_or_create_token
from relay.delivery.holding import Holding
from relay.spool import build_spool
from relay.spool.interface import ConsoleSpool, SpoolWriteError

# How often what the history keeps beyond console.history_days is purged.
PURGE_INTERVAL = 3600.0
_START_TIMEOUT = 30.0


class ConsoleThread:
    """Serves the console until stop(); count_connection() and the config may be used from any thread."""

    def __init__(self, accepting: Callable[[], bool], check_upstreams: UpstreamCheck | None = None) -> None:
        """accepting: whether the relay takes mail (for /healthz); check_upstreams: the Status page's check."""
        self._check_upstreams = check_upstreams
        self.metrics = ConsoleMetrics()
        self._accepting = accepting
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._state: ConsoleState | None = None
        self._purging: asyncio.Task[None] | None = None
        self.url: str | None = None  # without the token
        self.port: int | None = None

    def count_connection(self) -> None:
        self.metrics.count_connection()

    def _current_config(self) -> Config:
        assert self._state is not None
        return self._state.config

    def reconfigure(self, config: Config) -> None:
        """Show the relay's reloaded config (policy, upstreams); the console's own settings need a restart."""
        if self._state is not None and self._loop is not None:
            state = self._state
            self._loop.call_soon_threadsafe(setattr, state, "config", config)

    def start(self, config: Config) -> bool:
        """Serve, logging console.started with the URL to open; on failure log console.cannot_start, return False.

        config: with the port the relay really listens on. A console that cannot start (its port is taken)
        leaves the relay relaying: mail matters more than the page.
        """
        log = structlog.get_logger("relay")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="console", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            token_url = asyncio.run_coroutine_threadsafe(self._start(config), loop).result(_START_TIMEOUT)
        except (OSError, sqlite3.Error, ssl.SSLError, SpoolWriteError) as exc:
            console = config.console
            log.error(
                "console.cannot_start",
                host=console.host,
                port=console.port,
                error=getattr(exc, "strerror", None) or str(exc),
                hint="the relay goes on relaying mail; set console.port (0: a free port) or console.enabled: false",
            )
            self.stop()
            return False
        log.info("console.started", url=token_url, token_file=str(config.console_token_file))
        return True

    async def _start(self, config: Config) -> str:
        console = config.console
        token = load_or_create_token(config.console_token_file)
        spool = None
        if config.delivery.mode != "direct":
            spool = build_spool(config)
            await spool.open()
        tls_context = None
        if not is_loopback_host(console.host):
            assert config.listen.cert_file is not None and config.listen.key_file is not None  # load_config checks
            tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls_context.load_cert_chain(config.listen.cert_file, config.listen.key_file)
        host_names = ("localhost", "127.0.0.1", "::1", console.host, *console.allowed_hosts)
        access = Access(token, host_names, console.metrics_public, str(config.console_token_file))
        hostname, _ = config.listen.own_hostname()
        holding = None if spool is None else Holding(spool, hostname, self._current_config)
        self._state = ConsoleState(
            config, spool, access, self.metrics, self._accepting, hostname, holding, self._check_upstreams
        )
        self._runner = web.AppRunner(build_app(self._state), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, console.host, console.port, ssl_context=tls_context)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        self.port = int(server.sockets[0].getsockname()[1])
        scheme = "https" if tls_context else "http"
        shown_host = f"[{console.host}]" if ":" in console.host else console.host
        self.url = f"{scheme}://{shown_host}:{self.port}/"
        if spool is not None:
            self._purging = asyncio.create_task(self._purge(spool, console.history_days))
        return f"{self.url}?token={token}"

    async def _purge(self, spool: ConsoleSpool, history_days: float) -> None:
        log = structlog.get_logger("relay")
        while True:
            try:
                purged = await spool.forget_history(time.time() - history_days * 86_400)
            except Exception as exc:  # a full disk: the next round tries again
                log.error("console.purge_failed", error=str(exc))
            else:
                if purged:
                    log.info("console.history_purged", messages=purged, older_than_days=history_days)
            await asyncio.sleep(PURGE_INTERVAL)

    async def _stop(self) -> None:
        if self._purging is not None:
            self._purging.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purging
        if self._runner is not None:
            await self._runner.cleanup()
        if self._state is not None and self._state.spool is not None:
            await self._state.spool.close()

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), loop).result(_START_TIMEOUT)
        except Exception as exc:  # stopping goes on: the relay's own shutdown must not wait on the page
            structlog.get_logger("relay").error("console.stop_failed", error=repr(exc))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(_START_TIMEOUT)
        loop.close()
