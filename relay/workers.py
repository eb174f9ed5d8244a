"""listen.workers > 1: one listening socket in a supervisor, connections handed to worker processes in turn.

Each worker is a whole relay (its own event loop, upstream connections and delivery) that gets its
clients' connections over a Unix socket (SCM_RIGHTS) instead of accepting them: the supervisor accepts
and deals them out round robin, so ten clients land five and five on two workers. SO_REUSEPORT, which
spreads connections by a hash of their addresses, left one worker with seven of ten often enough to
halve the throughput of a run. The supervisor forwards SIGTERM/SIGINT and SIGHUP and, if a worker
dies on its own, stops the others and exits with an error for the service manager to see.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import sqlite3
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from relay.config.models import Config, ConfigError
from relay.delivery.intake import recover_spool
from relay.spool import build_spool
from relay.spool.interface import SpoolWriteError

if TYPE_CHECKING:
    from relay.console import ConsoleThread, UpstreamCheck

# The byte that travels with each handed-over connection (SCM_RIGHTS needs some data).
_HANDOVER = b"C"


def listening_socket(config: Config) -> socket.socket:
    """The relay's listening socket, bound and listening; raises OSError when it cannot."""
    listen = config.listen
    family, kind, proto, _, address = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(listen.backlog)
    except OSError:
        listener.close()
        raise
    return listener


def with_port(config: Config, port: int) -> Config:
    """The config with the port the relay really listens on (listen.port 0 picks one)."""
    return config.model_copy(update={"listen": config.listen.model_copy(update={"port": port})})


def _hand_out(
    listener: socket.socket, channels: Sequence[socket.socket], count_connection: Callable[[], None] | None
) -> None:
    """Accept connections and pass each to the next worker; ends when the listener is shut down."""
    for channel in itertools.cycle(channels):
        try:
            connection, _ = listener.accept()
        except OSError:
            return  # shut down: the relay is stopping
        if count_connection is not None:
            count_connection()
        with connection:
            try:
                socket.send_fds(channel, [_HANDOVER], [connection.fileno()])
            except OSError:
                return  # the worker is gone; the supervisor sees it exit and stops the relay


class ConnectionReceiver:
    """The worker's end: takes handed-over connections and serves each with serve(connection)."""

    def __init__(self, channel: socket.socket, serve: Callable[[socket.socket], Coroutine[Any, Any, None]]) -> None:
        self._channel = channel
        self._serve = serve
        self._tasks: set[asyncio.Task[None]] = set()
        channel.setblocking(False)
        asyncio.get_running_loop().add_reader(channel.fileno(), self._receive)

    def _receive(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self._channel, 16, 16)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            self.close()  # the supervisor is gone
            return
        loop = asyncio.get_running_loop()
        for fd in fds:
            connection = socket.socket(fileno=fd)
            connection.setblocking(False)
            task = loop.create_task(self._serve(connection))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @property
    def open(self) -> bool:
        return self._channel.fileno() >= 0

    def close(self) -> None:
        """Take no more connections; those being served go on."""
        if self._channel.fileno() >= 0:
            asyncio.get_running_loop().remove_reader(self._channel.fileno())
            self._channel.close()


async def _recover_shared_spool(config: Config) -> None:
    spool = build_spool(config)
    await spool.open()
    try:
        await recover_spool(spool)
    finally:
        await spool.close()


def supervise(
    config: Config,
    run_worker: Callable[[Config, socket.socket], int],
    reload_config: Callable[[], Config] | None = None,
    check_upstreams: UpstreamCheck | None = None,
) -> int:
    """Listen, fork listen.workers workers (run_worker(config with the real port, channel)), hand out connections.

    The console, if enabled, runs here, once for all workers, started after the workers are forked.
    """
    log = structlog.get_logger("relay")
    try:
        listener = listening_socket(config)
    except OSError as exc:
        log.error("relay.cannot_listen", host=config.listen.host, port=config.listen.port, error=exc.strerror)
        return 1
    port = listener.getsockname()[1]
    worker_config = with_port(config, port)
    if config.delivery.mode != "direct":
        # Once, before the workers share the spool: a worker recovering on its own would requeue
        # copies that another worker is sending at that moment.
        try:
            asyncio.run(_recover_shared_spool(config))
        except (OSError, sqlite3.Error, SpoolWriteError) as exc:
            log.error("relay.cannot_start", spool=config.spool.url or str(config.spool.path), error=str(exc))
            listener.close()
            return 1
    workers: set[int] = set()
    channels: list[socket.socket] = []
    stopping = False

    def stop_workers(signum: int = signal.SIGTERM, frame: Any = None) -> None:
        nonlocal stopping
        stopping = True
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread, which ends
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    # Installed before forking, so a signal that arrives meanwhile still reaches the workers.
    signal.signal(signal.SIGTERM, stop_workers)
    signal.signal(signal.SIGINT, stop_workers)

    # Each worker reloads its own config.
    def reload_workers(signum: int, frame: Any) -> None:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
        if console is not None and reload_config is not None:
            # The workers log a refused config themselves; the console keeps showing the old one.
            with contextlib.suppress(ConfigError):
                console.reconfigure(with_port(reload_config(), port))

    signal.signal(signal.SIGHUP, reload_workers)
    console: ConsoleThread | None = None
    for _ in range(config.listen.workers):
        if stopping:
            break
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            listener.close()
            ours.close()
            for channel in channels:
                channel.close()
            code = 1
            try:
                code = run_worker(worker_config, theirs)
            finally:
                os._exit(code)
        theirs.close()
        channels.append(ours)
        workers.add(pid)
    if config.console.enabled and not stopping:
        # Imported after the fork: the workers never load the console's libraries.
        from relay.console import ConsoleThread

        console = ConsoleThread(lambda: not stopping and len(workers) == config.listen.workers, check_upstreams)
        console.start(worker_config)
    count_connection = console.count_connection if console is not None else None
    handing_out = threading.Thread(
        target=_hand_out, args=(listener, channels, count_connection), name="accept", daemon=True
    )
    handing_out.start()
    exit_code = 0
    while workers:
        pid, status = os.wait()
        workers.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if not stopping:
            log.error("relay.worker_died", pid=pid, exit_code=code)
            exit_code = 1
            stop_workers()
        elif code != 0:
            exit_code = exit_code or 1
    handing_out.join(5)
    if console is not None:
        console.stop()
    listener.close()
    for channel in channels:
        channel.close()
    return exit_code
