"""The PostgreSQL side of the shared spool: connections, the versioned schema, and LISTEN for new mail.

Two pools: one for the commits a client's 250 waits for (the server's synchronous_commit), one for
claims and results, one per copy, which do not wait for the WAL flush: a database crash can only make
a copy go again, as the SQLite spool does not fsync them either. A lost connection is replaced at the
next call; while the database is unreachable every call is SpoolWriteError 451 4.3.0.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from typing import TypeAlias, TypeVar

import asyncpg
import structlog

from relay.spool.interface import SpoolWriteError, closed_spool_error

# Versioned schema: migration N (1-based) takes a database from version N - 1 to N, in one transaction.
MIGRATIONS = (
    """
    CREATE TABLE messages (
        id text PRIMARY KEY,
        mail_from text NOT NULL,
        smtputf8 boolean NOT NULL,
        upstream text,
        is_bounce boolean NOT NULL,
        received_at double precision NOT NULL,
        body bytea NOT NULL,
        -- Counted down by each copy's last result, in the same statement: the copies of one message
        -- recorded at once by several relays take turns on this row, and exactly one sees 0.
        copies_left integer NOT NULL,
        failed boolean NOT NULL DEFAULT false
    );
    CREATE TABLE copies (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        message_id text NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        position integer NOT NULL,
        kind text NOT NULL,
        recipients text[] NOT NULL,  -- the recipients still to deliver
        headers bytea NOT NULL,
        state text NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        next_attempt double precision NOT NULL,
        last_code integer,           -- the last attempt's reply, if it was not a success
        last_enhanced text,
        last_text text,
        lease_owner text,
        fence bigint NOT NULL DEFAULT 0
    );
    CREATE INDEX copies_due ON copies (next_attempt);
    CREATE INDEX copies_message ON copies (message_id);
    CREATE TABLE failures (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        message_id text NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        recipient text NOT NULL,
        code integer NOT NULL,
        enhanced text NOT NULL,
        text text NOT NULL,
        headers bytea NOT NULL
    );
    CREATE INDEX failures_message ON failures (message_id);
    CREATE TABLE sends (
        sent_at double precision NOT NULL,
        recipients integer NOT NULL
    );
    CREATE INDEX sends_time ON sends (sent_at);
    """,
    # 2, as the SQLite spool's: what the console shows (the messages from before are not in the history).
    """
    CREATE TABLE history (
        id text PRIMARY KEY,         -- the queue id
        entered bigint GENERATED ALWAYS AS IDENTITY,  -- the order of entry, for messages received the same second
        received_at double precision NOT NULL,
        sender text NOT NULL,
        subject text NOT NULL,
        recipients text[] NOT NULL,  -- the envelope's
        decision text NOT NULL,      -- a policy action, or refused
        reason text NOT NULL
    );
    CREATE INDEX history_time ON history (received_at);
    CREATE TABLE history_copies (
        message_id text NOT NULL REFERENCES history (id) ON DELETE CASCADE,
        position integer NOT NULL,
        recipients text[] NOT NULL,
        state text NOT NULL,         -- queued | sending | delivered | deferred | bounced | held | discarded
        attempts integer NOT NULL DEFAULT 0,
        last_code integer,           -- the upstream's 250 once delivered, else the reply that deferred or refused it
        last_enhanced text,
        last_text text,
        next_attempt double precision,
        PRIMARY KEY (message_id, position)
    );
    CREATE TABLE held (
        id text PRIMARY KEY,
        mail_from text NOT NULL,
        recipients text[] NOT NULL,
        smtputf8 boolean NOT NULL,
        received_at double precision NOT NULL,
        trace jsonb NOT NULL,        -- what the relay's Received line says, for the copies made at release
        state text NOT NULL,         -- held | released | discarded | returned
        data bytea NOT NULL          -- the message as received; emptied once it is settled
    );
    -- Totals for /metrics of every relay sharing the database, kept across restarts; label is '' when there is none.
    CREATE TABLE counters (
        name text NOT NULL,
        label text NOT NULL,
        value double precision NOT NULL,
        PRIMARY KEY (name, label)
    );
""",
    # 3: a row per total and database connection (its backend's pid: shard), so that relays counting at
    # the same moment never wait for each other's row; /metrics adds them up (the latest, for a gauge),
    # and fold_counters() merges the rows of connections that have ended into shard 0.
    """
    ALTER TABLE counters ADD COLUMN shard integer NOT NULL DEFAULT 0,
        ADD COLUMN at double precision NOT NULL DEFAULT 0;  -- when a gauge was set
    ALTER TABLE counters DROP CONSTRAINT counters_pkey, ADD PRIMARY KEY (name, label, shard);
""",
)
SCHEMA_LOCK = 0x70726976  # pg_advisory_xact_lock key: relays starting together migrate one at a time
NEW_MAIL_CHANNEL = "privacy_relay_due"
# Connections per pool and relay process: the listener's sessions store at once, the scheduler claims and records.
POOL_SIZE = 10
# An unreachable database is a 451 within seconds, not a client left waiting.
CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 30.0
# Seconds between attempts to listen again after the notification connection was lost.
LISTEN_RETRY = 2.0

_T = TypeVar("_T")
# Subscripted in the stubs only; a string, so nothing subscripts the class at run time.
Connection: TypeAlias = "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"
# What a lost or refused database connection raises; a unique violation is the caller's mistake instead.
# (InternalClientError: a connection cut while a query was on it.)
_UNAVAILABLE = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)


def _unavailable(exc: BaseException) -> SpoolWriteError:
    detail = type(exc).__name__ if not str(exc) else str(exc).splitlines()[0]
    return SpoolWriteError(451, "4.3.0", f"The relay cannot reach its spool database ({detail}); try again later")


class Database:
    """The spool's database: open() connects, creates or migrates the schema, and starts listening if asked to."""

    def __init__(self, url: str, password: str | None) -> None:
        self.url = url
        self._password = password
        self._durable: asyncpg.Pool[asyncpg.Record] | None = None
        self._fast: asyncpg.Pool[asyncpg.Record] | None = None
        self._listening: asyncio.Task[None] | None = None
        self._wake: Callable[[], None] | None = None
        self.log = structlog.get_logger("relay")

    async def open(self) -> None:
        """Connect, migrate, listen; raises SpoolWriteError when the database cannot be reached or used."""
        try:
            self._durable = await self._create_pool({})
            async with self._durable.acquire() as connection:
                await self._migrate(connection)
                durable_commit = await connection.fetchval("SHOW synchronous_commit")
            self._fast = await self._create_pool({"synchronous_commit": "off"})
        except _UNAVAILABLE as exc:
            await self.close()
            raise _unavailable(exc) from exc
        if durable_commit == "off":
            self.log.warning(
                "spool.synchronous_commit_off",
                hint="a database crash can lose mail the relay acknowledged; set synchronous_commit = on",
            )
        if self._wake is not None:
            self._start_listening()

    def _start_listening(self) -> None:
        if self._listening is None:
            self._listening = asyncio.get_running_loop().create_task(self._listen())

    async def _create_pool(self, settings: dict[str, str]) -> asyncpg.Pool[asyncpg.Record]:
        return await asyncpg.create_pool(
            self.url,
            password=self._password,
            timeout=CONNECT_TIMEOUT,
            # No floor: asyncpg would keep reconnecting it (and logging each failure) while the database is down.
            min_size=0,
            max_size=POOL_SIZE,
            command_timeout=COMMAND_TIMEOUT,
            server_settings=settings,
            reset=_keep_session,
        )

    async def _migrate(self, connection: Connection) -> None:
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
            await connection.execute("CREATE TABLE IF NOT EXISTS privacy_relay_schema (version integer NOT NULL)")
            version = await connection.fetchval("SELECT coalesce(max(version), 0) FROM privacy_relay_schema")
            if version > len(MIGRATIONS):
                raise asyncpg.InterfaceError(
                    f"the spool database's schema is version {version}, newer than this relay's "
                    f"{len(MIGRATIONS)}: upgrade this relay"
                )
            for number in range(version + 1, len(MIGRATIONS) + 1):
                await connection.execute(MIGRATIONS[number - 1])
                await connection.execute("INSERT INTO privacy_relay_schema (version) VALUES ($1)", number)
                self.log.info("spool.migrated", version=number)

    def wake_on_new_mail(self, wake: Callable[[], None]) -> None:
        """Call wake whenever any relay stores mail that is due (a NOTIFY); polling stays the backstop.
        Only a spool that delivers listens: the console's and the queue command's hold no connection for it."""
        self._wake = wake
        if self._durable is not None:
            self._start_listening()

    async def _listen(self) -> None:
        """Hold a connection that LISTENs, and open it again whenever it is lost (the database restarted)."""
        while True:
            try:
                connection = await asyncpg.connect(self.url, password=self._password, timeout=CONNECT_TIMEOUT)
            except _UNAVAILABLE:
                await asyncio.sleep(LISTEN_RETRY)
                continue
            lost = asyncio.Event()
            try:
                connection.add_termination_listener(functools.partial(_set_event, lost))
                await connection.add_listener(NEW_MAIL_CHANNEL, self._notified)
                # Mail may have arrived while nobody listened.
                self._notified()
                await lost.wait()
            except _UNAVAILABLE:
                pass
            finally:
                with contextlib.suppress(*_UNAVAILABLE):
                    await asyncio.wait_for(connection.close(), CONNECT_TIMEOUT)
            await asyncio.sleep(LISTEN_RETRY)

    def _notified(self, *_: object) -> None:
        if self._wake is not None:
            self._wake()

    async def run(self, work: Callable[[Connection], Awaitable[_T]], durable: bool = True) -> _T:
        """work in a transaction of its own; durable=False commits without waiting for the WAL flush."""
        return await self.statements(work, durable, transaction=True)

    async def read(self, work: Callable[[Connection], Awaitable[_T]]) -> _T:
        """work's statements each on its own: reads, which commit nothing."""
        return await self.statements(work, durable=False)

    async def statements(
        self, work: Callable[[Connection], Awaitable[_T]], durable: bool = True, transaction: bool = False
    ) -> _T:
        """work on a connection of the durable or the fast pool, each statement committed on its own
        (work that is one statement) unless transaction."""
        pool = self._durable if durable else self._fast
        if pool is None:
            raise closed_spool_error()
        try:
            async with pool.acquire() as connection:
                if not transaction:
                    return await work(connection)
                async with connection.transaction():
                    return await work(connection)
        except asyncpg.UniqueViolationError:
            raise
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    async def close(self) -> None:
        listening, self._listening = self._listening, None
        if listening is not None:
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listening
        pools = [pool for pool in (self._durable, self._fast) if pool is not None]
        self._durable = self._fast = None
        for pool in pools:
            try:
                await asyncio.wait_for(pool.close(), CONNECT_TIMEOUT)
            except (TimeoutError, *_UNAVAILABLE):
                pool.terminate()


async def _keep_session(connection: asyncpg.Connection[asyncpg.Record]) -> None:
    """A connection back in its pool needs no reset query (a round trip per use): no work here LISTENs,
    SETs, opens a cursor or takes a session lock. asyncpg still rolls back a transaction left open."""


def _set_event(event: asyncio.Event, *_: object) -> None:
    event.set()
